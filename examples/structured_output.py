"""Structured outputs through the official `openai` client against a running `kda-serve`.

    kda-serve &                                   # the embedded default model on 127.0.0.1:8000
    python examples/structured_output.py          # or --base-url http://host:port/v1 --api-key KEY

The reply is constrained to a JSON schema (`response_format`), so it parses whatever the model would rather
say: even the embedded model, whose weights are random, answers with a valid object.
"""

from __future__ import annotations

import argparse
import json

from openai import OpenAI

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "unsure"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def ask(client: OpenAI, model: str, question: str, seed: int = 0) -> dict:
    """The model's answer to `question` as a dict that follows SCHEMA."""
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}},
        max_tokens=200,
        temperature=0.7,
        seed=seed,
    )
    return json.loads(response.choices[0].message.content)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    for seed, question in enumerate(["Is the sky blue?", "Does a recurrent state grow with the sequence?"]):
        print(question, "->", ask(client, model, question, seed))


if __name__ == "__main__":
    main()

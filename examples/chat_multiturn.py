"""A multi-turn chat through the official `openai` client against a running `kda-serve`.

    kda-serve &                                   # the embedded default model on 127.0.0.1:8000
    python examples/chat_multiturn.py             # or --base-url http://host:port/v1 --api-key KEY

Each turn sends the whole conversation so far; the server restores the longest prefix it has cached (the
system prompt, earlier turns) and computes only the rest, which `usage.prompt_tokens_details.cached_tokens`
reports.
"""

from __future__ import annotations

import argparse
import time

from openai import OpenAI

# Real deployments put a few hundred tokens of instructions first; every turn of every conversation repeats them.
SYSTEM_PROMPT = (
    "You are a concise technical assistant for people who run language models in production. Answer in plain "
    "words and short sentences. When a question is about performance, say which resource limits it: memory "
    "bandwidth, compute, or the host. When it is about correctness, say how to test it against a reference. "
    "Prefer concrete numbers to adjectives, and say when you do not know. The models served here are hybrids: "
    "most layers are linear attention with a recurrent state of fixed size per sequence (Kimi Delta Attention), "
    "the others are multi-head latent attention with a cache that grows with the sequence. A recurrent state "
    "summarises everything before it and exists only at the exact position where it was computed, so reusing "
    "a conversation's prefix means restoring the state saved at that position together with the latent cache "
    "of the tokens before it. Keep answers under five sentences unless asked for more detail, never invent "
    "benchmarks, and when the user asks for a summary, give one sentence that names the main point of each "
    "earlier answer in order."
)

QUESTIONS = [
    "Hello! What is a recurrent state?",
    "How is it different from a key-value cache?",
    "Why does that make long conversations cheaper?",
    "Summarise our conversation in one sentence.",
]


def chat(client: OpenAI, model: str, questions: list[str], max_tokens: int = 24, stream_last: bool = True,
         system: str = SYSTEM_PROMPT):
    """Ask the questions in one conversation; returns one dict per turn (reply, usage numbers, seconds).

    The last turn is streamed (with usage in the final chunk) to show both ways of calling the API.
    """
    messages = [{"role": "system", "content": system}]
    turns = []
    for i, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        started = time.perf_counter()
        if stream_last and i == len(questions) - 1:
            reply, usage = "", None
            stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    reply += chunk.choices[0].delta.content
                if chunk.usage is not None:
                    usage = chunk.usage
        else:
            response = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                      temperature=0)
            reply, usage = response.choices[0].message.content, response.usage
        seconds = time.perf_counter() - started
        messages.append({"role": "assistant", "content": reply})
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        turns.append({"question": question, "reply": reply, "prompt_tokens": usage.prompt_tokens,
                      "cached_tokens": cached or 0, "completion_tokens": usage.completion_tokens,
                      "seconds": seconds})
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="EMPTY", help="the server's --api-key, if it has one")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    print(f"model: {model}")
    for n, turn in enumerate(chat(client, model, QUESTIONS, args.max_tokens), start=1):
        print(f"\n[turn {n}] user: {turn['question']}")
        print(f"[turn {n}] assistant: {turn['reply']}")
        print(f"[turn {n}] prompt {turn['prompt_tokens']} tokens, {turn['cached_tokens']} from the prefix cache, "
              f"{turn['completion_tokens']} generated, {turn['seconds']:.2f} s")


if __name__ == "__main__":
    main()

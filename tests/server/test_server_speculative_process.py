"""The real `kda-serve` with speculative decoding on: concurrent streams of every kind — completions and
chats, several choices, logprobs, penalties, JSON outputs, stop strings — all complete with sane answers,
drafts are verified, and every slot and block comes back (the verify slots included).

The embedded model's random weights never repeat their context, so prompt lookup would propose nothing; a
logit bias towards one of the prompt's words makes some requests repeat it, and prompt lookup then drafts
(and the drafts hold) for those.
"""

from __future__ import annotations

import asyncio
import random

import httpx
from server_testing import SERVER_ARGS, ServerProcess, parse_sse, wait_until_free
from transformers import AutoTokenizer

from kda_serving.model import default_model_path

WORDS = ["kernel", "state", "chunk", "decay", "gate"]


def test_speculating_server_under_concurrent_load():
    rng = random.Random(1)
    word = AutoTokenizer.from_pretrained(default_model_path()).encode(" state", add_special_tokens=False)
    bias = {"logit_bias": {str(word[0]): 30}}
    # state slots for 32 running requests and their drafts (SERVER_ARGS' 24 leave none free: drafts wait)
    with ServerProcess(*SERVER_ARGS, "--num-state-slots", "160", "--num-speculative-tokens", "3",
                       "--prompt-lookup-min", "1") as server:
        model = httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]

        def body(i: int) -> tuple[str, dict]:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.choice([5, 40, 120])))
            extra = [{}, {"n": 2}, {"logprobs": 2}, {"frequency_penalty": 0.5, "repetition_penalty": 1.2},
                     {"stop": ["ke"]}, {"response_format": {"type": "json_object"}}][i % 6]
            if i % 3 == 0:
                extra = {**extra, **bias}
            if i % 2:
                if "logprobs" in extra:
                    extra = {"logprobs": True, "top_logprobs": 2}
                return "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": text}],
                                                "max_tokens": 12, "stream": True, "temperature": 0, **extra}
            return "/v1/completions", {"model": model, "prompt": text, "max_tokens": 12, "stream": True,
                                       "temperature": 0.8, "seed": i, **extra}

        requests = [body(i) for i in range(60)]

        async def client_task(client, path, payload):
            r = await client.post(path, json=payload)
            assert r.status_code == 200, r.text
            events, done = parse_sse(r.text)
            assert done and not any("error" in e for e in events), events
            reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
            assert len(reasons) == payload.get("n", 1) and set(reasons) <= {"length", "stop"}, reasons

        async def main():
            limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=300, limits=limits) as client:
                await asyncio.gather(*(client_task(client, p, b) for p, b in requests))

        asyncio.run(main())
        m = wait_until_free(server)
        assert m["kda_serving_engine_spec_accepted_tokens_total"] > 0
        assert m["kda_serving_engine_state_slots_used"] == 0

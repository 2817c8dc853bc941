"""GPU smoke test of `kda-serve --device cuda` on the embedded model (run on the device: pytest -m gpu).

The same server as on the CPU, with the CUDA kernels underneath: concurrent streams complete and free every
slot and block, a disconnect aborts, the `openai` client's multi-turn chat reuses the prefix, and greedy
replies with and without the prefix cache are compared (reported, not asserted: bf16).
"""

from __future__ import annotations

import asyncio
import importlib.util

import httpx
import pytest
from server_testing import REPO_ROOT, ServerProcess, parse_sse, wait_until_free

pytestmark = pytest.mark.gpu

GPU_ARGS = ("--device", "cuda", "--max-num-seqs", "64")


def _example():
    spec = importlib.util.spec_from_file_location("chat_multiturn", REPO_ROOT / "examples" / "chat_multiturn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _streams(base_url: str, model: str, count: int) -> list[str]:
    async def one(client, i):
        body = {"model": model, "messages": [{"role": "user", "content": "kernel " * (1 + 37 * (i % 9))}],
                "max_tokens": 16, "stream": True}
        r = await client.post("/v1/chat/completions", json=body)
        events, done = parse_sse(r.text)
        assert r.status_code == 200 and done and not any("error" in e for e in events), r.text
        return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])

    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=httpx.Limits(max_connections=300)) as c:
        return await asyncio.gather(*(one(c, i) for i in range(count)))


def test_gpu_server_smoke():
    from openai import OpenAI

    example = _example()
    with ServerProcess(*GPU_ARGS, startup_timeout=300) as srv:
        model = httpx.get(srv.base_url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(_streams(srv.base_url, model, 200))
        wait_until_free(srv, timeout=60)

        async def leave_early():
            body = {"model": model, "prompt": "story", "max_tokens": 3000, "ignore_eos": True, "stream": True}
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as client:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            return

        asyncio.run(leave_early())
        wait_until_free(srv, timeout=10)

        client = OpenAI(base_url=srv.base_url + "/v1", api_key="EMPTY", max_retries=0)
        with_reuse = example.chat(client, model, example.QUESTIONS, max_tokens=16)
        assert all(t["cached_tokens"] > 0 for t in with_reuse[1:]), with_reuse

    with ServerProcess(*GPU_ARGS, "--no-prefix-caching", startup_timeout=300) as srv:
        client = OpenAI(base_url=srv.base_url + "/v1", api_key="EMPTY", max_retries=0)
        scratch = example.chat(client, model, example.QUESTIONS, max_tokens=16)
    # bf16 kernels: a restored state was computed in another chunking, so greedy replies may differ once a
    # near-tie flips (the engine's GPU tests bound the numeric difference); report rather than assert.
    same = sum(a["reply"] == b["reply"] for a, b in zip(with_reuse, scratch))
    print(f"greedy replies identical with/without reuse: {same}/{len(scratch)}")
    assert all(t["completion_tokens"] >= 1 for t in scratch)

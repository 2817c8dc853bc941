"""kill -9 of `kda-serve`, then a restart: the new process serves cleanly.

While serving, the server writes nothing to disk, so there is nothing to corrupt; the load test checks that
the dead process's requests are cut (not hung) and leave no trace in the new one. The only file it ever
writes is the embedded model's generated weights on first start; killing it in the middle of that must not
leave a cache that breaks the next start.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from server_testing import SERVER_ARGS, ServerProcess, wait_until_free


def test_kill9_mid_load_then_restart_serves_clean():
    first = ServerProcess(*SERVER_ARGS).start()
    port = first.port
    body = {"model": None, "prompt": "a story about a kernel", "max_tokens": 400, "ignore_eos": True,
            "stream": True}

    async def load(model):
        got_tokens = asyncio.Event()

        async def one(client):
            try:
                async with client.stream("POST", "/v1/completions", json={**body, "model": model}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            got_tokens.set()
                return "finished"
            except httpx.TransportError:
                return "cut"

        async with httpx.AsyncClient(base_url=first.base_url, timeout=120) as client:
            tasks = [asyncio.create_task(one(client)) for _ in range(8)]
            await asyncio.wait_for(got_tokens.wait(), timeout=120)
            first.kill9()
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)

    try:
        model = httpx.get(first.base_url + "/v1/models").json()["data"][0]["id"]
        outcomes = asyncio.run(load(model))
    finally:
        first.stop()
    assert outcomes.count("cut") == 8  # 400 tokens each were far from done when the process died

    with ServerProcess(*SERVER_ARGS, port=port) as second:
        r = httpx.post(second.base_url + "/v1/completions", json={"model": model, "prompt": "again", "max_tokens": 3},
                       timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        m = wait_until_free(second, timeout=10)
        assert m["kda_serving_engine_requests_aborted_total"] == 0
        assert m["kda_serving_engine_requests_finished_total"] == 1


def test_kill9_during_first_start_leaves_no_broken_cache(tmp_path):
    env = {"KDA_SERVING_CACHE": str(tmp_path)}
    first = ServerProcess(*SERVER_ARGS, env=env).spawn()
    try:
        # Kill as soon as the weights cache is being written (or at the latest when the server is up).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(tmp_path.iterdir()):
            time.sleep(0.02)
        first.kill9()
    finally:
        first.stop()
    finished = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert finished == [], f"killed too late to test an interrupted write: {finished}"
    with ServerProcess(*SERVER_ARGS, env=env) as second:
        r = httpx.post(second.base_url + "/v1/chat/completions", timeout=60,
                       json={"model": httpx.get(second.base_url + "/v1/models").json()["data"][0]["id"],
                             "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1

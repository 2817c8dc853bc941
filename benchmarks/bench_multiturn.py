"""Multi-turn state reuse through the HTTP server: time to first token with and without the prefix cache.

Two measurements against real `kda-serve` processes started here (or, for the reuse side, an already running
one given with --base-url):

1. --repeats conversations of --turns turns, each turn adding a user message of about --user-words words,
   greedy. Every turn goes to a server with the prefix cache and, right after, to one started with
   --no-prefix-caching, so both TTFTs of a turn (request sent -> first streamed token) see the same background
   load; the table gives per-turn medians. Also: prompt and cached tokens, and whether both servers gave the
   same replies (reuse must not change results).
2. --conversations conversations of --interleaved-turns turns, interleaved round-robin (turn 1 of every
   conversation, then turn 2 of every one, ...), so other conversations' states pass through the cache
   between two turns of one. Hit rate = cached prompt tokens / prompt tokens, against the ideal: the tokens
   the previous turn had already computed (its prompt and reply).

    python benchmarks/bench_multiturn.py [--device cpu|cuda] [--turns 10] [--user-words 120] [--out FILE]

Prints both tables, writes benchmarks/results/<device>-multiturn.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TOPICS = ["kernels", "recurrent states", "chunked prefill", "gating", "paged attention", "prefix caches",
          "schedulers", "tokenizers", "memory budgets", "benchmarks"]
WORDS = ("state chunk decay gate token model serve cache prefix kernel layer head value key query memory block "
         "slot batch step tile warp thread").split()


def user_message(rng: random.Random, turn: int, words: int) -> str:
    topic = TOPICS[turn % len(TOPICS)]
    return f"Turn {turn}: tell me about {topic}. Context: " + " ".join(rng.choice(WORDS) for _ in range(words))


class Server:
    """A `kda-serve` subprocess on a free loopback port."""

    def __init__(self, extra_args: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "kda_serving.server", "--port", str(self.port),
                                      "--log-level", "warning", *extra_args], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kda-serve {' '.join(extra_args)} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.close()
        raise RuntimeError("kda-serve did not start within 300 s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def chat_turn(client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed, greedy chat turn; returns reply, usage and TTFT."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    ttft, reply, usage = None, "", None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event["choices"]:
                if ttft is None:
                    ttft = time.perf_counter() - sent
                reply += event["choices"][0]["delta"].get("content", "")
            if event.get("usage"):
                usage = event["usage"]
    return {"reply": reply, "ttft_s": ttft, "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            "completion_tokens": usage["completion_tokens"]}


async def conversations_in_lockstep(reuse_url: str, scratch_url: str, repeats: int, turns: int, words: int,
                                    max_tokens: int) -> list[list[tuple[dict, dict]]]:
    """`repeats` conversations; each turn goes to the reuse server, then the same turn to the scratch server.

    Both servers run all along (the idle one only waits), so the two TTFTs of a turn are measured seconds apart
    under the same background load. Each server keeps its own history (greedy replies should be identical).
    """
    runs = []
    async with httpx.AsyncClient(base_url=reuse_url, timeout=600) as reuse, \
            httpx.AsyncClient(base_url=scratch_url, timeout=600) as scratch:
        model = (await reuse.get("/v1/models")).json()["data"][0]["id"]
        for client in (reuse, scratch):
            # A fresh process's first request pays one-time costs (allocation, lazy init): not turn 1's TTFT.
            await chat_turn(client, model, [{"role": "user", "content": "warm-up"}], 2)
        for r in range(repeats):
            rng = random.Random(7 + r)
            history = {id(reuse): [{"role": "system", "content": "You are a concise assistant."}]}
            history[id(scratch)] = list(history[id(reuse)])
            run = []
            for turn in range(1, turns + 1):
                message = {"role": "user", "content": user_message(rng, turn, words)}
                pair = []
                for client in (reuse, scratch):
                    history[id(client)].append(message)
                    out = await chat_turn(client, model, history[id(client)], max_tokens)
                    history[id(client)].append({"role": "assistant", "content": out["reply"]})
                    pair.append(out)
                run.append(tuple(pair))
            runs.append(run)
    return runs


async def interleaved(base_url: str, conversations: int, turns: int, words: int, max_tokens: int) -> dict:
    rngs = [random.Random(1000 + c) for c in range(conversations)]
    histories = [[{"role": "system", "content": f"You are assistant number {c}."}] for c in range(conversations)]
    prompt = cached = ideal = 0
    previous: list[dict | None] = [None] * conversations
    per_turn = []
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        for turn in range(1, turns + 1):
            turn_prompt = turn_cached = 0
            for c in range(conversations):  # one at a time: each turn sees the others' states in the cache
                histories[c].append({"role": "user", "content": user_message(rngs[c], turn, words)})
                out = await chat_turn(client, model, histories[c], max_tokens)
                histories[c].append({"role": "assistant", "content": out["reply"]})
                prompt += out["prompt_tokens"]
                cached += out["cached_tokens"]
                turn_prompt += out["prompt_tokens"]
                turn_cached += out["cached_tokens"]
                if previous[c] is not None:
                    ideal += min(previous[c]["prompt_tokens"] + previous[c]["completion_tokens"],
                                 out["prompt_tokens"] - 1)
                previous[c] = out
            per_turn.append({"turn": turn, "prompt_tokens": turn_prompt, "cached_tokens": turn_cached,
                             "hit_rate": turn_cached / turn_prompt})
        engine = {}
        for line in (await client.get("/metrics")).text.splitlines():
            if line.startswith("kda_serving_engine_prefix_cache") or line.startswith("kda_serving_engine_state_slots"):
                name, _, value = line.rpartition(" ")
                engine[name.removeprefix("kda_serving_engine_")] = float(value)
    return {"conversations": conversations, "turns": turns, "prompt_tokens": prompt, "cached_tokens": cached,
            "hit_rate": cached / prompt, "ideal_cached_tokens": ideal,
            "hit_rate_of_ideal": cached / ideal if ideal else None, "per_turn": per_turn, "engine_metrics": engine}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--base-url", default=None, help="measure reuse on this running server instead of starting one")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="conversations per server; TTFTs are their medians")
    p.add_argument("--user-words", type=int, default=120, help="words per user message (~1-2 tokens each)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--interleaved-turns", type=int, default=4)
    p.add_argument("--cpu-threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    server_args = ["--device", args.device]
    if args.model:
        server_args += ["--model", args.model]
    if args.device == "cpu":
        server_args += ["--cpu-threads", str(args.cpu_threads)]

    def start(extra: list[str]) -> Server | None:
        return None if args.base_url and not extra else Server(server_args + extra)

    reuse_server = start([])
    reuse_url = args.base_url if reuse_server is None else reuse_server.base_url
    scratch_server = start(["--no-prefix-caching"])
    try:
        runs = asyncio.run(conversations_in_lockstep(reuse_url, scratch_server.base_url, args.repeats, args.turns,
                                                     args.user_words, args.max_tokens))
    finally:
        scratch_server.close()
    turns = []
    print(f"median of {args.repeats} conversations")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT reuse s':>13} {'TTFT scratch s':>15} {'speed-up':>9}")
    for k in range(args.turns):
        pairs = [run[k] for run in runs]
        reuse_ttft = statistics.median(a["ttft_s"] for a, _ in pairs)
        scratch_ttft = statistics.median(b["ttft_s"] for _, b in pairs)
        row = {"turn": k + 1,
               "prompt_tokens": statistics.median(a["prompt_tokens"] for a, _ in pairs),
               "cached_tokens": statistics.median(a["cached_tokens"] for a, _ in pairs),
               "ttft_s_reuse": reuse_ttft, "ttft_s_no_reuse": scratch_ttft, "speedup": scratch_ttft / reuse_ttft,
               "runs": [{"prompt_tokens": a["prompt_tokens"], "cached_tokens": a["cached_tokens"],
                         "ttft_s_reuse": a["ttft_s"], "ttft_s_no_reuse": b["ttft_s"],
                         "same_reply": a["reply"] == b["reply"]} for a, b in pairs]}
        turns.append(row)
        print(f"{k + 1:>4} {row['prompt_tokens']:>7.0f} {row['cached_tokens']:>7.0f} {reuse_ttft:>13.3f} "
              f"{scratch_ttft:>15.3f} {row['speedup']:>8.2f}x")
    identical = all(r["same_reply"] for t in turns for r in t["runs"])
    print(f"replies identical with and without reuse: {identical}")

    def run_on_reuse(job):
        if reuse_server is None:
            return asyncio.run(job(reuse_url))
        try:
            return asyncio.run(job(reuse_url))
        finally:
            reuse_server.close()

    mixed = run_on_reuse(lambda url: interleaved(url, args.conversations, args.interleaved_turns, args.user_words,
                                               args.max_tokens))
    print(f"\ninterleaved: {args.conversations} conversations x {args.interleaved_turns} turns: hit rate "
          f"{mixed['hit_rate']:.3f} of all prompt tokens, {mixed['hit_rate_of_ideal']:.3f} of the reusable ones")

    import torch

    payload = {
        "benchmark": "multiturn",
        "device": args.device,
        "machine": {"cpu_count": os.cpu_count(), "load_average_1m_at_end": os.getloadavg()[0],
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                    "server_cpu_threads": args.cpu_threads if args.device == "cpu" else None},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "single_conversation": {"turns": turns, "identical_replies": identical},
        "interleaved": mixed,
    }
    out = args.out or RESULTS / f"{args.device.split(':')[0]}-multiturn.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

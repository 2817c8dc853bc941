"""Why the GPU multi-turn benchmark's cache-on and cache-off tokens differ (experiment helper, --device cuda).

Runs bench_engine's one-conversation scenario on the 4-layer Kimi-Linear-48B-shaped model with greedy
decoding and the top-2 log-probabilities reported, and at every turn prints where the two engines' tokens
first differ and, there, each engine's gap between its best and second-best token. Rounding can only flip a
near-tie (gaps of a few hundredths of a nat); a wrong restored state or KV block would show as a divergence
at a clear choice, or as a log-probability difference of whole nats at positions before the divergence.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_engine import KIMI48B, make_engine, prompts, random_kimi48b_model  # noqa: E402

from kda_serving.engine import SamplingParams  # noqa: E402


def generate(engine, tokens, params, request_id):
    """Greedy tokens, their log-probabilities and the top-2 at each step (updates are deltas)."""
    engine.add_request(request_id, tokens, params)
    toks, lps, tops = [], [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            toks += out.new_token_ids
            lps += out.logprobs
            tops += out.top_logprobs
    return toks, lps, tops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--user-tokens", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=32)
    args = ap.parse_args()
    eng_args = argparse.Namespace(device="cuda", max_num_seqs=8, max_num_batched_tokens=8192, block_size=16,
                                  no_cuda_graphs=False, kda_state_dtype="float32", cpu_cache_mib=0)
    model = random_kimi48b_model(torch.device("cuda"))
    sizes = dict(num_kv_blocks=2048, num_state_slots=64)
    on = make_engine(eng_args, model, None, enable_prefix_caching=True, **sizes)
    off = make_engine(eng_args, model, None, enable_prefix_caching=False, **sizes)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, logprobs=2,
                            output_kind="delta")
    users = prompts(args.turns, args.user_tokens, KIMI48B["vocab_size"], seed=7)
    conv = []
    for turn in range(args.turns):
        conv = conv + users[turn]
        tok_on, lp_on, top_on = generate(on, conv, params, f"on-{turn}")
        tok_off, lp_off, top_off = generate(off, conv, params, f"off-{turn}")
        first = next((i for i, (a, b) in enumerate(zip(tok_on, tok_off)) if a != b), None)
        upto = len(tok_on) if first is None else first  # same tokens in the same context before `first`
        diff = max((abs(a - b) for a, b in zip(lp_on[:upto], lp_off[:upto])), default=0.0)
        line = f"turn {turn + 1}: prompt {len(conv)}, max |logprob on - off| over the shared positions {diff:.4f}"
        if first is None:
            print(line + f"; all {len(tok_on)} tokens equal")
        else:
            def gap(top):
                best = sorted(top.values(), reverse=True)
                return best[0] - best[1]
            print(line + f"; first difference at token {first}: gap best - second {gap(top_on[first]):.4f} "
                  f"(cache on) / {gap(top_off[first]):.4f} (cache off)")
        conv = conv + tok_on


if __name__ == "__main__":
    main()

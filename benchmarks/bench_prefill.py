"""KDA prefill: our SM90 kernel against flash-linear-attention's chunk_kda, in the same process.

Cases of issue 3: H in {96, 64, 32} x {fixed 8192, varlen [1300, 547, 2048, 963, 271, 3063], varlen 1024x8,
varlen 256x32}, H=32 fixed 32768, and the softplus gate on H=32 fixed 8192 / 1024x8. Ours runs with bf16
initial and final states (dense), lower_bound -5 unless the case says softplus; fla with
use_gate_in_kernel / use_qk_l2norm_in_kernel / use_beta_sigmoid_in_kernel, fp32 state in and out. Also:
state-pool mode against dense mode, and the cost of one checkpoint per 1024 tokens.

    python benchmarks/bench_prefill.py [--out-dir DIR] [--no-fla] [--warps-sweep]

Prints a table, writes <out-dir>/<card>-prefill.json and <card>-prefill.png (speedup over fla).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, bar_chart, card_name, copy_rate_bytes_per_s, environment, time_ms, write_json  # noqa: E402

from kda_serving.ops import cuda_lib  # noqa: E402

D = 128
MIXED = [1300, 547, 2048, 963, 271, 3063]


def cases():
    out = []
    for H in (96, 64, 32):
        out += [
            (f"H{H} fixed 8192", H, [8192], False, -5.0),
            (f"H{H} varlen mixed6", H, MIXED, True, -5.0),
            (f"H{H} varlen 1024x8", H, [1024] * 8, True, -5.0),
            (f"H{H} varlen 256x32", H, [256] * 32, True, -5.0),
        ]
    out += [
        ("H32 fixed 32768", 32, [32768], False, -5.0),
        ("H32 fixed 8192 softplus", 32, [8192], False, None),
        ("H32 varlen 1024x8 softplus", 32, [1024] * 8, True, None),
    ]
    return out


# Pool mode against dense mode, and pool mode with one checkpoint per 1024 tokens.
MODE_CASES = [("H32 varlen 1024x8", 32, [1024] * 8, True), ("H64 fixed 8192", 64, [8192], False),
              ("H96 varlen mixed6", 96, MIXED, True)]
MODE_ROUNDS = 5


def make_problem(H, lens, varlen):
    T = sum(lens)
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda").to(torch.bfloat16)  # noqa: E731
    p = dict(q=r(1, T, H, D), k=r(1, T, H, D), v=r(1, T, H, D), g=r(1, T, H, D), beta=r(1, T, H),
             A_log=torch.rand(H, generator=gen, device="cuda"), dt_bias=torch.randn(H, D, generator=gen, device="cuda"))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda", dtype=torch.int64)
    p["cu"] = cu if varlen else None
    p["N"] = len(lens)
    return p


def ours_fn(p, lower_bound, mode="dense", checkpoints=None):
    N, H = p["N"], p["q"].shape[2]
    out = torch.empty_like(p["v"])
    args = (p["q"], p["k"], p["v"], p["g"], p["beta"], p["A_log"], p["dt_bias"], D**-0.5, lower_bound, p["cu"])
    if mode == "dense":
        S0 = torch.randn(N, H, D, D, device="cuda").to(torch.bfloat16)
        S1 = torch.empty_like(S0)
        return lambda: cuda_lib.prefill(*args, S0, S1, None, None, None, None, None, None, out)
    pool = torch.randn(2 * N + 64, H, D, D, device="cuda").to(torch.bfloat16)
    idx = torch.randperm(N, device="cuda") * 2
    ck = checkpoints if checkpoints is not None else (None, None, None)
    return lambda: cuda_lib.prefill(*args, None, None, pool, idx, None, *ck, out)


def checkpoints_every(lens, every, N):
    """One checkpoint per `every` tokens of each sequence, into slots 2n+1 and beyond 2N."""
    seq, pos = [], []
    for n, length in enumerate(lens):
        for p in range(every, length + 1, every):
            seq.append(n)
            pos.append(p)
    slots = torch.arange(len(seq)) + 2 * N
    if not seq:
        return None
    t = lambda x: torch.tensor(x, device="cuda", dtype=torch.int64)  # noqa: E731
    return t(seq), t(pos), slots.cuda()


def fla_fn(p, lower_bound):
    from fla.ops.kda import chunk_kda

    N, H = p["N"], p["q"].shape[2]
    h0 = torch.randn(N, H, D, D, device="cuda")
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
              use_beta_sigmoid_in_kernel=True, A_log=p["A_log"], dt_bias=p["dt_bias"].reshape(-1),
              cu_seqlens=p["cu"])
    if lower_bound is not None:
        kw.update(safe_gate=True, lower_bound=lower_bound)
    return lambda: chunk_kda(p["q"], p["k"], p["v"], p["g"], p["beta"], scale=D**-0.5, **kw)


def floor_ms(H, lens, rate):
    T, N = sum(lens), len(lens)
    act = 5 * T * H * D * 2 + T * H * 2  # q, k, v, g in, out; beta
    states = 2 * N * H * D * D * 2  # bf16 state in and out
    return (act + states) / rate * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--warps-sweep", action="store_true",
                    help="also time every warps-per-CTA variant of the two-pass kernel")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--profile", action="store_true", help="print the per-kernel split (torch.profiler)")
    ap.add_argument("--only", nargs="*", default=None, help="run only cases whose name contains one of these")
    ap.add_argument("--no-modes", action="store_true", help="skip the pool / checkpoint measurements")
    args = ap.parse_args(argv)

    rate = copy_rate_bytes_per_s()
    print(f"copy rate {rate / 1e12:.2f} TB/s (read + write)")
    card = card_name()
    out_dir = Path(args.out_dir)
    rows, extras = [], []

    def save(complete: bool) -> None:  # after every case, so a run cut short still leaves its numbers
        write_json(out_dir / f"{card}-prefill.json", dict(env=environment(), copy_rate_Bps=rate, complete=complete,
                                                            cases=rows, modes=extras))

    with torch.inference_mode():
        for name, H, lens, varlen, lb in cases():
            if args.only and not any(o in name for o in args.only):
                continue
            p = make_problem(H, lens, varlen)
            row = dict(case=name, H=H, lens=lens if len(lens) <= 8 else f"{lens[0]}x{len(lens)}",
                       lower_bound=lb, warps=cuda_lib.default_warps(p["N"], H))
            row["ours_ms"] = time_ms(ours_fn(p, lb), iters=args.iters)
            if args.warps_sweep:
                for w in ("1", "2", "4", "8"):
                    os.environ[cuda_lib.WARPS_ENV] = w
                    row[f"ours_w{w}_ms"] = time_ms(ours_fn(p, lb), iters=args.iters)
                os.environ.pop(cuda_lib.WARPS_ENV)
            if not args.no_fla:
                try:
                    row["fla_ms"] = time_ms(fla_fn(p, lb), iters=args.iters)
                except Exception as e:  # fla missing or failing: report, keep our numbers
                    print(f"fla failed on {name}: {type(e).__name__}: {e}")
                    row["fla_ms"] = None
            row["floor_ms"] = floor_ms(H, lens, rate)
            row["pct_of_floor"] = 100 * row["floor_ms"] / row["ours_ms"]
            if row.get("fla_ms"):
                row["speedup"] = row["fla_ms"] / row["ours_ms"]
            rows.append(row)
            print(row, flush=True)
            save(False)
            del p
            torch.cuda.empty_cache()

        for name, H, lens, varlen in [] if args.no_modes else MODE_CASES:
            p = make_problem(H, lens, varlen)
            ck = checkpoints_every(lens, 1024, p["N"])
            fns = (ours_fn(p, -5.0), ours_fn(p, -5.0, mode="pool"), ours_fn(p, -5.0, mode="pool", checkpoints=ck))
            # The modes differ by ~1%, less than the drift of one GPU over a few seconds: time them in
            # interleaved rounds and keep each mode's median round.
            rounds = [[time_ms(fn, iters=args.iters) for fn in fns] for _ in range(MODE_ROUNDS)]
            dense, pool, pool_ck = (statistics.median(r[i] for r in rounds) for i in range(3))
            extras.append(dict(case=name, dense_ms=dense, pool_ms=pool, pool_ckpt1024_ms=pool_ck,
                               pool_over_dense=pool / dense, ckpt_over_pool=pool_ck / pool))
            print(extras[-1], flush=True)
            save(False)
            del p
            torch.cuda.empty_cache()

        if args.profile:
            for name, H, lens, varlen, warps in (("H96 fixed 8192", 96, [8192], False, "8"),
                                                 ("H32 fixed 8192", 32, [8192], False, "2")):
                p = make_problem(H, lens, varlen)
                os.environ[cuda_lib.WARPS_ENV] = warps
                fn = ours_fn(p, -5.0)
                fn()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        fn()
                    torch.cuda.synchronize()
                os.environ.pop(cuda_lib.WARPS_ENV)
                print(f"--- {name}, {warps} warps: per-kernel CUDA time (5 calls)")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6))
                del p

    print(f"\n{card}: KDA prefill, ms (median), bf16, D=128")
    print(f"{'case':32s} {'ours':>8s} {'fla':>8s} {'speedup':>8s} {'floor':>7s} {'%floor':>7s} {'warps':>5s}")
    for r in rows:
        fla = f"{r['fla_ms']:.3f}" if r.get("fla_ms") else "-"
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        print(f"{r['case']:32s} {r['ours_ms']:8.3f} {fla:>8s} {sp:>8s} {r['floor_ms']:7.3f} {r['pct_of_floor']:6.1f}% "
              f"{r['warps']:5d}")
        sweep = {k[len("ours_"):-len("_ms")]: v for k, v in r.items() if k.startswith("ours_w")}
        if sweep:  # --warps-sweep: every CTA shape, fastest first
            print("    " + "  ".join(f"{k} {v:.3f}" for k, v in sorted(sweep.items(), key=lambda kv: kv[1])))
    for e in extras:
        print(f"{e['case']:32s} dense {e['dense_ms']:.3f}  pool {e['pool_ms']:.3f} ({100 * (e['pool_over_dense'] - 1):+.1f}%)"
              f"  pool+ckpt/1024 {e['pool_ckpt1024_ms']:.3f} ({100 * (e['ckpt_over_pool'] - 1):+.1f}%)")
    save(True)
    with_fla = [r for r in rows if r.get("speedup")]
    if with_fla:
        bar_chart(out_dir / f"{card}-prefill.png", [r["case"] for r in with_fla], [r["speedup"] for r in with_fla],
                  title=f"KDA prefill speedup over fla chunk_kda ({card})", ylabel="x faster than fla", target=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

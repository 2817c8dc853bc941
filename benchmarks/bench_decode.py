"""KDA decode step: our CUDA kernel against flash-linear-attention's fused_recurrent_kda, in the same process.

Cases of issue 4: H in {32, 96} x N in {1, 8, 64, 256} sequences x fp32 / bf16 state pool, one token per
sequence, Kimi-Linear-48B's softplus gate, states read and written in place through state_indices. Both
kernels are timed per step by CUDA-graph replay: one graph holds R consecutive steps, each on its own set of
pool slots in a random order, as a model's decode graph runs its layers: R = 20, the KDA layers of
Kimi-Linear-48B, or more (at most 64) where R * state bytes must reach 2.5x L2 so that the states come from
HBM. fla runs `fused_recurrent_kda_fwd` in its in-place pool mode (what vLLM calls) with the state in the
same [V, K] layout; its eager call is timed too, as in ../shared/reference/anchors.md.

Ours runs twice per case, in the same graph setup: in batch order (the slots as given) and with the visit
order an engine passes (ops.slot_visit_order: the CTAs take the sequences by increasing slot, the results
bit-identical; docs/decode-kernel.md, "Visit order").

floor = state bytes read + written / the measured device copy rate. Target: floor / ours >= 0.85 at N >= 64,
ours < 10 us at N = 1.

    python benchmarks/bench_decode.py [--out-dir DIR] [--no-fla] [--heads 32 96] [--batch 1 8 64 256]

Prints a table, writes <out-dir>/<card>-decode.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, card_name, copy_rate_bytes_per_s, environment, time_ms, write_json  # noqa: E402

from kda_serving.ops import slot_visit_order  # noqa: E402  (also registers torch.ops.kda_serving.*)

D = 128
SCALE = D**-0.5
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODEL_KDA_LAYERS = 20  # Kimi-Linear-48B: linear_attn_config.kda_layers
MAX_GRAPH_STEPS = 64


def make_step(N, H, gen):
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda").to(torch.bfloat16)  # noqa: E731
    return dict(q=r(N, 1, H, D), k=r(N, 1, H, D), v=r(N, 1, H, D), g=r(N, 1, H, D), beta=r(N, 1, H),
                A_log=torch.rand(H, generator=gen, device="cuda"),
                dt_bias=torch.randn(H, D, generator=gen, device="cuda"))


def ours_call(s, pool, slots, out, visit=None):
    return lambda: torch.ops.kda_serving.kda_decode_(s["q"], s["k"], s["v"], s["g"], s["beta"], s["A_log"],
                                                     s["dt_bias"], SCALE, None, pool, slots, None, out, visit)


def fla_call(s, pool, slots, out):
    from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd

    return lambda: fused_recurrent_kda_fwd(
        q=s["q"], k=s["k"], v=s["v"], g=s["g"], beta=s["beta"], A_log=s["A_log"], dt_bias=s["dt_bias"],
        scale=SCALE, initial_state=pool, inplace_final_state=True, ssm_state_indices=slots,
        use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, lower_bound=None,
        state_v_first=True, out=out)


def graph_us_per_step(make_fn, reps: int) -> float:
    """Per-step microseconds of a graph of `reps` steps, step r built by make_fn(r)."""
    fns = [make_fn(r) for r in range(reps)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles, our library loads) outside the capture
        for fn in fns[:2]:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return time_ms(graph.replay, warmup=5, iters=30) * 1e3 / reps


def make_case(H, N, state, l2_bytes):
    """One case's inputs: (step inputs, pool, slot set of each of the R graph steps, out, state bytes a step)."""
    dtype = STATE_DTYPES[state]
    state_bytes = N * H * D * D * dtype.itemsize
    reps = min(MAX_GRAPH_STEPS, max(MODEL_KDA_LAYERS, -(-int(2.5 * l2_bytes) // state_bytes)))
    gen = torch.Generator(device="cuda").manual_seed(N * 1000 + H)
    step = make_step(N, H, gen)
    pool = torch.empty(reps * N, H, D, D, dtype=dtype, device="cuda").normal_(0.0, 0.1, generator=gen)
    slot_sets = [(torch.randperm(N, generator=gen, device="cuda") + r * N).to(torch.int32) for r in range(reps)]
    return step, pool, slot_sets, torch.empty_like(step["v"]), state_bytes


def run_case(H, N, state, copy_rate, l2_bytes, with_fla):
    step, pool, slot_sets, out, state_bytes = make_case(H, N, state, l2_bytes)
    reps = len(slot_sets)
    row = dict(H=H, N=N, state=state, graph_steps=reps, state_mb=state_bytes / 2**20)
    row["floor_us"] = 2 * state_bytes / copy_rate * 1e6
    row["ours_graph_us"] = graph_us_per_step(lambda r: ours_call(step, pool, slot_sets[r], out), reps)
    row["ours_eager_us"] = time_ms(ours_call(step, pool, slot_sets[0], out)) * 1e3
    row["floor_frac"] = row["floor_us"] / row["ours_graph_us"]
    visits = [slot_visit_order(slots) for slots in slot_sets]
    row["ours_visit_graph_us"] = graph_us_per_step(
        lambda r: ours_call(step, pool, slot_sets[r], out, visits[r]), reps)
    row["visit_floor_frac"] = row["floor_us"] / row["ours_visit_graph_us"]
    if with_fla:
        # Same function? One step of each from the same states (fla's bf16 state rounds like ours).
        ref_pool, fla_pool = pool[:N].clone(), pool[:N].clone()
        idx = torch.arange(N, device="cuda", dtype=torch.int32)
        o_ours, o_fla = torch.empty_like(out), torch.empty_like(out)
        ours_call(step, ref_pool, idx, o_ours)()
        fla_call(step, fla_pool, idx, o_fla)()
        diff = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
        row["vs_fla_out_rel"], row["vs_fla_state_rel"] = diff(o_ours, o_fla), diff(ref_pool, fla_pool)
        fla_slots = [s.to(torch.int64) for s in slot_sets]
        row["fla_graph_us"] = graph_us_per_step(lambda r: fla_call(step, pool, fla_slots[r], out), reps)
        row["fla_eager_us"] = time_ms(fla_call(step, pool, fla_slots[0], out)) * 1e3
        row["speedup_graph"] = row["fla_graph_us"] / row["ours_graph_us"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--heads", type=int, nargs="+", default=[32, 96])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--states", nargs="+", default=list(STATE_DTYPES), choices=list(STATE_DTYPES),
                    help="state pool dtypes (experiments; the committed results run both)")
    args = ap.parse_args(argv)

    copy_rate = copy_rate_bytes_per_s()
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"copy rate {copy_rate / 1e12:.2f} TB/s (read + write), L2 {l2_bytes / 2**20:.0f} MB")
    rows = []
    for state in args.states:
        for H in args.heads:
            for N in args.batch:
                torch.cuda.empty_cache()  # the previous case's pools (up to 32 GB) go back before the next
                rows.append(run_case(H, N, state, copy_rate, l2_bytes, not args.no_fla))
                r = rows[-1]
                fla = (f"fla graph {r['fla_graph_us']:8.1f} eager {r['fla_eager_us']:7.1f}  x{r['speedup_graph']:.2f}"
                       f"  diff {r['vs_fla_out_rel']:.1e}") if "fla_graph_us" in r else ""
                print(f"{state} H{H:3d} N{N:4d}: ours graph {r['ours_graph_us']:8.2f} us "
                      f"({100 * r['floor_frac']:5.1f}%) by slot {r['ours_visit_graph_us']:8.2f} "
                      f"({100 * r['visit_floor_frac']:5.1f}%) eager "
                      f"{r['ours_eager_us']:7.1f}  floor {r['floor_us']:8.2f}  {fla}", flush=True)
    payload = dict(benchmark="kda decode step", environment=environment(), copy_rate_tb_s=copy_rate / 1e12,
                   gate="softplus (lower_bound None)", timing="median of 30 CUDA-graph replays / steps per graph",
                   rows=rows)
    write_json(Path(args.out_dir) / f"{card_name()}-decode.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared benchmark helpers: event timing, the measured copy rate (bandwidth floor), the card name, JSON and a
bar chart. Used by every benchmarks/bench_*.py; needs a CUDA GPU."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def card_name() -> str:
    """Short lower-case name of the GPU for result files: 'h100', 'h200', else the name with spaces dashed."""
    name = torch.cuda.get_device_name().lower()
    for known in ("h200", "h100", "h20", "a100", "b200"):
        if known in name:
            return known
    return name.replace(" ", "-")


def time_ms(fn, *, warmup: int = 10, iters: int = 50) -> float:
    """Median milliseconds of fn() over `iters` event-timed runs, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def gpu_ms(fn, n: int = 10) -> float:
    """GPU milliseconds per call with the host queued ahead of the GPU, as between a model's layers: a ~100 ms
    sleep kernel holds the GPU while the host queues n calls, and events time the calls alone (time_ms instead
    times each call from an idle GPU, so it shows the host's time where that is longer)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(200_000_000)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def graph_replay_us(fn, *, iters: int = 50) -> float:
    """Median microseconds of one replay of a CUDA graph of fn(), warmed up on a side stream first (as capture
    wants: lazy initialisation and allocator warm-up happen outside the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, warmup=5, iters=iters) * 1e3


def host_us(fn, n: int = 100) -> float:
    """Host microseconds per call of fn(), n calls queued without waiting for the device (drained before and
    after), after 5 warm-up calls."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    spent = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return spent


def weight_bytes(model, tokens: int, experts_touched: float) -> float:
    """Bytes of weights a step of `tokens` tokens reads: every weight but the embedding table (a row per token)
    and the routed experts (the share `experts_touched` of them)."""
    total = 0.0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name == "embed_tokens":
            nbytes = tokens * p.shape[1] * p.element_size()
        elif (name.endswith(("mlp.gate_up_proj", "mlp.down_proj")) and p.dim() == 3) or name.endswith(
                ("mlp.gate_up_proj_scale", "mlp.down_proj_scale")):  # routed experts (fp8: and their scales)
            nbytes *= experts_touched
        total += nbytes
    return total


def gemm_rate_flops_per_s(n: int = 8192) -> float:
    """bf16 dense GEMM rate of this card, measured: an n x n x n matmul."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / (time_ms(lambda: a @ b, warmup=5, iters=20) / 1e3)


def copy_rate_bytes_per_s(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (the bandwidth a floor divides by)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=5, iters=20)
    return 2 * nbytes / (ms * 1e-3)


def environment() -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu": torch.cuda.get_device_name(),
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def bar_chart(path: Path, labels: list[str], values: list[float], *, title: str, ylabel: str,
              target: float | None = None) -> None:
    """Horizontal-label bar chart (PNG); `target` draws a dashed reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(labels)), 4.5))
    ax.bar(range(len(values)), values, color="#3b7dd8")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")

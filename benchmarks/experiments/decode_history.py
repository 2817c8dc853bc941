"""Experiment (not CI): why does the bf16 H32 N64 decode step time depend on the cases run before it?

Times the case (and the device copy rate just before it) fresh, right after a heavy case (fp32 H96 N256),
after that plus torch.cuda.empty_cache() (allocator history), and after that plus a pause (clocks, power),
printing the SM and memory clocks NVML reports before each.

    python benchmarks/experiments/decode_history.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_decode import run_case  # noqa: E402
from common import copy_rate_bytes_per_s  # noqa: E402

import kda_serving.ops  # noqa: E402,F401

try:
    import pynvml
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    def clocks():
        return (f"sm {pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)} MHz "
                f"mem {pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)} MHz "
                f"{pynvml.nvmlDeviceGetPowerUsage(handle) / 1000:.0f} W "
                f"{pynvml.nvmlDeviceGetTemperature(handle, 0)} C")
except Exception as exc:  # noqa: BLE001
    no_nvml = f"(no nvml: {exc})"
    clocks = lambda: no_nvml  # noqa: E731

copy_rate = copy_rate_bytes_per_s()
l2 = torch.cuda.get_device_properties(0).L2_cache_size


def case(label, H=32, N=64, state="bf16"):
    before = clocks()
    rate_now = copy_rate_bytes_per_s()  # the copy rate in the state the case meets (a fresh 2 GB buffer pair)
    r = run_case(H, N, state, copy_rate, l2, False)
    print(f"{label:40s} {state} H{H} N{N}: {r['ours_graph_us']:7.2f} us ({100 * r['floor_frac']:.1f}%)  "
          f"copy rate just before {rate_now / 1e12:.2f} TB/s  [{before}]", flush=True)


case("fresh")
case("fresh again")
case("heavy", 96, 256, "fp32")
case("after heavy")
case("after heavy, again")
torch.cuda.empty_cache()
case("after empty_cache")
case("heavy", 96, 256, "fp32")
time.sleep(3)
case("after heavy + 3 s pause")
case("heavy", 32, 256, "fp32")
torch.cuda.empty_cache()
time.sleep(3)
case("after heavy + empty_cache + pause")
case("bf16 H32 N256 now", 32, 256)

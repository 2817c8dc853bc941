"""Build csrc/ into one C-ABI shared library, kda_serving/_lib/libkda_serving.so.

The library depends on neither Python nor torch: kernels take raw pointers and a cudaStream_t, and
kda_serving/ops/cuda_lib.py loads it with ctypes. One build serves every Python and torch version, compiles
on a machine without a GPU, and a kernel change does not rebuild anything else (docs/build.md).

Each .cu file compiles to its own object in parallel (instantiations are split across files for this), and
only files newer than their object (or than any header under csrc/) are rebuilt.

    python csrc/build.py [--out DIR] [--build-dir DIR] [--jobs N] [--arch 90a] [--verbose]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LIB_NAME = "libkda_serving.so"


def cutlass_include() -> Path:
    """CUTLASS/CuTe headers: $CUTLASS_INCLUDE_DIR, else the pinned nvidia-cutlass package."""
    env = os.environ.get("CUTLASS_INCLUDE_DIR")
    if env:
        return Path(env)
    try:
        import cutlass_library  # from the nvidia-cutlass package
    except ImportError as e:
        raise SystemExit(
            "build.py: CUTLASS headers not found: pip install nvidia-cutlass==4.2.0.0 or set CUTLASS_INCLUDE_DIR"
        ) from e
    inc = Path(cutlass_library.__file__).parent / "source" / "include"
    if not (inc / "cute" / "tensor.hpp").exists():
        raise SystemExit(f"build.py: {inc} holds no CuTe headers")
    return inc


def nvcc_path() -> str:
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if not Path(nvcc).exists():
        raise SystemExit("build.py: nvcc not found on PATH or in $CUDA_HOME/bin")
    return str(nvcc)


def sources() -> list[Path]:
    return sorted(p for p in HERE.rglob("*.cu") if "build" not in p.relative_to(HERE).parts)


def newest_header() -> float:
    heads = [p for ext in ("*.h", "*.cuh", "*.hpp") for p in HERE.rglob(ext)]
    return max((p.stat().st_mtime for p in heads), default=0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "kda_serving" / "_lib"))
    ap.add_argument("--build-dir", default=str(HERE / "build"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--arch", default="90a")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=VALUE",
                    help="extra preprocessor definition (experiment variants; use with its own --build-dir)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    nvcc, inc = nvcc_path(), cutlass_include()
    build, out = Path(args.build_dir), Path(args.out)
    build.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    flags = [
        "-std=c++17", "-O3", "--use_fast_math", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
        f"-gencode=arch=compute_{args.arch},code=sm_{args.arch}", "-lineinfo",
        f"-I{HERE}", f"-I{inc}", "-DNDEBUG", "-Xptxas=-v" if args.verbose else "-Xptxas=-O3",
        *(f"-D{d}" for d in args.define),
    ]
    srcs = sources()
    if not srcs:
        raise SystemExit("build.py: no .cu sources under csrc/")
    header_time = newest_header()

    def compile_one(src: Path) -> Path:
        obj = build / (src.relative_to(HERE).as_posix().replace("/", "__") + ".o")
        if obj.exists() and obj.stat().st_mtime > max(src.stat().st_mtime, header_time):
            return obj
        cmd = [nvcc, *flags, "-c", str(src), "-o", str(obj)]
        print("[build]", " ".join(cmd) if args.verbose else f"nvcc {src.relative_to(ROOT)}", flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.stdout or res.stderr:
            print(res.stdout + res.stderr, flush=True)
        if res.returncode != 0:
            raise SystemExit(f"build.py: compiling {src} failed")
        return obj

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        objs = list(pool.map(compile_one, srcs))
    lib = out / LIB_NAME
    cmd = [nvcc, "-shared", "-cudart=static", f"-gencode=arch=compute_{args.arch},code=sm_{args.arch}",
           *map(str, objs), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stdout + res.stderr)
        raise SystemExit("build.py: linking failed")
    print(f"[build] wrote {lib}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

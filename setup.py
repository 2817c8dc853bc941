"""Packaging. Metadata lives in pyproject.toml; this file only adds the optional CUDA build.

`pip install .` always installs the pure-Python package (CPU reference path). Where nvcc is present and a GPU
is visible (or KDA_SERVING_CUDA=1), it also builds csrc/ into kda_serving/_lib/libkda_serving.so through
csrc/build.py: a plain C-ABI library, so it needs no torch at build time (docs/build.md). KDA_SERVING_CUDA=0
skips it. On a machine without network use `pip install --no-build-isolation .`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def want_cuda() -> bool:
    flag = os.environ.get("KDA_SERVING_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    if shutil.which("nvcc") is None:
        return False
    smi = shutil.which("nvidia-smi")
    return smi is not None and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


class BuildWithCuda(build_py):
    def run(self):
        if want_cuda():
            subprocess.check_call([sys.executable, str(ROOT / "csrc" / "build.py"), "--out", str(ROOT / "kda_serving" / "_lib")])
        super().run()


setup(cmdclass={"build_py": BuildWithCuda})

# Sourced by the GPU-machine drivers (device_check.sh, experiments/variants.sh) from the repository root:
# installs the carried wheels and sets OUT, PYTHONPATH (fla off) and WITH_FLA (fla on).
OUT="${OUT:-$PWD/device-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
install_wheels() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}" \
  || { echo "wheel install failed"; exit 1; }; }
install_wheels /tmp/site .whl/*.whl
install_wheels /tmp/site-fla .whl/fla/*.whl
# fla stays off the path except where it is the baseline or the subject: installed, transformers' kimi_linear
# would route even its CPU reference forward through fla's Triton kernels.
export PYTHONPATH=/tmp/site:$PWD
WITH_FLA=/tmp/site-fla:/tmp/site:$PWD

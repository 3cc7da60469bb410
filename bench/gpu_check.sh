#!/usr/bin/env bash
# Issue 12, call 1 on a lent GPU (docs/GPU_RUN.md): make the carried packages importable, record the
# GPU, then bench/gpu_check.py (arguments pass through; --tiny rehearses it on CPU here).
#   device `run`: carry [".whl", "bench/.cache/gpu-carry"], timeout_s 600, command:
#   bash bench/gpu_check.sh --wallpaper-dir bench/.cache/gpu-carry/wallpapers
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
# Only what this interpreter lacks comes from .whl/ (lmdb, PyTurboJPEG, pytest, psutil), into /tmp/site.
missing=$("$py" - <<'PY'
import importlib.util
names = {"lmdb": "lmdb", "turbojpeg": "PyTurboJPEG", "pytest": "pytest", "psutil": "psutil"}
print(" ".join(pkg for mod, pkg in names.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu_check: installing carried $missing" >&2
  "$py" -m pip install -q --no-index --no-compile --no-cache-dir --find-links .whl --target /tmp/site \
    $missing || { echo "gpu_check: carried wheels did not install ($missing): see docs/GPU_RUN.md" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .whl/lib ] && export LD_LIBRARY_PATH=$PWD/.whl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1
# train's native decoder (train/data/native/decode_native.c) is a build output, not carried: build it here when a C
# compiler and libjpeg's headers exist (optional: train falls back to its pure-Python decoder).
"$py" setup.py -q build_ext --inplace >"$out/build_ext.log" 2>&1 || true
"$py" -c "from train.data.decode import backend; print('gpu_check: train decode backend:', backend())" 2>&1 \
  | tee "$out/decode_backend.txt"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu \
    --format=csv | tee "$out/nvidia-smi.csv"
fi
"$py" bench/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"

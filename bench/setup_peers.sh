#!/usr/bin/env bash
# Peer loaders for bench/loader.py's optional baselines, in their own venv (never the project's:
# FFCV pins nothing, drags in opencv-python and numba, and DALI ships its own libjpeg-turbo).
#   FFCV 1.0.2 (built from source against the system OpenCV and libturbojpeg; plus Pillow, which
#   it imports without declaring it)
#   NVIDIA DALI's CPU pipeline (nvidia-dali-cuda120; runs without a GPU with device_id=None)
# Usage: bash bench/setup_peers.sh [VENV]   (default bench/.peers-venv; PYTHON=python3.11 to pick
# the interpreter, TORCH_SPEC to change the torch pin). Idempotent: rerun it, it checks and skips.
# A peer that cannot install is reported on one line and skipped; the exit status is 0 when at
# least FFCV works, 1 otherwise (bench/loader.py then skips the peers with one line).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-$here/.peers-venv}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
ffcv_spec=${FFCV_SPEC:-ffcv==1.0.2}
dali_spec=${DALI_SPEC:-nvidia-dali-cuda120}
log_dir=$venv/setup-logs
say() { echo "setup_peers: $*"; }

# FFCV's setup.py asks pkg-config for opencv4 and libturbojpeg and compiles C++ against them.
have_build_deps() {
  command -v pkg-config >/dev/null && command -v c++ >/dev/null &&
    pkg-config --exists opencv4 && pkg-config --exists libturbojpeg
}
if have_build_deps; then
  say "system build deps: ok (pkg-config, c++, opencv4 $(pkg-config --modversion opencv4), libturbojpeg $(pkg-config --modversion libturbojpeg))"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  say "system build deps: installing libopencv-dev libturbojpeg0-dev pkg-config g++ with apt"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    libopencv-dev libturbojpeg0-dev pkg-config g++ >/dev/null || say "system build deps: apt-get failed"
else
  say "system build deps: missing; install libopencv-dev libturbojpeg0-dev pkg-config and a C++ compiler (FFCV will not build)"
fi

if [ -x "$venv/bin/python" ]; then
  say "venv: reusing $venv"
else
  "$python" -m venv "$venv" || { say "venv: '$python -m venv $venv' failed"; exit 1; }
  say "venv: created $venv ($("$venv/bin/python" --version))"
fi
mkdir -p "$log_dir"
py=$venv/bin/python
# --isolated: ignore machine-wide pip config (a find-links dir with a CPU-only torch, constraints);
# pip's own cache stays on, so a wheel already downloaded for the project's venv is reused.
pip_install() { "$py" -m pip install --isolated -q "$@"; }

if "$py" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '${torch_spec#torch==}')" 2>/dev/null; then
  say "torch: ok ($("$py" -c 'import torch; print(torch.__version__)'))"
elif pip_install "$torch_spec" >"$log_dir/torch.log" 2>&1; then
  say "torch: installed $torch_spec"
else
  say "torch: '$torch_spec' did not install (see $log_dir/torch.log); FFCV needs it"; exit 1
fi

ffcv_check="import importlib.metadata as m, ffcv._libffcv, cv2, numba; from ffcv.loader import Loader; print(m.version('ffcv'), 'numba', numba.__version__, 'opencv-python', cv2.__version__, 'numpy', m.version('numpy'))"
if "$py" -c "$ffcv_check" >/dev/null 2>&1; then
  say "ffcv: ok ($("$py" -c "$ffcv_check" 2>/dev/null))"
elif pip_install "$ffcv_spec" pillow >"$log_dir/ffcv.log" 2>&1 && "$py" -c "$ffcv_check" >>"$log_dir/ffcv.log" 2>&1; then
  say "ffcv: installed ($("$py" -c "$ffcv_check" 2>/dev/null))"
else
  say "ffcv: '$ffcv_spec' did not install or import (last lines of $log_dir/ffcv.log below); FFCV baselines will be skipped"
  tail -n 5 "$log_dir/ffcv.log" | sed 's/^/  /'
fi

dali_check="import numpy as np
from nvidia.dali import fn, pipeline_def, types
@pipeline_def(batch_size=1, num_threads=1, device_id=None)
def pipe():
    return fn.random.uniform(range=(0.0, 1.0))
p = pipe(); p.build(); p.run()
import nvidia.dali; print(nvidia.dali.__version__)"
if "$py" -c "$dali_check" >/dev/null 2>&1; then
  say "dali: ok ($("$py" -c "$dali_check" 2>/dev/null | tail -n 1), CPU pipeline runs)"
elif pip_install "$dali_spec" >"$log_dir/dali.log" 2>&1 && "$py" -c "$dali_check" >>"$log_dir/dali.log" 2>&1; then
  say "dali: installed ($("$py" -c "$dali_check" 2>/dev/null | tail -n 1), CPU pipeline runs)"
else
  say "dali: '$dali_spec' did not install or run on CPU (see $log_dir/dali.log); DALI baseline will be skipped"
fi

if "$py" -c "$ffcv_check" >/dev/null 2>&1; then
  say "done: $py (bench/loader.py --peers-python $py, the default location is found by itself)"
  exit 0
fi
say "done, without FFCV"
exit 1

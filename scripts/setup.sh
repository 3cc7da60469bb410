#!/usr/bin/env bash
# Create the project venv and install everything: a matched torch/torchvision pair, the project
# (editable, with test and hf extras), the system libturbojpeg, and pillow-simd in place of Pillow.
# Usage: scripts/setup.sh PYTHON VENV TORCH_PAIR PILLOW_SIMD [EXTRAS]
set -euo pipefail
python=$1 venv=$2 torch_pair=$3 pillow_simd=$4 extras=${5:-test,hf}
say() { echo "setup: $*"; }

if ! ldconfig -p 2>/dev/null | grep -q libturbojpeg.so.0; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing libturbojpeg0 (fast JPEG decode with DCT scaling)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libturbojpeg0 >/dev/null
  else
    echo "setup: libturbojpeg missing: install it for ~2x faster JPEG work (Debian/Ubuntu: sudo apt-get install libturbojpeg0; Fedora: sudo dnf install turbojpeg); continuing with the PIL fallback" >&2
  fi
fi

# Benchmarks decode real photos (noise and flat shapes decode at unrealistic speeds): Debian's
# wallpapers are the fixture's source (bench/fixture.py). Tests never need them.
if [[ ",$extras," == *",bench,"* ]] && ! dpkg -s plasma-workspace-wallpapers >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing plasma-workspace-wallpapers (the benchmarks' real photos, ~90 MB)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      plasma-workspace-wallpapers >/dev/null || echo "setup: plasma-workspace-wallpapers did not install; the benchmarks will say what they miss" >&2
  else
    echo "setup: the benchmarks need real photos: install Debian's plasma-workspace-wallpapers (sudo apt-get install plasma-workspace-wallpapers) or rely on scikit-image's few" >&2
  fi
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
# --isolated: ignore machine-wide pip config (e.g. a find-links dir holding a CPU-only torch wheel
# that would break torchvision); pip's cache stays on, so repeated setups are fast.
"${pip[@]}" install --isolated -q --upgrade pip
"${pip[@]}" install --isolated -q $torch_pair
"${pip[@]}" install --isolated -q -e ".[$extras]"

# pillow-simd and Pillow both install the `PIL` module; whichever is installed last wins, so it
# goes last. It builds from source (needs libjpeg and zlib headers); if that fails we keep Pillow.
# Ask which PIL is active, not what is installed: a later pip run may have put Pillow back on top.
if ! "$venv/bin/python" -c "import sys; from formats.jpeg import pil_variant; sys.exit(not pil_variant().startswith('pillow-simd'))"; then
  say "building $pillow_simd (~5x faster resize than Pillow; about 90 s)"
  if "${pip[@]}" install --isolated -q "$pillow_simd" numpy 2>/tmp/pillow-simd-build.log; then
    "${pip[@]}" uninstall -q -y pillow 2>/dev/null || true
    "${pip[@]}" install --isolated -q --force-reinstall --no-deps "$pillow_simd"
  else
    echo "setup: pillow-simd did not build (see /tmp/pillow-simd-build.log); keeping Pillow (slower resize)" >&2
  fi
fi
# The editable install compiles train/data/native/decode_native.c (setup.py, optional): without a C compiler
# or libjpeg's headers train runs its slower pure-Python decoder instead.
if ! "$venv/bin/python" -c "import sys; from train.data.decode import backend; sys.exit(backend() != 'native')"; then
  echo "setup: train's native decoder did not build (needs a C compiler and libjpeg-turbo's headers: sudo apt-get install gcc libjpeg62-turbo-dev, or libjpeg-turbo8-dev on Ubuntu); the loader falls back to its pure-Python decoder (~2-3x slower)" >&2
fi
"$venv/bin/python" -c "from formats.jpeg import codec_report; import torch, torchvision; \
print('setup: ok: torch', torch.__version__, 'torchvision', torchvision.__version__, codec_report())"

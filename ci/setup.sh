#!/usr/bin/env bash
# Install rope_backends for development on this machine: torch only if it is missing (CPU
# machines get the 2.13.0 CPU build; GPU/NPU images keep the torch they ship), then the package
# with the requested extras (default: test + triton where Triton has wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,triton}"
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
if ! python -m pip install -q -e ".${extras:+[$extras]}"; then
  # Triton has no wheel for some platforms (older aarch64 Ascend hosts): retry without it.
  extras="$(echo ",$extras," | sed 's/,triton,/,/g; s/^,//; s/,$//')"
  echo "setup: installing without the triton extra" >&2
  python -m pip install -q -e ".${extras:+[$extras]}"
fi
python -c "import torch, rope_backends; print('rope_backends', rope_backends.__version__, 'torch', torch.__version__)"

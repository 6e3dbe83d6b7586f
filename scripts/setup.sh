#!/usr/bin/env bash
# Install the pinned requirements and build tlg's kernels into the current Python environment.
# Idempotent: a second run only rebuilds what changed. Activate a virtualenv first if you want one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch is pinned inside requirements.txt: an unpinned torchvision/open_clip would pull a CUDA torch.
"$PY" -m pip install -q -r requirements.txt
# --no-build-isolation: build against the torch just installed (isolation would fetch another one).
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" - <<'PY'
import tlg
info = tlg.ops.backend_info()
cpp = info["backends"]["cpp"]
print("tlg", tlg.__version__, "| extension:", "built" if cpp["available"] else f"MISSING ({cpp['reason']})",
      "| auto on CPU:", info["auto"]["cpu"])
PY

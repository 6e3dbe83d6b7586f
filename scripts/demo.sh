#!/usr/bin/env bash
# The main job on built-in defaults: `tlg demo` (synthetic few-shot data; trains, evaluates, draws).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
exec "$PY" -m tlg demo "$@"

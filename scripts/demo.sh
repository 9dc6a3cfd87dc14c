#!/usr/bin/env bash
# The main job: installs what it needs, then runs the demo on the available device (CPU if no GPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec "$PY" -m ptuning_fast.demo "$@"

#!/usr/bin/env bash
# The whole suite: set up, build, then pytest over both packages (extra args go to pytest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ROOT/scripts/build.sh"
source "$ROOT/scripts/ros_env.sh"
cd "$ROOT"
exec python -m pytest "$@"

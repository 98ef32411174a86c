#!/usr/bin/env bash
# The whole suite: set up, build, then pytest over both packages (extra args go to pytest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ROOT/scripts/build.sh"
if [ "$ROS_DISTRO" = humble ]; then
  # The Humble stand-in has no torch: the tiny test models come from the Kilted venv, which
  # builds any that are missing and records them all in .cache/test_models/manifest.json
  # (tools/vlm_ros_tools/model_cache.py). Without that venv, tests needing them are skipped.
  if [ -x "$ROOT/.venv/bin/python" ]; then
    PYTHONPATH="$ROOT/tools" "$ROOT/.venv/bin/python" -m vlm_ros_tools.model_cache build
  else
    echo "test.sh: no Kilted venv (.venv): tests on the tiny models use only what" \
         ".cache/test_models/manifest.json already lists" >&2
  fi
fi
source "$ROOT/scripts/ros_env.sh"
cd "$ROOT"
python "$ROOT/scripts/versions.py"
exec python -m pytest "$@"

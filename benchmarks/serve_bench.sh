#!/usr/bin/env bash
# make bench-serve: vlm_serve under concurrent load, measured by evalscope perf. Sets up and
# builds like the test command, installs evalscope into its own venv (.venv-evalscope, once;
# again when benchmarks/serve_requirements.txt changes), then runs
# python -m vlm_ros_bench.serve_perf (extra args go to it; --help lists them). Results land in
# benchmarks/results/serve_latest.json and serve_latest.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
"$ROOT/scripts/build.sh"
EVALSCOPE_VENV="${EVALSCOPE_VENV:-$ROOT/.venv-evalscope}"
requirements="$ROOT/benchmarks/serve_requirements.txt"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
stamp="$EVALSCOPE_VENV/.vlm_ros_setup"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  [ -x "$EVALSCOPE_VENV/bin/python" ] || python3 -m venv "$EVALSCOPE_VENV"
  "$EVALSCOPE_VENV/bin/python" -m pip install --quiet --upgrade pip
  "$EVALSCOPE_VENV/bin/python" -m pip install --quiet -r "$requirements"
  echo "$want" > "$stamp"
fi
source "$ROOT/scripts/ros_env.sh"
cd "$ROOT"
export PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
exec python -m vlm_ros_bench.serve_perf --evalscope "$EVALSCOPE_VENV/bin/evalscope" "$@"

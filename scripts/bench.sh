#!/usr/bin/env bash
# Benchmarks at real model sizes: set up and build exactly like the test command, then run
# python -m vlm_ros_bench (extra args go to it; --help lists them). The models are built once
# into .cache/bench_models; results land in benchmarks/results/ (latest.json/.md/.png).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ROOT/scripts/build.sh"
source "$ROOT/scripts/ros_env.sh"
cd "$ROOT"
export PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
vlm_ros_localhost_discovery
exec python -m vlm_ros_bench "$@"

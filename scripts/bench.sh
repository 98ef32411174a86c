#!/usr/bin/env bash
# Benchmarks at real model sizes: set up and build exactly like the test command, then run
# python -m vlm_ros_bench (extra args go to it; --help lists them). The models are built once
# into .cache/bench_models; results land in benchmarks/results/: SmolVLM2 in latest.json/.md/
# .png, then Qwen2-VL in qwen2vl.json/.md (`--no-qwen2vl` skips that part, a first argument
# `qwen2vl` runs only it; `build`, `profile` and `report` go through unchanged).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ROOT/scripts/build.sh"
source "$ROOT/scripts/ros_env.sh"
cd "$ROOT"
export PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
vlm_ros_localhost_discovery
case "${1:-}" in
  qwen2vl|build|profile|report) exec python -m vlm_ros_bench "$@" ;;
  run) shift ;;
esac
# --qwen2vl first, so that a --no-qwen2vl among the caller's arguments wins.
exec python -m vlm_ros_bench run --qwen2vl "$@"

#!/usr/bin/env bash
# The main job: build like the test command, then run vlm_node once on the bundled sample
# image and the embedded default model, printing the answer. Extra args go to --ros-args.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
mkdir -p "$ROOT/log"
"$ROOT/scripts/build.sh" > "$ROOT/log/demo-build.log" 2>&1 || {
  cat "$ROOT/log/demo-build.log"; exit 1; }
source "$ROOT/scripts/ros_env.sh"
vlm_ros_localhost_discovery
exec "$INSTALL_BASE/vlm_ros/lib/vlm_ros/vlm_node" --ros-args \
  -p feed_type:=0 -p one_shot:=true "$@"

#!/usr/bin/env bash
# Build both ROS 2 packages with colcon against the venv's ROS 2 wheels. colcon's own
# incremental build makes a rerun with no changes quick. --symlink-install links the Python
# sources, so an edit is live without a rebuild (test_workspace_layout checks a plain install).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ROOT/scripts/setup.sh"
# The venv's share/ holds package.xml files of ROS packages: keep colcon from crawling it
# when this repository sits in a workspace's src/.
touch "$VENV/COLCON_IGNORE"
source "$VENV/bin/activate"
export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
cd "$ROOT"
colcon --log-base "$ROOT/log/$ROS_DISTRO" build \
  --base-paths vlm_ros vlm_ros_interfaces \
  --build-base "$BUILD_BASE" --install-base "$INSTALL_BASE" \
  --symlink-install --event-handlers console_cohesion- summary+ \
  --cmake-args -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF

"""The ROS 2 adapter over the engine: lifecycle node, parameters, message conversion."""

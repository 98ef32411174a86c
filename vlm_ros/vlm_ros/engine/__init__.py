"""The inference engine: plain Python, no rclpy."""

"""vlm_ros: ask a small vision-language model about an image, with or without ROS."""

__version__ = '0.1.0'

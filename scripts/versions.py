"""
Print the interpreter and the installed versions of the packages that decide compatibility.

Run by scripts/test.sh before pytest, so every test log (CI's three environments included)
says what it ran on. Reads package metadata only; imports nothing it reports on.
"""

import importlib.metadata
import os
import platform

# (label, distribution names to try, first installed wins)
PACKAGES = [
    ('numpy', ['numpy']),
    ('opencv', ['opencv-python-headless', 'opencv-python', 'opencv-contrib-python']),
    ('pillow', ['pillow', 'Pillow']),
    ('jinja2', ['jinja2', 'Jinja2']),
    ('markupsafe', ['markupsafe', 'MarkupSafe']),
    ('pyyaml', ['pyyaml', 'PyYAML']),
    ('httpx', ['httpx']),
    ('httpcore', ['httpcore']),
    ('onnxruntime', ['onnxruntime']),
    ('tokenizers', ['tokenizers']),
    ('llama-cpp-python', ['llama_cpp_python', 'llama-cpp-python']),
    ('gguf', ['gguf']),
    ('rclpy', ['ros-rclpy']),
    ('fastdds', ['ros-fastdds', 'ros-fastrtps']),
    ('torch', ['torch']),
    ('transformers', ['transformers']),
    ('onnx', ['onnx']),
    ('pytest', ['pytest']),
]


def version(names):
    """Return the version of the first installed distribution of ``names``, or None."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def main():
    """Print one line: ROS_DISTRO, Python and every package version (absent ones marked -)."""
    parts = [f'ROS_DISTRO={os.environ.get("ROS_DISTRO", "?")}',
             f'python={platform.python_version()}']
    parts += [f'{label}={version(names) or "-"}' for label, names in PACKAGES]
    print('versions: ' + ' '.join(parts), flush=True)


if __name__ == '__main__':
    main()

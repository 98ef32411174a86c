"""
What to serve: the node's parameters YAML read without ROS, and the embedded default model.

A parameters file for ``vlm_node`` (``config/*.yaml``: ``/**:`` or ``vlm_node:`` holding
``ros__parameters``) describes a model completely, so ``vlm_serve --params-file`` serves
the same model the node would load from it, with the same generation defaults.
"""

import importlib.util
import os
import pathlib
from typing import Any, Dict, Optional

PACKAGE = 'vlm_ros'
NODE_NAME = 'vlm_node'
DEFAULT_MODEL = ('models', 'default')

# The node's defaults for the parameters vlm_serve reads (ros/params.py declares them; the
# ROS adapter cannot be imported here, it needs rclpy). Missing keys take these, so a file
# means what it means to the node.
NODE_DEFAULTS: Dict[str, Any] = {
    'backend': 'local', 'model_type': None, 'model_dir': '', 'model_file_name': '',
    'llm_model_name': '', 'system_prompt': '', 'n_threads': 0, 'n_ctx': 0,
    'do_image_splitting': False, 'max_image_tiles': 0, 'max_new_tokens': 256,
    'temperature': 0.0, 'top_k': 0, 'top_p': 1.0, 'repetition_penalty': 1.0, 'seed': -1,
    'num_beams': 1, 'queue_size': 4, 'remote_url': '', 'remote_model': '',
    'remote_api_key_env': '', 'remote_connect_timeout_s': 5.0, 'remote_read_timeout_s': 60.0,
    'remote_max_retries': 2, 'remote_image_max_side': 1024, 'n_gpu_layers': 0,
    'onnx_providers': None, 'max_concurrent': 1,
}
_INTEGERS = ('model_type', 'n_threads', 'n_ctx', 'max_image_tiles', 'max_new_tokens', 'top_k',
             'seed', 'num_beams', 'queue_size', 'remote_max_retries', 'remote_image_max_side',
             'n_gpu_layers', 'max_concurrent')
_NUMBERS = ('temperature', 'top_p', 'repetition_penalty', 'remote_connect_timeout_s',
            'remote_read_timeout_s')
_STRINGS = ('backend', 'model_dir', 'model_file_name', 'llm_model_name', 'system_prompt',
            'remote_url', 'remote_model', 'remote_api_key_env')


def share_dir() -> Optional[pathlib.Path]:
    """
    Return the package's share folder (configs, the default model), or None if not found.

    In a sourced ROS workspace, or a robot's install, the ament index knows it. Without ROS
    (a plain pip or colcon install used from a bare Python, or the source tree), look beside
    this file: an installed package sits at ``<prefix>/lib/pythonX.Y/site-packages/vlm_ros``
    with its data in ``<prefix>/share/vlm_ros``; in the source tree (and a ``--symlink-install``
    build, which imports the sources) the package folder ``vlm_ros/`` holds ``models/``
    itself.
    """
    if importlib.util.find_spec('ament_index_python') is not None:
        from ament_index_python.packages import get_package_share_directory
        try:
            return pathlib.Path(get_package_share_directory(PACKAGE))
        except (LookupError, OSError, ValueError):
            pass  # no sourced prefix has the package: fall back to the file layout
    here = pathlib.Path(__file__).resolve()
    for folder in here.parents:
        for candidate in (folder / 'share' / PACKAGE, folder):
            if (candidate / 'package.xml').is_file() and \
                    (candidate.joinpath(*DEFAULT_MODEL) / 'config.json').is_file():
                return candidate
    return None


def default_model_dir() -> Optional[pathlib.Path]:
    """Return the embedded default model's folder (None when the package data is missing)."""
    share = share_dir()
    return share.joinpath(*DEFAULT_MODEL) if share is not None else None


class ParamsFileError(ValueError):
    """The parameters file cannot be read or has a value of the wrong type."""


def read_params_file(path) -> Dict[str, Any]:
    """
    Return the node's parameters from a ROS 2 parameters YAML, the node's defaults filled in.

    Entries for every node (``/**``) apply first, then those for ``vlm_node`` under any
    namespace (``vlm_node``, ``/vlm_node``, ``/front/vlm_node``), in file order, as rcl
    applies them. Parameters vlm_serve has no use for (feed_type, image, ...) are ignored.
    """
    import yaml
    path = pathlib.Path(os.path.expanduser(os.fspath(path)))
    try:
        document = yaml.safe_load(path.read_text(encoding='utf-8'))
    except OSError as exc:
        raise ParamsFileError(f'cannot read the parameters file {path}: {exc}') from exc
    except yaml.YAMLError as exc:
        raise ParamsFileError(f'{path} is not valid YAML: {exc}') from exc
    if not isinstance(document, dict):
        raise ParamsFileError(f'{path} is not a ROS 2 parameters file (no node entries)')
    values: Dict[str, Any] = {}
    found = False
    for node, entry in document.items():
        name = str(node).rstrip('/').rsplit('/', 1)[-1]
        if name not in ('**', '*', NODE_NAME) or not isinstance(entry, dict):
            continue
        params = entry.get('ros__parameters')
        if isinstance(params, dict):
            values.update(params)
            found = True
    if not found:
        raise ParamsFileError(f'{path} has no ros__parameters for /** or {NODE_NAME}')
    merged = dict(NODE_DEFAULTS)
    merged.update({k: v for k, v in values.items() if k in NODE_DEFAULTS})
    _check_types(merged, path)
    return merged


def _check_types(values, path):
    for name in _INTEGERS:
        value = values[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ParamsFileError(f'{path}: {name} must be an integer, got {value!r}')
    for name in _NUMBERS:
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsFileError(f'{path}: {name} must be a number, got {value!r}')
        values[name] = float(value)
    for name in _STRINGS:
        if not isinstance(values[name], str):
            raise ParamsFileError(f'{path}: {name} must be a string, got {values[name]!r}')
    if not isinstance(values['do_image_splitting'], bool):
        raise ParamsFileError(f'{path}: do_image_splitting must be true or false')

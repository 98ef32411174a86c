"""
The ready parameters file: a configuration's own file with ``model_dir`` filled in.

The shipped file is copied line for line (its comments explain the settings) and only the
``model_dir`` value is replaced, written as a JSON string, which YAML reads as the same
double-quoted scalar whatever the folder's name holds. The result is read back and checked
before it replaces anything, so ``--params-file`` always gets a file it can load.
"""

import json
import os
import pathlib
import re
import tempfile

import yaml

_MODEL_DIR = re.compile(r'^(?P<indent>\s+)model_dir:.*$', re.MULTILINE)
_PARAMS = re.compile(r'^(?P<indent>\s*)ros__parameters:\s*$', re.MULTILINE)


def default_path(folder, configuration) -> pathlib.Path:
    """Return where ``download`` writes the parameters by default: beside the files."""
    return pathlib.Path(folder) / f'{configuration.name}.params.yaml'


def render(configuration, model_dir) -> str:
    """Return the configuration's parameter file text with ``model_dir`` set."""
    text = configuration.params_file.read_text(encoding='utf-8')
    value = json.dumps(str(pathlib.Path(model_dir).resolve()))
    if _MODEL_DIR.search(text):
        text = _MODEL_DIR.sub(lambda m: f'{m.group("indent")}model_dir: {value}', text,
                              count=1)
    else:
        match = _PARAMS.search(text)
        if match is None:
            raise ValueError(f'{configuration.params_file} has no ros__parameters section')
        indent = match.group('indent') + '  '
        text = text[:match.end()] + f'\n{indent}model_dir: {value}' + text[match.end():]
    header = (f'# Written by `vlm_models download {configuration.name}` from '
              f'{configuration.params_file.name}, with model_dir set to the downloaded '
              'files.\n# Run: ros2 launch vlm_ros vlm_node.launch.py params_file:=<this file>\n')
    return header + text


def write(configuration, model_dir, out_path) -> pathlib.Path:
    """Write the ready parameters file to ``out_path``; return its path."""
    text = render(configuration, model_dir)
    params = _parameters(yaml.safe_load(text))
    if params.get('model_dir') != str(pathlib.Path(model_dir).resolve()):
        raise ValueError(f'the parameters written for {configuration.name} do not read back '
                         'with the right model_dir')
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.params-', suffix='.yaml', dir=out_path.parent)
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out_path)
    return out_path


def _parameters(data):
    for section in (data or {}).values():
        if isinstance(section, dict) and 'ros__parameters' in section:
            return section['ros__parameters'] or {}
    return {}

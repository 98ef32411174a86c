"""
``vlm_models.json`` in a model folder: what was fetched or exported there, and its hashes.

``download`` records, per file, the repository and commit it came from, its size and sha256
(checked against the hub's metadata while online); ``export`` records the files it made.
``verify`` then checks a folder offline -- on a robot without network -- against what was
checked when the files arrived.
"""

import json
import os
import pathlib
import tempfile

NAME = 'vlm_models.json'


def path_in(folder) -> pathlib.Path:
    """Return the manifest's path in ``folder``."""
    return pathlib.Path(folder) / NAME


def read(folder) -> dict:
    """Return the manifest of ``folder`` ({} when there is none or it is unreadable)."""
    try:
        data = json.loads(path_in(folder).read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update(folder, configuration, files=None, sources=None):
    """Merge ``files`` (path -> record) and ``sources`` into the manifest, atomically."""
    data = read(folder)
    data['configuration'] = configuration
    data.setdefault('files', {}).update(files or {})
    if sources is not None:
        data['sources'] = sources
    folder = pathlib.Path(folder)
    fd, tmp = tempfile.mkstemp(prefix='.vlm_models-', suffix='.json', dir=folder)
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write('\n')
    os.chmod(tmp, 0o644)
    os.replace(tmp, path_in(folder))

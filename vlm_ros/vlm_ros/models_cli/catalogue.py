"""
The catalogue: which hub files each shipped model configuration needs, and what is exported.

One YAML file (``config/catalogue/models.yaml``, installed to the package's share folder)
maps each configuration -- named after its parameter file in ``config/`` -- to hub
repositories, a revision and the exact files to fetch from each, plus the files no hub
publishes and ``vlm_models export`` makes. A file is a plain path, or a mapping with
``path`` and any of ``optional`` (fetched when the repository has it), ``size`` and
``sha256`` (pinned: a download or a folder must match them, whatever the hub says) and
``approx_mb`` (shown by ``list`` before the hub is asked). An exporter's checkpoint may
list a ``*.safetensors.index.json``: ``download`` then fetches the shards it names too.

The catalogue is found, in order: ``--catalogue FILE``, ``$VLM_MODELS_CATALOGUE``, the
package's share folder (ament index), then the source tree beside this package. Parameter
files are named relative to the catalogue's folder.
"""

from dataclasses import dataclass
import os
import pathlib
from typing import List, Optional, Tuple

import yaml

CATALOGUE_ENV = 'VLM_MODELS_CATALOGUE'
CATALOGUE_PATH = ('config', 'catalogue', 'models.yaml')
_CONFIG_KEYS = {'params_file', 'title', 'notes', 'sources', 'export'}
_SOURCE_KEYS = {'repo', 'revision', 'files'}
_FILE_KEYS = {'path', 'optional', 'size', 'sha256', 'approx_mb'}
_EXPORT_KEYS = {'checkpoint', 'produces'}
_PRODUCT_KEYS = {'path', 'exporter', 'approx_mb'}


class CatalogueError(ValueError):
    """The catalogue (or a name looked up in it) is wrong; the message says where."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a hub repository, as the catalogue names it."""

    path: str
    optional: bool = False
    size: Optional[int] = None
    sha256: Optional[str] = None
    approx_mb: Optional[float] = None


@dataclass(frozen=True)
class Source:
    """A hub repository at a revision and the files taken from it."""

    repo: str
    revision: str
    files: Tuple[FileEntry, ...]


@dataclass(frozen=True)
class Product:
    """A file that ``vlm_models export`` makes (no hub publishes it)."""

    path: str
    exporter: str
    approx_mb: Optional[float] = None


@dataclass(frozen=True)
class Configuration:
    """A shipped model configuration: its parameter file, sources and exported files."""

    name: str
    params_file: pathlib.Path
    title: str = ''
    notes: str = ''
    sources: Tuple[Source, ...] = ()
    checkpoint: Tuple[FileEntry, ...] = ()
    """Files of the first source that only the exporter reads (weights), never the robot."""
    products: Tuple[Product, ...] = ()

    def params(self) -> dict:
        """Return the node parameters the parameter file sets (``/**: ros__parameters``)."""
        try:
            data = yaml.safe_load(self.params_file.read_text(encoding='utf-8')) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CatalogueError(f'{self.name}: cannot read {self.params_file}: {exc}') \
                from exc
        for section in data.values():
            if isinstance(section, dict) and 'ros__parameters' in section:
                return dict(section['ros__parameters'] or {})
        raise CatalogueError(f'{self.name}: {self.params_file} has no ros__parameters')

    def needs_files(self) -> bool:
        """Whether the configuration reads model files (not the embedded or a remote model)."""
        return bool(self.sources or self.products)

    def required_paths(self) -> List[str]:
        """Every file the robot needs in the model folder (hub files and exported ones)."""
        paths = [f.path for s in self.sources for f in s.files if not f.optional]
        return paths + [p.path for p in self.products]


def default_path() -> pathlib.Path:
    """Return the shipped catalogue: the package's share folder, else the source tree."""
    try:
        from ament_index_python.packages import get_package_share_directory
        candidate = pathlib.Path(get_package_share_directory('vlm_ros')).joinpath(
            *CATALOGUE_PATH)
        if candidate.is_file():
            return candidate
    except (ImportError, LookupError, ValueError):  # PackageNotFoundError is a KeyError
        pass
    # A source checkout (colcon's symlink install links back into it).
    return pathlib.Path(__file__).resolve().parents[2].joinpath(*CATALOGUE_PATH)


def catalogue_path(given=None) -> pathlib.Path:
    """Return the catalogue file to read: ``given``, ``$VLM_MODELS_CATALOGUE`` or the shipped."""
    chosen = given or os.environ.get(CATALOGUE_ENV)
    return pathlib.Path(chosen).expanduser() if chosen else default_path()


def load(path=None) -> List[Configuration]:
    """Read and check the catalogue; raise CatalogueError naming the first problem."""
    path = catalogue_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding='utf-8'))
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogueError(f'cannot read the model catalogue {path}: {exc}') from exc
    if not isinstance(data, dict) or not isinstance(data.get('configurations'), dict):
        raise CatalogueError(f'{path}: expected a mapping with "configurations"')
    return [_configuration(path, name, body)
            for name, body in data['configurations'].items()]


def find(configurations, name) -> Configuration:
    """Return the configuration ``name`` (a ``.yaml`` suffix is ignored)."""
    wanted = name[:-5] if name.endswith('.yaml') else name
    for config in configurations:
        if config.name == wanted:
            return config
    known = ', '.join(c.name for c in configurations)
    raise CatalogueError(f'no model configuration {name!r}; known: {known}')


def _check_keys(where, body, allowed):
    if not isinstance(body, dict):
        raise CatalogueError(f'{where}: expected a mapping, got {type(body).__name__}')
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise CatalogueError(f'{where}: unknown keys {unknown} (known: {sorted(allowed)})')


def _file(where, item) -> FileEntry:
    if isinstance(item, str):
        item = {'path': item}
    _check_keys(where, item, _FILE_KEYS)
    if not item.get('path'):
        raise CatalogueError(f'{where}: a file needs a path')
    sha256 = item.get('sha256')
    if sha256 is not None and (len(str(sha256)) != 64 or
                               set(str(sha256).lower()) - set('0123456789abcdef')):
        raise CatalogueError(f'{where} {item["path"]}: sha256 must be 64 hex digits')
    size = item.get('size')
    if size is not None and (not isinstance(size, int) or size < 0):
        raise CatalogueError(f'{where} {item["path"]}: size must be a byte count')
    return FileEntry(str(item['path']), bool(item.get('optional', False)), size,
                     str(sha256).lower() if sha256 else None, item.get('approx_mb'))


def _configuration(path, name, body) -> Configuration:
    where = f'{path}: {name}'
    _check_keys(where, body, _CONFIG_KEYS)
    if not body.get('params_file'):
        raise CatalogueError(f'{where}: params_file is missing')
    params_file = pathlib.Path(path).parent / body['params_file']
    sources = []
    for i, src in enumerate(body.get('sources') or ()):
        _check_keys(f'{where} source {i}', src, _SOURCE_KEYS)
        if not src.get('repo') or not src.get('files'):
            raise CatalogueError(f'{where} source {i}: repo and files are required')
        files = tuple(_file(f'{where} {src["repo"]}', f) for f in src['files'])
        sources.append(Source(str(src['repo']), str(src.get('revision') or 'main'), files))
    export = body.get('export') or {}
    _check_keys(f'{where} export', export, _EXPORT_KEYS)
    if export and not sources:
        raise CatalogueError(f'{where}: export needs a source (the checkpoint repository)')
    checkpoint = tuple(_file(f'{where} checkpoint', f) for f in export.get('checkpoint') or ())
    products = []
    for item in export.get('produces') or ():
        _check_keys(f'{where} produces', item, _PRODUCT_KEYS)
        if not item.get('path') or not item.get('exporter'):
            raise CatalogueError(f'{where} produces: path and exporter are required')
        products.append(Product(str(item['path']), str(item['exporter']),
                                item.get('approx_mb')))
    return Configuration(str(name), params_file, str(body.get('title') or ''),
                         str(body.get('notes') or '').strip(), tuple(sources), checkpoint,
                         tuple(products))


def all_entries(config) -> List[Tuple[Source, FileEntry]]:
    """Every (source, file) the robot fetches, optional ones included."""
    return [(s, f) for s in config.sources for f in s.files]

"""
``vlm_models verify``: check a model folder against a configuration, one line per check.

Checks, each printed as ``PASS``, ``FAIL`` or ``SKIP`` (could not be checked here) with what
was compared:

* every file the configuration needs is present, with the size and hash expected -- from
  the catalogue's pins, else the folder's ``vlm_models.json`` (recorded while the files were
  checked against the hub), else the hub's metadata when it can be reached;
* ``config.json`` (or the mmproj's projector) names the family the parameter file's
  ``model_type`` selects;
* the engine resolves the folder as the node will at configure (``model_spec.resolve``);
* the graphs' sizes fit ``config.json``: vision features as wide as the language model,
  the decoder's width, layer count and key/value heads (ONNX inputs and outputs, GGUF
  header values).

Exit code 1 when any check fails.
"""

import pathlib
import sys

from vlm_ros.engine import model_files
from vlm_ros.engine.errors import VlmError
from vlm_ros.engine.families import registry
from vlm_ros.engine.model_spec import resolve
from vlm_ros.models_cli import download, graph_shapes, hub, manifest

PASS, FAIL, SKIP = 'PASS', 'FAIL', 'SKIP'


class Report:
    """The checks' lines, printed as they are made."""

    def __init__(self, out=sys.stdout):
        """Print to ``out``."""
        self.out = out
        self.failed = 0

    def add(self, status, name, detail):
        """Print one check's line."""
        self.failed += status == FAIL
        print(f'{status} {name}: {detail}', file=self.out, flush=True)


def pick_configuration(folder, configurations, name=None):
    """Return the configuration to check: named, recorded in the manifest, or the one fitting."""
    from vlm_ros.models_cli.catalogue import CatalogueError, find
    if not pathlib.Path(folder).is_dir():
        raise CatalogueError(f'{folder} is not a folder')
    if name:
        return find(configurations, name)
    recorded = manifest.read(folder).get('configuration')
    if recorded:
        return find(configurations, recorded)
    fitting = [c for c in configurations if c.needs_files() and
               all((pathlib.Path(folder) / p).is_file() for p in c.required_paths())]
    if len(fitting) == 1:
        return fitting[0]
    raise CatalogueError(
        f'{folder} has no {manifest.NAME} naming its configuration and '
        + (f'{len(fitting)} configurations fit it ({", ".join(c.name for c in fitting)})'
           if fitting else "no configuration's files are all there")
        + ': name one with --config')


def run(folder, configuration, use_hub=True, out=sys.stdout) -> int:
    """Check ``folder`` against ``configuration``; return 0, or 1 when a check failed."""
    folder = pathlib.Path(folder).expanduser().resolve()
    report = Report(out)
    print(f'verify {folder} as {configuration.name}', file=out)
    if not folder.is_dir():
        report.add(FAIL, 'folder', f'{folder} is not a folder')
        return 1
    _files(report, folder, configuration, use_hub and not hub.offline())
    params = configuration.params()
    _family(report, folder, params)
    spec = _resolve(report, folder, params)
    if spec is not None:
        _shapes(report, folder, spec)
    print(f'{report.failed} check(s) failed' if report.failed else 'all checks passed',
          file=out)
    return 1 if report.failed else 0


def _files(report, folder, configuration, online):
    recorded = manifest.read(folder).get('files', {})
    commits = {s.get('repo'): s.get('commit') for s in manifest.read(folder).get('sources', [])}
    listings = {}
    for source in configuration.sources:
        for entry in source.files:
            path = folder / entry.path
            if not path.is_file():
                if not entry.optional:
                    report.add(FAIL, f'file {entry.path}', f'missing (from {source.repo})')
                continue
            remote = listing = None
            record = recorded.get(entry.path)
            if record is None and entry.sha256 is None and online:
                listing = _listing(report, listings, source, commits.get(source.repo))
                remote = listing.files.get(entry.path) if listing is not None else None
            _checksum(report, path, entry, remote, listing, record)
    for product in configuration.products:
        path = folder / product.path
        if not path.is_file():
            report.add(FAIL, f'file {product.path}',
                       f'missing; no hub publishes it: run `vlm_models export '
                       f'{configuration.name} --dir {folder}` where PyTorch is installed')
            continue
        from vlm_ros.models_cli.catalogue import FileEntry
        _checksum(report, path, FileEntry(product.path), None, None,
                  recorded.get(product.path))


def _listing(report, listings, source, commit):
    """Return the hub's listing of ``source`` (at the recorded commit), once per source."""
    if source.repo not in listings:
        try:
            listings[source.repo] = hub.list_files(source.repo, commit or source.revision)
        except hub.HubError as exc:
            report.add(SKIP, f'hub {source.repo}', f'no hub metadata: {exc}')
            listings[source.repo] = None
    return listings[source.repo]


def _checksum(report, path, entry, remote, listing, record):
    try:
        expected = download.expectation(entry, remote, listing, record)
        verdict = download.check(path, expected)
    except download.MismatchError as exc:
        report.add(FAIL, f'file {entry.path}', str(exc))
        return
    size = path.stat().st_size
    if expected.sha256 is None and expected.blob_id is None:
        report.add(SKIP, f'file {entry.path}', f'present, {size} bytes; no hash to compare '
                   '(no pin, no manifest record, hub not asked)')
        return
    report.add(PASS, f'file {entry.path}', f'{size} bytes, {verdict} ({expected.origin})')


def _family(report, folder, params):
    try:
        wanted = registry.by_param(int(params.get('model_type', 1))).info
    except (VlmError, ValueError) as exc:
        report.add(FAIL, 'family', str(exc))
        return
    vision = str(params.get('model_file_name') or '')
    if (folder / 'config.json').is_file():
        config_type = model_files.load_json(folder, 'config.json').get('model_type', '')
        found = registry.by_config_type(config_type)
        what = f'config.json model_type {config_type!r}'
    elif vision.endswith('.gguf') and (folder / vision).is_file():
        projector = graph_shapes.gguf_values(folder / vision, ('clip.projector_type',))[
            'clip.projector_type']
        found = registry.by_projector(str(projector or ''))
        what = f'{vision} projector {projector!r}'
    else:
        report.add(FAIL, 'family', 'neither config.json nor an mmproj GGUF to read it from')
        return
    expected = f'model_type {wanted.model_type_param} ({wanted.display_name})'
    if found is None or found.info.key != wanted.key:
        names = found.info.display_name if found is not None else 'no supported family'
        report.add(FAIL, 'family', f'{what} is {names}, but the parameters say {expected}')
    else:
        report.add(PASS, 'family', f'{what} fits {expected}')


def _resolve(report, folder, params):
    try:
        spec = resolve(folder, vision_model=params.get('model_file_name') or None,
                       decoder_model=params.get('llm_model_name') or None,
                       model_type=registry.by_param(int(params.get('model_type', 1))).info.key,
                       roles=('model_file_name', 'llm_model_name'))
    except (VlmError, ValueError, OSError) as exc:
        report.add(FAIL, 'resolve', str(exc))
        return None
    report.add(PASS, 'resolve', spec.describe())
    return spec


def _shapes(report, folder, spec):
    text = {}
    if (folder / 'config.json').is_file():
        text = model_files.text_config(model_files.load_json(folder, 'config.json'))
    hidden = text.get('hidden_size')
    layers = text.get('num_hidden_layers')
    if spec.vision.suffix == '.onnx':
        _onnx_vision(report, spec.vision, folder, hidden)
    if spec.decoder.suffix == '.onnx':
        _onnx_decoder(report, spec.decoder, spec.embed, folder, text)
    else:
        _gguf_decoder(report, spec, folder, hidden, layers)


def _name(path, folder):
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _compare(report, name, what, found, expected, source='config.json'):
    if found is None:
        report.add(SKIP, name, f'{what} is not fixed in the file')
    elif expected is None:
        report.add(SKIP, name, f'{what} {found}; {source} does not say')
    elif found == expected:
        report.add(PASS, name, f'{what} {found} = {source} {expected}')
    else:
        report.add(FAIL, name, f'{what} {found}, but {source} says {expected}')


def _load_onnx(report, name, path):
    try:
        return graph_shapes.onnx_io(path)
    except Exception as exc:  # noqa: B902 (onnxruntime raises its own, unexported types)
        report.add(FAIL, name, f'ONNX Runtime cannot load it: {exc}')
        return None


def _onnx_vision(report, path, folder, hidden):
    name = f'shape {_name(path, folder)}'
    io = _load_onnx(report, name, path)
    if io is not None:
        features = io[1].get('image_features')
        if features is None:
            report.add(FAIL, name, f'no image_features output (outputs: {sorted(io[1])})')
        else:
            _compare(report, name, 'image_features width', graph_shapes.static(features[-1]),
                     hidden, 'config.json text hidden_size')


def _onnx_decoder(report, path, embed, folder, text):
    hidden = text.get('hidden_size')
    name = f'shape {_name(path, folder)}'
    io = _load_onnx(report, name, path)
    if io is not None:
        inputs = io[0]
        if 'inputs_embeds' not in inputs:
            report.add(FAIL, name, f'no inputs_embeds input (inputs: {sorted(inputs)})')
        else:
            _compare(report, name, 'inputs_embeds width',
                     graph_shapes.static(inputs['inputs_embeds'][-1]), hidden)
        keys = sorted(n for n in inputs if n.startswith('past_key_values.') and
                      n.endswith('.key'))
        _compare(report, name, 'layers (past_key_values)', len(keys) or None,
                 text.get('num_hidden_layers'))
        if keys:
            dims = inputs[keys[0]]
            heads = text.get('num_key_value_heads') or text.get('num_attention_heads')
            _compare(report, name, 'key/value heads', graph_shapes.static(dims[1]), heads)
    if embed is not None:
        name = f'shape {_name(embed, folder)}'
        io = _load_onnx(report, name, embed)
        if io is not None and 'inputs_embeds' in io[1]:
            _compare(report, name, 'inputs_embeds width',
                     graph_shapes.static(io[1]['inputs_embeds'][-1]), hidden)


def _gguf_decoder(report, spec, folder, hidden, layers):
    name = f'shape {_name(spec.decoder, folder)}'
    try:
        values = graph_shapes.gguf_values(spec.decoder, ('{arch}.embedding_length',
                                                         '{arch}.block_count'))
    except VlmError as exc:
        report.add(FAIL, name, str(exc))
        return
    width = values['{arch}.embedding_length']
    if hidden is not None:
        _compare(report, name, 'embedding_length', width, hidden)
        _compare(report, name, 'block_count', values['{arch}.block_count'], layers)
    if spec.vision.suffix == '.gguf':
        projected = graph_shapes.gguf_values(spec.vision, ('clip.vision.projection_dim',))[
            'clip.vision.projection_dim']
        _compare(report, f'shape {_name(spec.vision, folder)}', 'projection_dim', projected,
                 width, f'{spec.decoder.name} embedding_length')

"""
``vlm_models`` against a loopback hub that serves the tiny test models in the hub's layout.

The server implements what huggingface_hub and the downloader use: the model info API with
file metadata (sizes, git blob ids, LFS sha256), ``/{repo}/resolve/{revision}/{path}`` with
the hub's headers (``X-Repo-Commit``, ``ETag`` / ``X-Linked-Etag``, ``X-Linked-Size``), a
redirect of LFS files to a CDN path, and ``Range``. It can cut a connection mid-file, serve
wrong bytes, or demand a token. Every command runs as its own process, with ``HF_ENDPOINT``
pointing at the server, as a user would run it.
"""

import hashlib
import http.server
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse

from conftest import installed_executable, python_script, TEST_DIR, tiny_model
import pytest
from vlm_ros.engine.families import registry
from vlm_ros.models_cli import catalogue, download, export, hashing, manifest
from vlm_ros.models_cli.export import EXPORTERS
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'config'
SMOLVLM_REPO = 'vlm-test/tiny-smolvlm'
GGUF_REPO = 'vlm-test/tiny-smolvlm-gguf'
INTERNVL_REPO = 'vlm-test/tiny-internvl-hf'
QWEN2VL_REPOS = {'qwen2-a': 'vlm-test/tiny-qwen2-vl', 'qwen25-a': 'vlm-test/tiny-qwen2.5-vl'}
PRIVATE_REPO = 'vlm-test/private'
TOKEN = 'hf_vlmtesttoken'
CONFIG_FILES = ['config.json', 'generation_config.json', 'preprocessor_config.json',
                'processor_config.json', 'tokenizer.json', 'tokenizer_config.json',
                'special_tokens_map.json', 'chat_template.json']
ONNX_FILES = ['onnx/vision_encoder.onnx', 'onnx/embed_tokens.onnx',
              'onnx/decoder_model_merged.onnx']
LFS_SUFFIXES = ('.onnx', '.gguf', '.safetensors')


class FakeHub(http.server.ThreadingHTTPServer):
    """A loopback hub: repositories of files at one commit each, and fault injection."""

    daemon_threads = True

    def __init__(self):
        """Listen on a free loopback port."""
        super().__init__(('127.0.0.1', 0), HubHandler)
        self.repos = {}
        self.private = set()
        self.corrupt = set()
        self.cut_once = {}
        self.log = []
        self.lock = threading.Lock()

    @property
    def url(self):
        """Return the endpoint (``HF_ENDPOINT``)."""
        return f'http://127.0.0.1:{self.server_address[1]}'

    def add(self, repo, files):
        """Serve ``files`` (path -> bytes) as ``repo`` at a commit named after their content."""
        digest = hashlib.sha1(repo.encode())
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha256(files[path]).digest())
        self.repos[repo] = {'commit': digest.hexdigest(), 'files': files}

    def bytes_served(self, path):
        """Total body bytes sent for files named ``path``."""
        return sum(n for (_, p, _, n) in self.log if p == path)

    def gets(self, path):
        """Return the Range header of each GET of ``path``'s content."""
        return [r for (m, p, r, _) in self.log if p == path and m == 'GET']


class HubHandler(http.server.BaseHTTPRequestHandler):
    """The endpoints huggingface_hub and vlm_models call."""

    protocol_version = 'HTTP/1.1'

    def log_message(self, *args):
        """Keep the test output quiet."""

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        """Answer like GET, without a body."""
        self._route(head=True)

    def do_GET(self):  # noqa: N802
        """Answer the info API, resolve and CDN paths."""
        self._route(head=False)

    def _route(self, head):
        url = urllib.parse.urlparse(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip('/').split('/')]
        hub = self.server
        if parts[:2] == ['api', 'models']:
            repo, revision = '/'.join(parts[2:4]), 'main'
            if len(parts) >= 6 and parts[4] == 'revision':
                revision = '/'.join(parts[5:])
            return self._info(repo, revision, head)
        if parts[0] == 'cdn':
            repo, path = parts[1], '/'.join(parts[2:])
            return self._content(repo, path, head)
        if len(parts) >= 5 and parts[2] == 'resolve':
            repo, revision, path = '/'.join(parts[:2]), parts[3], '/'.join(parts[4:])
            if not self._allowed(repo):
                return
            entry = hub.repos.get(repo)
            if entry is None or revision not in ('main', entry['commit']):
                return self._error(404, 'RevisionNotFound' if entry else 'RepoNotFound')
            data = entry['files'].get(path)
            if data is None:
                return self._error(404, 'EntryNotFound')
            if path.endswith(LFS_SUFFIXES):
                # LFS: the hub answers with the file's identity and redirects to its CDN.
                self.send_response(302)
                self.send_header('Location', f'/cdn/{urllib.parse.quote(repo, safe="")}/{path}')
                self.send_header('X-Repo-Commit', entry['commit'])
                self.send_header('X-Linked-Etag', f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header('X-Linked-Size', str(len(data)))
                self.send_header('ETag', '"pointer"')
                self.send_header('Content-Length', '0')
                self.end_headers()
                return
            return self._content(repo, path, head)
        self._error(404, 'NotFound')

    def _allowed(self, repo):
        if repo in self.server.private and \
                self.headers.get('Authorization') != f'Bearer {TOKEN}':
            self._error(401, 'RepoNotFound')
            return False
        return True

    def _info(self, repo, revision, head):
        if not self._allowed(repo):
            return
        entry = self.server.repos.get(repo)
        if entry is None:
            return self._error(404, 'RepoNotFound')
        if revision not in ('main', entry['commit']):
            return self._error(404, 'RevisionNotFound')
        siblings = []
        for path, data in sorted(entry['files'].items()):
            item = {'rfilename': path, 'size': len(data), 'blobId': _blob_id(data)}
            if path.endswith(LFS_SUFFIXES):
                item['lfs'] = {'size': len(data), 'sha256': hashlib.sha256(data).hexdigest(),
                               'pointerSize': 134}
            siblings.append(item)
        # The fields the hub always sends (older huggingface_hub releases require them).
        body = json.dumps({'_id': entry['commit'][:24], 'id': repo, 'modelId': repo,
                           'author': repo.split('/')[0], 'sha': entry['commit'],
                           'lastModified': '2025-01-01T00:00:00.000Z',
                           'createdAt': '2025-01-01T00:00:00.000Z',
                           'private': repo in self.server.private, 'disabled': False,
                           'gated': False, 'downloads': 0, 'likes': 0, 'tags': [],
                           'library_name': 'transformers', 'siblings': siblings}).encode()
        self._send(200, body, {'Content-Type': 'application/json'}, head)

    def _content(self, repo, path, head):
        hub = self.server
        entry = hub.repos[repo]
        data = entry['files'][path]
        if (repo, path) in hub.corrupt:
            data = bytes(b ^ 0x5A for b in data)  # same size, other bytes
        start = 0
        status = 200
        true = entry['files'][path]
        etag = hashlib.sha256(true).hexdigest() if path.endswith(LFS_SUFFIXES) else \
            _blob_id(true)
        headers = {'X-Repo-Commit': entry['commit'], 'Accept-Ranges': 'bytes',
                   'ETag': f'"{etag}"'}
        ranged = self.headers.get('Range')
        if ranged and ranged.startswith('bytes='):
            start = int(ranged[6:].split('-')[0])
            if start >= len(data):
                return self._error(416, 'RangeNotSatisfiable')
            status = 206
            headers['Content-Range'] = f'bytes {start}-{len(data) - 1}/{len(data)}'
        body = data[start:]
        cut = None if head else hub.cut_once.pop((repo, path), None)
        sent = len(body) if cut is None else max(0, cut - start)
        with hub.lock:
            hub.log.append(('HEAD' if head else 'GET', path, ranged, 0 if head else sent))
        if cut is None:
            return self._send(status, body, headers, head)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body[:sent])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, status, body, headers, head):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status, code):
        body = json.dumps({'error': code}).encode()
        self._send(status, body, {'X-Error-Code': code, 'X-Error-Message': code,
                                  'Content-Type': 'application/json'}, self.command == 'HEAD')


def _blob_id(data):
    """Return git's blob id of ``data`` (what the hub lists for files kept in git)."""
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def _read(folder, names):
    return {name: (pathlib.Path(folder) / name).read_bytes() for name in names}


@pytest.fixture(scope='module')
def models():
    """Return the tiny models' folders (built with torch, or looked up without it)."""
    return {'a': pathlib.Path(tiny_model('cached_test_model', 'a')),
            'b': pathlib.Path(tiny_model('cached_test_model', 'b')),
            'gguf': pathlib.Path(tiny_model('cached_gguf', 'a', 'q8_0')),
            'mmproj': pathlib.Path(tiny_model('cached_mmproj', 'a'))}


@pytest.fixture(scope='module')
def hub(models):
    """Serve the tiny models' repositories from a loopback hub."""
    server = FakeHub()
    smol = _read(models['a'], CONFIG_FILES + ONNX_FILES + ['model.safetensors'])
    smol['README.md'] = b'# tiny SmolVLM for vlm_models tests\n'
    server.add(SMOLVLM_REPO, smol)
    server.add(GGUF_REPO, {'tiny-Q8_0.gguf': models['gguf'].read_bytes(),
                           'mmproj-tiny-f32.gguf': models['mmproj'].read_bytes()})
    server.add(PRIVATE_REPO, dict(smol))
    server.private.add(PRIVATE_REPO)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _params(path, **values):
    base = {'feed_type': 1, 'max_new_tokens': 8, 'model_dir': '/opt/models/unset'}
    base.update(values)
    body = yaml.safe_dump({'/**': {'ros__parameters': base}})
    path.write_text('# test configuration\n' + body)
    return path.name


def _files(paths, pins=None):
    return [{'path': p, **(pins or {}).get(p, {})} for p in paths]


@pytest.fixture(scope='module')
def test_catalogue(tmp_path_factory, models):
    """A catalogue of configurations over the tiny repositories, pins on some files."""
    folder = tmp_path_factory.mktemp('catalogue')
    config = (models['a'] / 'config.json').read_bytes()
    pins = {'config.json': {'size': len(config), 'sha256': hashlib.sha256(config).hexdigest()}}
    smol_files = _files(CONFIG_FILES + ONNX_FILES, pins) + [
        {'path': 'chat_template.jinja', 'optional': True}]
    onnx = {'model_type': 1, 'model_file_name': ONNX_FILES[0],
            'llm_model_name': 'onnx/decoder_model_merged.onnx'}
    configurations = {
        'tiny_onnx': {'params_file': _params(folder / 'tiny_onnx.yaml', **onnx),
                      'title': 'tiny SmolVLM, ONNX',
                      'sources': [{'repo': SMOLVLM_REPO, 'files': smol_files}]},
        'tiny_private': {'params_file': _params(folder / 'tiny_private.yaml', **onnx),
                         'sources': [{'repo': PRIVATE_REPO, 'files': smol_files}]},
        'tiny_missing': {'params_file': _params(folder / 'tiny_missing.yaml', **onnx),
                         'sources': [{'repo': SMOLVLM_REPO, 'files': _files(
                             CONFIG_FILES + ['onnx/vision_encoder_fp16.onnx'])}]},
        'tiny_onnx_vision_gguf': {
            'params_file': _params(folder / 'tiny_onnx_vision_gguf.yaml', model_type=1,
                                   model_file_name=ONNX_FILES[0],
                                   llm_model_name='tiny-Q8_0.gguf'),
            'sources': [{'repo': SMOLVLM_REPO, 'files': _files(CONFIG_FILES + ONNX_FILES[:1])},
                        {'repo': GGUF_REPO, 'files': ['tiny-Q8_0.gguf']}]},
        'tiny_mmproj': {
            'params_file': _params(folder / 'tiny_mmproj.yaml', model_type=1,
                                   model_file_name='mmproj-tiny-f32.gguf',
                                   llm_model_name='tiny-Q8_0.gguf'),
            'sources': [{'repo': GGUF_REPO, 'files': ['mmproj-tiny-f32.gguf',
                                                      'tiny-Q8_0.gguf']}]},
        'tiny_internvl': {
            'params_file': _params(folder / 'tiny_internvl.yaml', model_type=0,
                                   model_file_name=ONNX_FILES[0],
                                   llm_model_name='tiny-internvl-Q8_0.gguf'),
            'sources': [{'repo': INTERNVL_REPO, 'files': CONFIG_FILES}],
            'export': {'checkpoint': ['model.safetensors'],
                       'produces': [{'path': ONNX_FILES[0],
                                     'exporter': 'internvl-vision-onnx'},
                                    {'path': 'tiny-internvl-Q8_0.gguf',
                                     'exporter': 'qwen2-gguf-q8_0'}]}},
    }
    for variant, repo in QWEN2VL_REPOS.items():
        # Qwen2-VL's checkpoint in one file; Qwen2.5-VL's in shards, as VLM-R1's comes.
        name = f'tiny_{variant.replace("-", "_")}'
        weights = 'model.safetensors' if variant == 'qwen2-a' else \
            'model.safetensors.index.json'
        configurations[name] = {
            'params_file': _params(folder / f'{name}.yaml', model_type=2,
                                   model_file_name=f'mmproj-{name}-f16.gguf',
                                   llm_model_name=f'{name}-Q8_0.gguf'),
            'sources': [{'repo': repo, 'files': CONFIG_FILES}],
            'export': {'checkpoint': [weights],
                       'produces': [{'path': f'{name}-Q8_0.gguf',
                                     'exporter': 'qwen2vl-gguf-q8_0'},
                                    {'path': f'mmproj-{name}-f16.gguf',
                                     'exporter': 'qwen2vl-mmproj-f16'}]}}
    path = folder / 'models.yaml'
    path.write_text(yaml.safe_dump({'version': 1, 'configurations': configurations}))
    return path


def vlm_models(*args, hub=None, catalogue_file=None, env=None, timeout=120):
    """Run the command in its own process, as a user would; return the CompletedProcess."""
    run_env = {k: v for k, v in os.environ.items()
               if not k.startswith(('HF_', 'HUGGINGFACE_')) and k != 'TRANSFORMERS_OFFLINE'}
    run_env['HF_HUB_DISABLE_TELEMETRY'] = '1'
    run_env['HF_HOME'] = os.environ['VLM_TEST_HF_HOME']
    if hub is not None:
        run_env['HF_ENDPOINT'] = hub.url
    if catalogue_file is not None:
        run_env['VLM_MODELS_CATALOGUE'] = str(catalogue_file)
    run_env.update(env or {})
    return subprocess.run([sys.executable, '-m', 'vlm_ros.models_cli', *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=run_env)


@pytest.fixture(autouse=True)
def _hf_home(tmp_path, monkeypatch):
    """Give every test its own empty HF_HOME (no stray token or cache)."""
    home = tmp_path / 'hf_home'
    home.mkdir()
    monkeypatch.setenv('VLM_TEST_HF_HOME', str(home))


# --- the shipped catalogue -------------------------------------------------------------------

def test_shipped_catalogue_covers_every_parameter_file():
    configurations = catalogue.load()
    names = {c.name for c in configurations}
    assert names == {p.stem for p in CONFIG_DIR.glob('*.yaml')}
    for config in configurations:
        params = config.params()
        if not config.needs_files():
            assert not params.get('model_file_name') and not params.get('llm_model_name')
            continue
        needed = config.required_paths()
        # The node's files are among what is fetched or exported, by their exact names.
        for key in ('model_file_name', 'llm_model_name'):
            assert params[key] in needed, (config.name, key, params[key])
        for source in config.sources:
            assert source.repo.count('/') == 1 and source.revision == 'main'
        # A model_type the node takes, and exporters that convert that family's checkpoints.
        family = registry.by_param(params['model_type']).info.key
        for product in config.products:
            assert family in EXPORTERS[product.exporter].families, (config.name, product)
        if params['model_file_name'].endswith('.gguf'):
            # llama.cpp's releases: mmproj beside a GGUF language model, and a context well
            # under the trained one (Qwen2.5-VL's 128k would need a 4.7 GB KV cache).
            assert params['llm_model_name'].endswith('.gguf')
            assert params['model_file_name'].startswith('mmproj-'), config.name
            assert 0 < params.get('n_ctx', 0) <= 8192, config.name


def test_list_prints_every_configuration_with_repositories_and_files():
    run = vlm_models('list')
    assert run.returncode == 0, run.stderr
    for path in CONFIG_DIR.glob('*.yaml'):
        assert f'{path.stem}  ({path.name})' in run.stdout
    assert 'HuggingFaceTB/SmolVLM2-256M-Video-Instruct @ main' in run.stdout
    assert 'onnx/vision_encoder.onnx' in run.stdout and '~375 MB' in run.stdout
    assert 'made by `vlm_models export`: onnx/vision_encoder.onnx' in run.stdout
    rows = json.loads(vlm_models('list', '--json').stdout)
    assert [r['name'] for r in rows] == [c.name for c in catalogue.load()]
    # What `ros2 run vlm_ros vlm_models` starts reads the catalogue installed with the package.
    exe = installed_executable('vlm_ros', 'vlm_models')
    installed = subprocess.run([str(exe), 'list', '--json'], capture_output=True, text=True,
                               timeout=60)
    assert installed.returncode == 0, installed.stderr
    assert json.loads(installed.stdout) == rows


def test_catalogue_errors_name_the_problem(tmp_path):
    bad = tmp_path / 'models.yaml'
    bad.write_text('configurations:\n  x:\n    params_file: x.yaml\n    sourcez: []\n')
    run = vlm_models('--catalogue', bad, 'list')
    assert run.returncode == 2 and "unknown keys ['sourcez']" in run.stderr
    run = vlm_models('download', 'no_such_model', '--dir', tmp_path)
    assert run.returncode == 2 and "no model configuration 'no_such_model'" in run.stderr


# --- download ----------------------------------------------------------------------------------

def test_download_checks_files_writes_manifest_and_params(hub, test_catalogue, models,
                                                          tmp_path):
    folder = tmp_path / 'tiny'
    run = vlm_models('download', 'tiny_onnx', '--dir', folder, hub=hub,
                     catalogue_file=test_catalogue)
    assert run.returncode == 0, run.stderr
    for name in CONFIG_FILES + ONNX_FILES:
        assert (folder / name).read_bytes() == (models['a'] / name).read_bytes(), name
    assert not (folder / 'model.safetensors').exists()  # only what the node reads
    assert 'chat_template.jinja: not in the repository (optional), skipped' in run.stdout
    assert 'config.json: fetched' in run.stdout and 'sha256 ok' in run.stdout
    assert 'git blob sha1 ok' in run.stdout  # the small files, checked by their git id
    record = manifest.read(folder)
    assert record['configuration'] == 'tiny_onnx'
    assert record['sources'][0]['commit'] == hub.repos[SMOLVLM_REPO]['commit']
    decoder = record['files']['onnx/decoder_model_merged.onnx']
    assert decoder['sha256'] == hashing.digests(models['a'] / ONNX_FILES[2])[0]

    # The parameters file: the configuration's own, model_dir filled in, loaded by the
    # real rcl --params-file parser and the node's checks.
    params = folder / 'tiny_onnx.params.yaml'
    loaded = yaml.safe_load(params.read_text())['/**']['ros__parameters']
    assert loaded['model_dir'] == str(folder.resolve())
    assert '# test configuration' in params.read_text()
    check = subprocess.run(python_script(TEST_DIR / 'check_params_file.py', params),
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert {'model_dir', 'model_file_name', 'llm_model_name'} <= set(json.loads(check.stdout))

    # A second run fetches nothing: every file is present and checks out.
    before = len(hub.log)
    out = tmp_path / 'elsewhere' / 'p.yaml'
    again = vlm_models('download', 'tiny_onnx', '--dir', folder, '--params-out', out,
                       hub=hub, catalogue_file=test_catalogue)
    assert again.returncode == 0, again.stderr
    assert [e for e in hub.log[before:] if e[0] == 'GET'] == []
    assert again.stdout.count(': present,') == len(CONFIG_FILES + ONNX_FILES)
    assert yaml.safe_load(out.read_text())['/**']['ros__parameters']['model_dir'] == str(
        folder.resolve())

    run = vlm_models('verify', folder, catalogue_file=test_catalogue)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert not [line for line in lines if line.startswith('FAIL')]
    assert 'PASS file config.json: ' in run.stdout and 'the catalogue' in run.stdout
    assert f'PASS file {ONNX_FILES[0]}: ' in run.stdout and 'vlm_models.json' in run.stdout
    assert "PASS family: config.json model_type 'smolvlm' fits model_type 1" in run.stdout
    assert 'PASS resolve: ' in run.stdout
    assert f'PASS shape {ONNX_FILES[0]}: image_features width 64 = config.json' in run.stdout
    assert 'PASS shape onnx/decoder_model_merged.onnx: layers (past_key_values) 2' in run.stdout
    assert lines[-1] == 'all checks passed'


def test_cut_connection_resumes_in_the_next_run(hub, test_catalogue, tmp_path):
    folder = tmp_path / 'tiny'
    path = ONNX_FILES[2]
    size = len(hub.repos[SMOLVLM_REPO]['files'][path])
    hub.cut_once[(SMOLVLM_REPO, path)] = size // 2
    served = hub.bytes_served(path)
    first = vlm_models('download', 'tiny_onnx', '--dir', folder, '--retries', '0', hub=hub,
                       catalogue_file=test_catalogue)
    assert first.returncode == 1
    assert f'{path} from {SMOLVLM_REPO}: network error' in first.stderr
    assert f'{size // 2} of {size} bytes are kept' in first.stderr
    assert 'run the same command again to resume' in first.stderr
    assert not (folder / path).exists()
    parts = list((folder / '.cache' / 'vlm_models' / 'onnx').glob('decoder_model_merged.onnx.*'))
    assert [p.stat().st_size for p in parts] == [size // 2]

    second = vlm_models('download', 'tiny_onnx', '--dir', folder, hub=hub,
                        catalogue_file=test_catalogue)
    assert second.returncode == 0, second.stderr
    assert f'(resumed at byte {size // 2})' in second.stdout
    assert hub.gets(path)[-1] == f'bytes={size // 2}-'
    # Half the file came again, not all of it.
    assert hub.bytes_served(path) - served == size
    assert (folder / path).read_bytes() == hub.repos[SMOLVLM_REPO]['files'][path]
    assert not parts[0].exists()


def test_cut_connection_resumes_within_one_run(hub, test_catalogue, tmp_path):
    path = ONNX_FILES[0]
    size = len(hub.repos[SMOLVLM_REPO]['files'][path])
    hub.cut_once[(SMOLVLM_REPO, path)] = size // 3
    run = vlm_models('download', 'tiny_onnx', '--dir', tmp_path / 'tiny', hub=hub,
                     catalogue_file=test_catalogue)
    assert run.returncode == 0, run.stderr
    assert f'resuming at byte {size // 3} (retry 1 of 3)' in run.stderr
    assert hub.gets(path)[-1] == f'bytes={size // 3}-'


def test_corrupted_file_is_detected_and_not_kept(hub, test_catalogue, tmp_path):
    folder = tmp_path / 'tiny'
    path = ONNX_FILES[1]
    data = hub.repos[SMOLVLM_REPO]['files'][path]
    hub.corrupt.add((SMOLVLM_REPO, path))
    try:
        run = vlm_models('download', 'tiny_onnx', '--dir', folder, hub=hub,
                         catalogue_file=test_catalogue)
    finally:
        hub.corrupt.discard((SMOLVLM_REPO, path))
    assert run.returncode == 1
    wrong = hashlib.sha256(bytes(b ^ 0x5A for b in data)).hexdigest()
    expected = hashlib.sha256(data).hexdigest()
    commit = hub.repos[SMOLVLM_REPO]['commit'][:12]
    assert (f'{path} from {SMOLVLM_REPO}: sha256 {wrong}, expected {expected} (hub metadata '
            f'of {SMOLVLM_REPO}@{commit})') in run.stderr
    assert 'the damaged copy was deleted' in run.stderr
    assert not (folder / path).exists()
    assert not (folder / 'tiny_onnx.params.yaml').exists()
    assert (folder / ONNX_FILES[2]).is_file()  # the other files arrived and are kept
    # Once the hub serves the right bytes, the next run fetches only what is missing.
    again = vlm_models('download', 'tiny_onnx', '--dir', folder, hub=hub,
                       catalogue_file=test_catalogue)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count('fetched') == 1 and (folder / path).read_bytes() == data


def test_missing_file_is_named(hub, test_catalogue, tmp_path):
    run = vlm_models('download', 'tiny_missing', '--dir', tmp_path, hub=hub,
                     catalogue_file=test_catalogue)
    assert run.returncode == 1
    commit = hub.repos[SMOLVLM_REPO]['commit'][:12]
    assert (f'onnx/vision_encoder_fp16.onnx is not in {SMOLVLM_REPO}@{commit}'
            in run.stderr)


def test_network_error_and_unknown_repository(hub, test_catalogue, tmp_path):
    closed = socket.socket()
    closed.bind(('127.0.0.1', 0))
    port = closed.getsockname()[1]
    closed.close()
    run = vlm_models('download', 'tiny_onnx', '--dir', tmp_path, catalogue_file=test_catalogue,
                     env={'HF_ENDPOINT': f'http://127.0.0.1:{port}'})
    assert run.returncode == 1
    assert f'network error asking {SMOLVLM_REPO} at http://127.0.0.1:{port}' in run.stderr
    hub.repos['vlm-test/renamed'] = hub.repos.pop(SMOLVLM_REPO)
    try:
        run = vlm_models('download', 'tiny_onnx', '--dir', tmp_path, hub=hub,
                         catalogue_file=test_catalogue)
    finally:
        hub.repos[SMOLVLM_REPO] = hub.repos.pop('vlm-test/renamed')
    assert run.returncode == 1 and f'{SMOLVLM_REPO} at {hub.url}: repository not found' in \
        run.stderr


def test_token_comes_from_hf_token_or_hf_home(hub, test_catalogue, tmp_path):
    denied = vlm_models('download', 'tiny_private', '--dir', tmp_path / 'a', hub=hub,
                        catalogue_file=test_catalogue)
    assert denied.returncode == 1 and 'HF_TOKEN' in denied.stderr
    run = vlm_models('download', 'tiny_private', '--dir', tmp_path / 'b', hub=hub,
                     catalogue_file=test_catalogue, env={'HF_TOKEN': TOKEN})
    assert run.returncode == 0, run.stderr
    home = tmp_path / 'home'
    home.mkdir()
    (home / 'token').write_text(TOKEN)  # where `hf auth login` keeps it
    run = vlm_models('download', 'tiny_private', '--dir', tmp_path / 'c', hub=hub,
                     catalogue_file=test_catalogue, env={'HF_HOME': str(home)})
    assert run.returncode == 0, run.stderr


def test_offline_mode_checks_local_files_only(hub, test_catalogue, tmp_path):
    folder = tmp_path / 'tiny'
    assert vlm_models('download', 'tiny_onnx', '--dir', folder, hub=hub,
                      catalogue_file=test_catalogue).returncode == 0
    before = len(hub.log)
    offline = {'HF_HUB_OFFLINE': '1'}
    run = vlm_models('download', 'tiny_onnx', '--dir', folder, hub=hub,
                     catalogue_file=test_catalogue, env=dict(offline))
    assert run.returncode == 0, run.stderr
    assert 'offline (HF_HUB_OFFLINE)' in run.stdout and hub.log[before:] == []
    run = vlm_models('download', 'tiny_onnx', '--dir', tmp_path / 'empty', hub=hub,
                     catalogue_file=test_catalogue, env=dict(offline))
    assert run.returncode == 1
    assert (f'{ONNX_FILES[0]}: offline (HF_HUB_OFFLINE=1) and neither in '
            in run.stderr)
    assert hub.log[before:] == []


def test_two_repositories_and_mmproj_folders_verify(hub, test_catalogue, tmp_path):
    for name in ('tiny_onnx_vision_gguf', 'tiny_mmproj'):
        folder = tmp_path / name
        run = vlm_models('download', name, '--dir', folder, hub=hub,
                         catalogue_file=test_catalogue)
        assert run.returncode == 0, run.stderr
        run = vlm_models('verify', folder, catalogue_file=test_catalogue)
        assert run.returncode == 0, run.stdout + run.stderr
        assert 'PASS shape tiny-Q8_0.gguf: embedding_length 64' in run.stdout or \
            name == 'tiny_mmproj'
    assert 'PASS shape mmproj-tiny-f32.gguf: projection_dim 64 = tiny-Q8_0.gguf' in run.stdout
    assert "PASS family: mmproj-tiny-f32.gguf projector 'idefics3'" in run.stdout


# --- verify ----------------------------------------------------------------------------------

def test_verify_reports_each_failure(hub, test_catalogue, models, tmp_path):
    folder = tmp_path / 'tiny'
    assert vlm_models('download', 'tiny_onnx', '--dir', folder, hub=hub,
                      catalogue_file=test_catalogue).returncode == 0
    # Another model's vision encoder (same file name), a damaged decoder, a missing file.
    shutil.copyfile(models['b'] / ONNX_FILES[0], folder / ONNX_FILES[0])
    with open(folder / ONNX_FILES[2], 'r+b') as f:  # a weight's byte: the graph still loads
        f.seek(-1000, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1000, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    (folder / 'tokenizer_config.json').unlink()
    run = vlm_models('verify', folder, catalogue_file=test_catalogue)
    assert run.returncode == 1
    out = run.stdout
    assert f'FAIL file tokenizer_config.json: missing (from {SMOLVLM_REPO})' in out
    assert f'FAIL file {ONNX_FILES[2]}: sha256 ' in out and ', expected ' in out
    assert f'FAIL file {ONNX_FILES[0]}: size ' in out
    assert f'FAIL shape {ONNX_FILES[0]}: image_features width 128, but config.json' in out
    assert 'PASS family' in out and out.splitlines()[-1] == '4 check(s) failed'

    # Checked against the hub when the folder has no manifest and the catalogue no pins.
    manifest.path_in(folder).unlink()
    run = vlm_models('verify', folder, '--config', 'tiny_onnx', hub=hub,
                     catalogue_file=test_catalogue)
    assert f'(hub metadata of {SMOLVLM_REPO}@' in run.stdout
    assert f'FAIL file {ONNX_FILES[2]}: sha256' in run.stdout
    # ... and says what it could not check when the hub is out of reach.
    run = vlm_models('verify', folder, '--config', 'tiny_onnx', '--no-hub',
                     catalogue_file=test_catalogue)
    assert f'SKIP file {ONNX_FILES[2]}: present' in run.stdout

    # A folder of the other family.
    run = vlm_models('verify', folder, '--config', 'tiny_internvl',
                     catalogue_file=test_catalogue)
    assert run.returncode == 1
    assert ("FAIL family: config.json model_type 'smolvlm' is SmolVLM/SmolVLM2, but the "
            'parameters say model_type 0') in run.stdout


# --- export ----------------------------------------------------------------------------------

def test_export_without_torch_says_what_to_install(test_catalogue, tmp_path):
    code = ('import sys; sys.modules["torch"] = None; '
            'from vlm_ros.models_cli.main import main; sys.exit(main())')
    run = subprocess.run(
        [sys.executable, '-c', code, 'export', 'tiny_internvl', '--dir', str(tmp_path),
         '--no-download'], capture_output=True, text=True, timeout=60,
        env={**os.environ, 'VLM_MODELS_CATALOGUE': str(test_catalogue)})
    assert run.returncode == 1
    assert 'pip install -r requirements/reference.txt' in run.stderr
    assert 'cannot import: torch' in run.stderr


def test_export_makes_and_checks_what_no_hub_publishes(hub, test_catalogue, tmp_path):
    pytest.importorskip('torch')
    pytest.importorskip('llama_cpp')
    internvl = pathlib.Path(tiny_model('cached_internvl_model', 'a'))
    # The hub publishes the transformers checkpoint only (no onnx/ folder, no GGUF).
    hub.add(INTERNVL_REPO, _read(internvl, CONFIG_FILES + ['model.safetensors']))
    folder = tmp_path / 'internvl'
    run = vlm_models('export', 'tiny_internvl', '--dir', folder, hub=hub,
                     catalogue_file=test_catalogue, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert 'model.safetensors: fetched' in run.stdout
    assert 'PASS features scene.png: ' in run.stdout
    assert 'PASS features gradient 640x240: ' in run.stdout
    assert 'PASS tokens gradient 640x240: the first 8 greedy tokens agree' in run.stdout
    assert 'PASS logits: llama.cpp and transformers pick token' in run.stdout
    record = manifest.read(folder)['files']
    assert record[ONNX_FILES[0]]['exporter'] == 'internvl-vision-onnx'
    # The folder now has every file the configuration needs, checked by verify.
    run = vlm_models('verify', folder, catalogue_file=test_catalogue)
    assert run.returncode == 0, run.stdout
    assert f'PASS file {ONNX_FILES[0]}: ' in run.stdout
    assert 'PASS shape tiny-internvl-Q8_0.gguf: embedding_length 64' in run.stdout
    # download on the robot: the hub files, and the exported ones are reported present.
    run = vlm_models('download', 'tiny_internvl', '--dir', folder, hub=hub,
                     catalogue_file=test_catalogue)
    assert run.returncode == 0, run.stderr
    empty = vlm_models('download', 'tiny_internvl', '--dir', tmp_path / 'robot', hub=hub,
                       catalogue_file=test_catalogue)
    assert empty.returncode == 3
    assert 'which no hub publishes: run `vlm_models export tiny_internvl' in empty.stderr


def _shard(folder, out):
    """Return ``folder``'s model.safetensors cut in two shards plus their index, as files."""
    from safetensors.numpy import load_file, save_file
    weights = load_file(str(folder / 'model.safetensors'))
    names = sorted(weights)
    files, weight_map = {}, {}
    for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        shard = f'model-0000{i + 1}-of-00002.safetensors'
        save_file({n: weights[n] for n in part}, str(out / shard))
        files[shard] = (out / shard).read_bytes()
        weight_map.update({n: shard for n in part})
    total = sum(int(w.nbytes) for w in weights.values())
    files['model.safetensors.index.json'] = json.dumps(
        {'metadata': {'total_size': total}, 'weight_map': weight_map}).encode()
    return files


@pytest.mark.parametrize('variant', sorted(QWEN2VL_REPOS))
def test_export_qwen2vl_gguf_and_mmproj(hub, test_catalogue, tmp_path, variant):
    pytest.importorskip('torch')
    pytest.importorskip('llama_cpp')
    name = f'tiny_{variant.replace("-", "_")}'
    checkpoint = pathlib.Path(tiny_model('cached_qwen2vl_model', variant))
    files = _read(checkpoint, CONFIG_FILES)
    if variant == 'qwen2-a':
        files.update(_read(checkpoint, ['model.safetensors']))
    else:
        files.update(_shard(checkpoint, tmp_path))
    hub.add(QWEN2VL_REPOS[variant], files)
    folder = tmp_path / name
    run = vlm_models('export', name, '--dir', folder, hub=hub, catalogue_file=test_catalogue,
                     timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    if variant == 'qwen25-a':
        assert '2 weight shard(s) named by the checkpoint index' in run.stdout
        assert 'model-00002-of-00002.safetensors: fetched' in run.stdout
    assert 'PASS logits: llama.cpp and transformers pick token' in run.stdout
    projector = 'qwen2vl_merger' if variant == 'qwen2-a' else 'qwen2.5vl_merger'
    assert f'PASS load: libmtmd runs the {projector} projector on {name}-Q8_0.gguf' \
        in run.stdout
    # Each sample resized to the processor's grid (the tiny budget: at most 48 tokens).
    assert 'PASS features scene.png: 168x168, 36 tokens' in run.stdout
    assert 'PASS features gradient 640x240: 308x112, 44 tokens' in run.stdout
    record = manifest.read(folder)['files']
    assert record[f'mmproj-{name}-f16.gguf']['exporter'] == 'qwen2vl-mmproj-f16'
    assert record[f'{name}-Q8_0.gguf']['exporter'] == 'qwen2vl-gguf-q8_0'
    # The folder runs as the configuration says: llama.cpp's files beside the hub's config.
    run = vlm_models('verify', folder, catalogue_file=test_catalogue)
    assert run.returncode == 0, run.stdout
    assert f'PASS shape {name}-Q8_0.gguf: embedding_length 64' in run.stdout
    assert (f'PASS shape mmproj-{name}-f16.gguf: projection_dim 64 = {name}-Q8_0.gguf '
            'embedding_length') in run.stdout


def test_checkpoint_shards_come_from_the_index(tmp_path):
    entry = catalogue.FileEntry('weights/model.safetensors.index.json')
    index = tmp_path / entry.path
    index.parent.mkdir()
    assert download.checkpoint_shards(tmp_path, [entry]) == []  # not fetched yet
    index.write_text(json.dumps({'weight_map': {'a': 'm-2.safetensors', 'b': 'm-1.safetensors',
                                                'c': 'm-2.safetensors'}}))
    assert download.checkpoint_shards(tmp_path, [entry, catalogue.FileEntry('config.json')]) \
        == ['weights/m-1.safetensors', 'weights/m-2.safetensors']
    index.write_text(json.dumps({'weight_map': {'a': '../../etc/passwd'}}))
    with pytest.raises(RuntimeError, match='outside the folder'):
        download.checkpoint_shards(tmp_path, [entry])


def test_exporter_refuses_another_family(test_catalogue, tmp_path):
    config = catalogue.find(catalogue.load(test_catalogue), 'tiny_internvl')
    product = catalogue.Product('mmproj.gguf', 'qwen2vl-mmproj-f16')
    with pytest.raises(ValueError, match='converts qwen2_vl checkpoints, not the internvl'):
        export._export_one(tmp_path, config, product, None, [], 8, None)

"""
The test tooling itself (tools/vlm_ros_tools): model cache naming and the InternVL factory.

Fast and without building a model: the cache folders are named after the same source
digest the torch-free manifest checks, every tooling module a model is built from is in
that digest, and the InternVL factory takes ``image_size`` / ``patch_size`` as ints or as
the square ``[h, w]`` lists transformers' InternVL configs write.
"""

import ast
import os

import pytest
from vlm_ros_tools import model_cache

TOOLS = os.path.dirname(os.path.abspath(model_cache.__file__))


def _local_imports(module):
    """Return the vlm_ros_tools modules ``module`` imports (module level or in functions)."""
    with open(os.path.join(TOOLS, module + '.py'), encoding='utf-8') as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split('.')[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize('kind, exporter', [('smolvlm', 'export_onnx'),
                                            ('internvl', 'export_internvl')])
def test_sources_cover_every_module_a_model_is_built_from(kind, exporter):
    # model_cache names the folders and keeps the manifest; it writes nothing of a model.
    todo, seen = [exporter], set()
    while todo:
        module = todo.pop()
        if module not in seen and module != 'model_cache':
            seen.add(module)
            todo += sorted(_local_imports(module))
    assert seen <= {os.path.splitext(name)[0] for name in model_cache.SOURCES[kind]}


def test_build_once_builds_once_under_the_manifest_digest(tmp_path, monkeypatch):
    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path))
    calls = []

    def write(folder, **args):
        calls.append(args)
        with open(os.path.join(folder, 'model.txt'), 'w', encoding='utf-8') as f:
            f.write('tiny\n')

    first = model_cache.build_once('smolvlm', 'x', write, variant='x', seed=1)
    again = model_cache.build_once('smolvlm', 'x', write, variant='x', seed=1)
    other = model_cache.build_once('smolvlm', 'x', write, variant='x', seed=2)
    assert first == again != other
    assert calls == [{'variant': 'x', 'seed': 1}, {'variant': 'x', 'seed': 2}]
    fingerprint = model_cache.build_fingerprint('smolvlm', variant='x', seed=1)
    assert first == os.path.join(str(tmp_path), f'x-{fingerprint}')
    assert not [n for n in os.listdir(str(tmp_path)) if n.startswith('.build-')]
    # Recorded in the manifest, the folder is fresh for the torch-free lookups.
    model_cache.record('smolvlm-x', 'smolvlm', first)
    entry = model_cache.read_manifest()['smolvlm-x']
    assert model_cache.status('smolvlm-x', entry) == (first, None)


def _fake_ids():
    return {'endoftext_id': 384, 'im_start_id': 385, 'im_end_id': 386, 'image_token_id': 394,
            'vocab_size': 402}


@pytest.mark.parametrize('variant', ['a', 'b'])
@pytest.mark.parametrize('form', [list, tuple])
def test_internvl_factory_takes_square_list_sizes(variant, form):
    pytest.importorskip('transformers')
    internvl_factory = pytest.importorskip('vlm_ros_tools.internvl_factory')

    spec = internvl_factory.VARIANTS[variant]
    listed = dict(spec, vision=dict(spec['vision']))
    for key in ('image_size', 'patch_size'):
        listed['vision'][key] = form([spec['vision'][key]] * 2)
    ids = _fake_ids()
    assert (internvl_factory.make_config(listed, ids).to_dict()
            == internvl_factory.make_config(variant, ids).to_dict())
    assert (internvl_factory.image_seq_length(listed)
            == internvl_factory.image_seq_length(variant))
    assert (internvl_factory.preprocessor_config(listed)
            == internvl_factory.preprocessor_config(variant))
    # The names' specs are untouched.
    assert isinstance(spec['vision']['image_size'], int)


def test_internvl_factory_refuses_non_square_sizes():
    pytest.importorskip('transformers')
    internvl_factory = pytest.importorskip('vlm_ros_tools.internvl_factory')

    spec = internvl_factory.VARIANTS['a']
    for key, value in (('image_size', [64, 96]), ('patch_size', [8, 16]),
                       ('image_size', [64]), ('patch_size', 8.0)):
        bad = dict(spec, vision=dict(spec['vision'], **{key: value}))
        with pytest.raises(ValueError, match=key):
            internvl_factory.image_seq_length(bad)
        with pytest.raises(ValueError, match=key):
            internvl_factory.make_config(bad, _fake_ids())

"""
Vision encoders with their attention fused give the exported graph's features.

Every layer of the tiny SmolVLM (SigLIP, with a pixel mask) and InternVL (InternViT) exports
must fuse, in float32 and int8; frames with padded pixels run on the exported graph; a graph
whose shapes disagree with the config, or a machine without the ``onnx`` package, runs the
export as it is. The token-exact parity tests of both families run through the fused graphs
too, wherever ``onnx`` is installed.
"""

import json
import os
import platform
import sys

import numpy as np
import pytest
from vlm_ros.engine import memory
from vlm_ros.engine.runtimes import onnx_attention
from vlm_ros.engine.runtimes.onnx import OnnxVisionEncoder, SessionOptions
from vlm_ros_tools import model_cache

pytest.importorskip('onnx')


def _model(builder, *args):
    try:
        return builder(*args)
    except model_cache.NotCached as exc:
        pytest.skip(str(exc))


def _encoder(model_dir, graph, heads=None, hidden=None):
    with open(os.path.join(model_dir, 'config.json'), encoding='utf-8') as f:
        config = json.load(f)
    vision = config['vision_config']
    text = config.get('text_config') or config.get('llm_config')
    return OnnxVisionEncoder(os.path.join(model_dir, 'onnx', graph), SessionOptions(2),
                             text['hidden_size'],
                             vision['num_attention_heads'] if heads is None else heads,
                             vision['hidden_size'] if hidden is None else hidden), vision


def _feed(encoder, vision, seed=0):
    size = vision['image_size']
    size = size[0] if isinstance(size, list) else size
    pixels = np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)
    if 'pixel_attention_mask' in encoder.io.inputs:  # SmolVLM: [batch, frames, ...]
        return {'pixel_values': pixels[None], 'pixel_attention_mask': np.ones(
            (1, 1, size, size), dtype=bool)}
    return {'pixel_values': pixels}


def _exported(encoder, feed):
    return encoder.exported_session().run(None, feed)[0].reshape(-1, encoder.hidden_size)


MODELS = [('smolvlm', model_cache.cached_test_model, v) for v in 'ab'] + \
    [('internvl', model_cache.cached_internvl_model, v) for v in 'ab']


@pytest.mark.parametrize('graph', ['vision_encoder.onnx', 'vision_encoder_int8.onnx'])
@pytest.mark.parametrize('family,builder,variant', MODELS)
def test_every_layer_fuses_and_features_match(family, builder, variant, graph):
    encoder, vision = _encoder(_model(builder, variant), graph)
    assert encoder.fused is not None, f'{family} {variant} {graph}: nothing fused'
    assert encoder.fused.layers == vision['num_hidden_layers']
    assert encoder.fused.path == ''  # the session has read its temporary files, now deleted
    expected_masks = {'pixel_attention_mask'} if family == 'smolvlm' else set()
    assert encoder.fused.mask_inputs == expected_masks
    for seed in range(2):
        feed = _feed(encoder, vision, seed)
        got, want = encoder.run(feed), _exported(encoder, feed)
        scale = float(np.abs(want).max())
        # int8: dynamic quantization may round one activation the other way (tiny InternVL
        # 'a', seed 1: 1.01% of the largest feature on an AMD EPYC with AVX2 only).
        tolerance = 1e-5 if graph == 'vision_encoder.onnx' else 2e-2
        assert np.abs(got - want).max() <= tolerance * scale, (family, variant, graph, seed)


def test_frames_with_padded_pixels_run_as_exported():
    encoder, vision = _encoder(_model(model_cache.cached_test_model, 'a'),
                               'vision_encoder.onnx')
    feed = _feed(encoder, vision)
    encoder.run(feed)
    assert encoder._exported is None  # all pixels valid: the fused graph alone
    size = feed['pixel_attention_mask'].shape[-1]
    feed['pixel_attention_mask'][..., size // 2:] = False
    feed['pixel_values'][..., size // 2:] = 0.0
    got = encoder.run(feed)
    assert encoder._exported is not None
    assert np.array_equal(got, _exported(encoder, feed))
    # The mask matters: the fused graph, which drops it, would answer differently.
    fused = encoder.session.run(None, feed)[0].reshape(-1, encoder.hidden_size)
    assert np.abs(fused - got).max() > 1e-3


@pytest.mark.parametrize('heads,hidden', [(3, None), (None, 3), (0, None)])
def test_shapes_the_config_does_not_give_stay_as_exported(heads, hidden):
    model_dir = _model(model_cache.cached_internvl_model, 'a')
    encoder, vision = _encoder(model_dir, 'vision_encoder.onnx', heads, hidden)
    assert encoder.fused is None and encoder.session is encoder.exported_session()
    reference, _ = _encoder(model_dir, 'vision_encoder.onnx')
    feed = _feed(encoder, vision)
    assert np.array_equal(encoder.run(feed), _exported(reference, feed))


def test_without_the_onnx_package_the_export_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnx', None)  # import onnx raises ImportError
    encoder, vision = _encoder(_model(model_cache.cached_test_model, 'a'),
                               'vision_encoder.onnx')
    assert encoder.fused is None
    assert encoder.run(_feed(encoder, vision)).shape[-1] == encoder.hidden_size


def test_a_graph_that_does_not_load_fused_loads_as_exported(monkeypatch):
    model_dir = _model(model_cache.cached_test_model, 'a')
    real = onnx_attention.fuse_file

    written = []

    def broken(path, num_heads, hidden_size):
        fused = real(path, num_heads, hidden_size)
        with open(fused.path, 'wb') as f:
            f.write(b'not a graph')
        written.append(os.path.dirname(fused.path))
        return fused

    monkeypatch.setattr(onnx_attention, 'fuse_file', broken)
    encoder, vision = _encoder(model_dir, 'vision_encoder.onnx')
    assert encoder.fused is None
    assert encoder.run(_feed(encoder, vision)).shape[-1] == encoder.hidden_size
    assert written and not os.path.exists(written[0])  # deleted all the same


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_glibc_takes_the_memory_settings():
    assert memory.map_big_blocks() and memory.map_big_blocks()  # once, then remembered

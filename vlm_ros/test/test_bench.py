"""
The benchmark harness end to end on the tiny test model: complete, well-formed results.

``python -m vlm_ros_bench --tiny`` runs every path (transformers, ONNX Runtime fp32 / int8,
ONNX vision + llama.cpp f16 / Q8_0 / Q4_0, libmtmd, raw llama.cpp) with image splitting off
and on, the hardware probes and the ROS overhead through a real vlm_node, and writes JSON and
markdown. ``python -m vlm_ros_bench qwen2vl --tiny`` does the same for Qwen2-VL on the tiny
``qwen2-a``: transformers, our ONNX vision encoder and libmtmd feeding a Q4_0 GGUF, and raw
llama.cpp through libmtmd's helpers. Only the shape of the results is checked, never a speed.
"""

import json
import os
import subprocess
import sys

from conftest import REPO
import pytest

pytest.importorskip('torch')
sys.path.insert(0, str(REPO / 'benchmarks'))
from vlm_ros_bench import paths, schema  # noqa: E402

pytestmark = pytest.mark.ros  # starts vlm_node for the ROS overhead


@pytest.fixture(scope='module')
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(REPO / 'benchmarks'), str(REPO / 'tools'), env.get('PYTHONPATH', '')])
    run = subprocess.run([sys.executable, '-m', 'vlm_ros_bench', 'run', '--tiny', '--out',
                          str(out), '--name', 'tiny'], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-6000:]
    doc = json.loads((out / 'tiny.json').read_text())
    return out, doc, run.stderr


def test_results_match_the_schema(tiny_results):
    _, doc, _ = tiny_results
    assert schema.validate(doc) == []
    assert doc['mode'] == 'tiny'
    assert doc['settings']['threads'] == os.cpu_count()
    assert doc['machine']['threads_used'] == doc['settings']['threads']
    assert doc['machine']['versions']['onnxruntime']
    assert doc['machine']['versions']['llama_cpp_python']
    assert doc['hardware']['bandwidth']['memory_read_gbps'] > 0
    assert doc['hardware']['matmul']['peak_gflops'] > 0


def test_action_feedback_and_cancel_measured(tiny_results):
    out, doc, _ = tiny_results
    action = doc['action']
    assert action['status'] == 'ok', action['error']
    assert action['tpot_feedback_ms']['n'] == action['tpot_no_feedback_ms']['n'] == 2
    assert action['cancel_latency_ms']['n'] == 2 and action['cancel_latency_ms']['median'] > 0
    assert action['feedback_messages']['median'] > action['new_tokens'] // 4
    assert action['feedback_cost_paired']['n'] == 2
    # The lean caller's reader, spun only after each result, gets every message of the same
    # goal each time; an ActionClient's callback may miss the last ones (see README).
    lean = action['lean']
    assert lean['tpot_feedback_ms']['n'] == lean['feedback_cost_paired']['n'] == 2
    assert len(set(lean['feedback_messages']['values'])) == 1
    assert lean['feedback_messages']['median'] >= action['feedback_messages']['max']
    text = (out / 'tiny.md').read_text()
    assert '## The ~/generate action' in text and 'lean caller' in text


def test_reuse_measured(tiny_results):
    out, doc, _ = tiny_results
    assert [r['path'] for r in doc['reuse']] == ['onnx-int8', 'onnx-int8-vision+llamacpp-q8_0']
    for r in doc['reuse']:
        assert r['status'] == 'ok', r['error']
        assert r['follow_up_cached_tokens']['median'] > r['new_image_cached_tokens']['median']
        turns = r['turns']
        assert [t['turn'] for t in turns] == [1, 2, 3, 4]
        assert all(t['prefilled_tokens']['median'] < t['prompt_tokens'] for t in turns[1:])
    assert '## Reuse: feature and prefix caches' in (out / 'tiny.md').read_text()


def test_engine_targets_set_against_the_reference_and_raw(tiny_results):
    out, doc, _ = tiny_results
    rows = {(t['path'], t['split']): t for t in doc['engine_targets']}
    paths = ('onnx-int8-vision+llamacpp-q8_0', 'onnx-int8-vision+llamacpp-q4_0')
    assert set(rows) == {(p, split) for p in paths for split in (False, True)}
    for t in rows.values():
        assert 0 < t['first_token_ms'] and 0 < t['first_token_fraction']
        assert t['first_token_ms'] == pytest.approx(
            t['first_token_fraction'] * t['reference_first_token_ms'])
        assert t['peak_rss_bound_mb'] > t['raw_peak_rss_mb'] > 0 and t['vision_file_mb'] > 0
    assert '## Engine-speed targets' in (out / 'tiny.md').read_text()


def test_every_path_and_split_ran(tiny_results):
    _, doc, _ = tiny_results
    ran = {(r['path'], r['split']) for r in doc['runs']}
    assert ran == {(p.name, split) for p in paths.PATHS for split in (False, True)}
    for r in doc['runs']:
        where = f'{r["path"]} split={r["split"]}'
        assert r['status'] == 'ok', f'{where}: {r["error"]}'
        t = r['timings']
        for name in ('prefill_ms', 'decode_ms', 'tpot_ms', 'tokens_per_s', 'e2e_ms'):
            assert t[name] and t[name]['n'] == r['repetitions'] >= 1, f'{where}: {name}'
            assert t[name]['min'] <= t[name]['median'] <= t[name]['max']
        raw = r['path_info']['kind'] == 'raw'
        assert (t['vision_ms'] is None) == raw and (t['preprocess_ms'] is None) == raw, where
        assert r['peak_rss_mb'] > 0 and r['prompt_tokens'] > 0
        assert r['model_files_mb'] > 0 and 0 < r['rss_start_mb'] <= r['peak_rss_mb'], where
        roof = r['roofline']
        assert roof['decode_bytes_per_token'] > 0 and roof['tpot_bound_ms'] > 0, where
        assert roof['bandwidth_fraction'] > 0 and roof['prefill_gflop'] > 0, where
        assert (roof['vision_gflop'] is None) == raw, where


def test_paths_see_the_same_prompt(tiny_results):
    _, doc, _ = tiny_results
    for split in (False, True):
        runs = [r for r in doc['runs'] if r['split'] == split]
        # libmtmd lays the prompt out itself, and without splitting it still encodes a 1x1
        # grid plus the global view (two frames where transformers has one).
        if not split:
            runs = [r for r in runs if r['path_info']['kind'] != 'mtmd']
        assert len({r['prompt_tokens'] for r in runs}) == 1, split
        assert len({r['image_tokens'] for r in runs
                    if r['path_info']['kind'] != 'raw'}) == 1, split
    off = next(r for r in doc['runs'] if not r['split'] and r['path'] == 'onnx-fp32')
    on = next(r for r in doc['runs'] if r['split'] and r['path'] == 'onnx-fp32')
    assert on['image_tokens'] > off['image_tokens'] > 0


def test_overheads_are_reported(tiny_results):
    _, doc, _ = tiny_results
    assert {(o['gguf_type'], o['split']) for o in doc['decode_overhead']} >= {
        (t, s) for t in ('f16', 'q8_0', 'q4_0') for s in (False, True)}
    ros = doc['ros_overhead']
    assert ros['status'] == 'ok', ros['error']
    names = ['rgb8 640x480', 'rgb8 1920x1080', 'jpeg 640x480', 'jpeg 1920x1080']
    assert [(c['transport'], c['name']) for c in ros['cases']] == [
        (t, n) for t in ('fastdds default', 'large-message profile') for n in names]
    assert ros['transports'][1]['profile'].endswith('fastdds_large_messages.xml')
    for case in ros['cases']:
        assert case['overhead_ms'] and case['round_trip_ms']['median'] > 0, case


def test_paired_overhead_measured(tiny_results):
    out, doc, _ = tiny_results
    paired = doc['overhead_paired']
    assert paired['status'] == 'ok', paired['error']
    assert {(c['gguf_type'], c['split']) for c in paired['cases']} == {
        (t, s) for t in ('q8_0', 'q4_0') for s in (False, True)}
    for case in paired['cases']:
        assert case['status'] == 'ok', case['error']
        ours, raw = case['pipeline_tpot_ms'], case['raw_tpot_ms']
        assert ours['n'] == raw['n'] == case['overhead_fraction']['n'] == 2
        # Each pair's overhead is its own ratio, not one of medians.
        assert case['overhead_fraction']['values'] == pytest.approx(
            [o / r - 1 for o, r in zip(ours['values'], raw['values'], strict=True)])
    assert 'in pairs' in (out / 'tiny.md').read_text()


def test_markdown_and_chart(tiny_results):
    out, doc, stderr = tiny_results
    text = (out / 'tiny.md').read_text()
    assert doc['command'] in text
    for heading in ('## Hardware limits', '### image splitting off', '### image splitting on',
                    '## ROS overhead', '## Our per-token overhead over raw llama.cpp'):
        assert heading in text
    if doc['artifacts']['chart']:
        assert (out / 'tiny.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    else:
        assert 'matplotlib' in doc['artifacts']['chart_skipped']
        assert 'chart skipped' in stderr


def test_schema_check_finds_problems(tiny_results):
    _, doc, _ = tiny_results
    broken = json.loads(json.dumps(doc))
    del broken['runs'][0]['timings']['tpot_ms']
    broken['hardware']['bandwidth']['memory_read_gbps'] = 'fast'
    problems = schema.validate(broken)
    assert any("missing 'tpot_ms'" in p for p in problems)
    assert any('memory_read_gbps' in p for p in problems)


@pytest.mark.parametrize('given, expected', [('both', [False, True]), ('on', [True]),
                                             ('off', [False]), ('on,off,on', [True, False])])
def test_splits_argument(given, expected):
    import argparse

    from vlm_ros_bench import run

    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    assert run._settings(parser.parse_args(['--splits', given]))['splits'] == expected
    with pytest.raises(SystemExit, match='--splits takes'):
        run._settings(parser.parse_args(['--splits', 'sometimes']))


@pytest.mark.skipif(not os.path.isdir('/dev/shm'), reason='Fast DDS segments live in /dev/shm')
def test_large_message_profile_takes_effect():
    """The installed profile parses on this distribution's Fast DDS and gives its segment."""
    from vlm_ros_bench import ros_overhead

    env = ros_overhead.transport_env(ros_overhead.profile_file())
    env['ROS_DOMAIN_ID'] = str(1 + os.getpid() % 100)
    probe = ('import os, rclpy\n'
             'before = set(os.listdir("/dev/shm"))\n'
             'rclpy.init()\n'
             'node = rclpy.create_node("vlm_profile_probe")\n'
             'sizes = [os.path.getsize("/dev/shm/" + f) for f in '
             'set(os.listdir("/dev/shm")) - before]\n'
             'print(max(sizes, default=0))\n'
             'node.destroy_node()\n'
             'rclpy.shutdown()\n')
    out = subprocess.run([sys.executable, '-c', probe], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'XMLPARSER' not in out.stderr, out.stderr[-3000:]
    # A participant's own segment is 512 KiB by default; the profile asks for 32 MiB.
    assert int(out.stdout.split()[-1]) >= 32 * 1024 * 1024, out.stderr[-3000:]


def test_concurrency_measured(tiny_results):
    out, doc, _ = tiny_results
    part = doc['concurrency']
    assert part['status'] == 'ok', part['error']
    assert [level['requests'] for level in part['levels']] == [1, 2, 4, 8]
    assert [level['requests'] for level in part['one_frame_levels']] == [1, 2, 4, 8]
    for level in part['levels'] + part['one_frame_levels']:
        assert level['aggregate_tokens_per_s']['median'] > 0
        assert level['raw_decode_tokens_per_s']['median'] > 0
        # Every request of the level generated its tokens.
        assert level['tpot_ms']['n'] == level['requests'] * part['repetitions']
    assert set(part['levels'][0]['step_batches']) == {'1'}  # a request alone steps alone
    assert '## Concurrent requests: continuous batching' in (out / 'tiny.md').read_text()


# -- Qwen2-VL (python -m vlm_ros_bench qwen2vl) -------------------------------------------------

@pytest.fixture(scope='module')
def qwen2vl_results(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench_qwen2vl')
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(REPO / 'benchmarks'), str(REPO / 'tools'), env.get('PYTHONPATH', '')])
    run = subprocess.run([sys.executable, '-m', 'vlm_ros_bench', 'qwen2vl', '--tiny', '--out',
                          str(out), '--name', 'qwen2vl-tiny'], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-6000:]
    return out, json.loads((out / 'qwen2vl-tiny.json').read_text())


def test_qwen2vl_results_match_the_schema(qwen2vl_results):
    _, doc = qwen2vl_results
    assert schema.validate_qwen2vl(doc) == []
    assert doc['mode'] == 'tiny' and doc['model']['name'] == 'tiny-qwen2-a'
    assert doc['settings']['threads'] == os.cpu_count()
    broken = json.loads(json.dumps(doc))
    del broken['runs'][0]['timings']['ttft_ms']
    assert any("missing 'ttft_ms'" in p for p in schema.validate_qwen2vl(broken))


def test_qwen2vl_every_path_ran(qwen2vl_results):
    from vlm_ros_bench import qwen2vl

    _, doc = qwen2vl_results
    assert [r['path'] for r in doc['runs']] == list(qwen2vl.DEFAULT_PATHS)
    for r in doc['runs']:
        assert r['status'] == 'ok', f'{r["path"]}: {r["error"]}'
        t = r['timings']
        for name in ('preprocess_ms', 'vision_ms', 'prefill_ms', 'ttft_ms', 'decode_ms',
                     'tpot_ms', 'e2e_ms'):
            assert t[name] and t[name]['n'] == r['repetitions'] >= 1, f'{r["path"]}: {name}'
        assert t['ttft_ms']['median'] == pytest.approx(sum(
            t[k]['median'] for k in ('preprocess_ms', 'vision_ms', 'prefill_ms')))
        assert r['peak_rss_mb'] > 0 and r['model_files_mb'] > 0, r['path']
        assert r['decode']['weight_bytes_per_token'] > 0 and r['decode']['achieved_gbps'] > 0


def test_qwen2vl_paths_see_the_same_prompt(qwen2vl_results):
    """Ours, libmtmd's layout, the raw helpers and transformers: the same tokens."""
    _, doc = qwen2vl_results
    expected = doc['settings']['image']['image_tokens']
    assert expected > 0
    assert {r['image_tokens'] for r in doc['runs']} == {expected}
    assert len({r['prompt_tokens'] for r in doc['runs']}) == 1
    assert doc['runs'][0]['prompt_tokens'] > expected


def test_qwen2vl_compared_with_raw_llamacpp_and_the_reference(qwen2vl_results):
    out, doc = qwen2vl_results
    rows = {c['path']: c for c in doc['comparison']}
    assert set(rows) == {'onnx-int8-vision+llamacpp-q4_0', 'onnx-vision+llamacpp-q4_0',
                         'mtmd+llamacpp-q4_0'}
    for c in rows.values():
        assert c['raw_tpot_ms'] > 0 and c['reference_ttft_ms'] > 0
        assert c['tpot_overhead_ms'] == pytest.approx(c['tpot_ms'] - c['raw_tpot_ms'])
        assert c['ttft_vs_reference'] == pytest.approx(c['ttft_ms'] / c['reference_ttft_ms'])
    text = (out / 'qwen2vl-tiny.md').read_text()
    assert doc['command'] in text
    for heading in ('## Time per phase, first token and memory',
                    '## Our engine against raw llama.cpp and the reference', '## Model files'):
        assert heading in text


def test_make_bench_runs_qwen2vl_after_the_main_run():
    """``run --qwen2vl`` (what scripts/bench.sh passes) hands its settings on."""
    import argparse

    import vlm_ros_bench.__main__ as cli

    args = argparse.Namespace(out='results', threads=3, tiny=True, rebuild=False)
    assert cli.qwen2vl_arguments(args) == ['--out', 'results', '--threads', '3', '--tiny']
    assert 'run --qwen2vl "$@"' in (REPO / 'scripts' / 'bench.sh').read_text()

"""
The benchmark run: models, hardware limits, every path in its own process, ROS, report.

``python -m vlm_ros_bench run`` (what ``make bench`` calls) measures the real-size models;
``--tiny`` runs the same code on the tiny test model in well under a minute (the test uses
it). Results go to ``--out`` (default ``benchmarks/results``) as ``<name>.json``,
``<name>.md`` and ``<name>.png``.
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from vlm_ros_bench import (action_stream, common, hardware, models, overhead, paths, qwen2vl,
                           report, schema, SCHEMA_VERSION)

DEFAULT_MODELS = ('smolvlm2-256m', 'smolvlm2-500m')


def _log(message):
    print(f'[bench] {message}', file=sys.stderr, flush=True)


def add_arguments(parser):
    """Add the run options to an argparse parser."""
    parser.add_argument('--tiny', action='store_true',
                        help='the tiny test model, 1 repetition, small hardware probes '
                             '(end-to-end check of the harness; the numbers mean nothing)')
    parser.add_argument('--models', default=','.join(DEFAULT_MODELS),
                        help=f'comma-separated, from {", ".join(models.SPECS)}')
    parser.add_argument('--paths', default='',
                        help='comma-separated path names (default: all): '
                             + ', '.join(p.name for p in paths.PATHS))
    parser.add_argument('--splits', default='off,on',
                        help='image splitting: off, on or both (off,on)')
    parser.add_argument('--reps', type=int, default=None, help='measured repetitions (5)')
    parser.add_argument('--warmup', type=int, default=None, help='warm-up runs (1)')
    parser.add_argument('--new-tokens', type=int, default=64)
    parser.add_argument('--threads', type=int, default=0, help='0: every core')
    parser.add_argument('--n-ctx', type=int, default=4096, help='llama.cpp context size')
    parser.add_argument('--group-splits', action=argparse.BooleanOptionalAction, default=None,
                        help='measure split off and on in one process per path (default: '
                             'only with --tiny)')
    parser.add_argument('--no-ros', action='store_true',
                        help='skip the ROS overhead (the action has --no-action)')
    parser.add_argument('--ros-model', default='tiny',
                        help="model the node runs for the ROS overhead: 'tiny' (isolates ROS "
                             'costs, the default) or a benchmark model name')
    parser.add_argument('--ros-reps', type=int, default=None, help='calls per image (20)')
    parser.add_argument('--no-action', action='store_true',
                        help='skip the ~/generate action (feedback cost, cancel latency)')
    parser.add_argument('--action-reps', type=int, default=None,
                        help='goals per setting for the action measurement (20)')
    parser.add_argument('--no-overhead', action='store_true',
                        help='skip the paired per-token overhead over raw llama.cpp')
    parser.add_argument('--overhead-reps', type=int, default=None,
                        help='pairs per GGUF type and split for the paired overhead (20)')
    parser.add_argument('--no-reuse', action='store_true',
                        help='skip the reuse measurement (feature and prefix caches)')
    parser.add_argument('--reuse-reps', type=int, default=None,
                        help='repetitions of the reuse measurement (5)')
    parser.add_argument('--no-concurrency', action='store_true',
                        help='skip concurrent requests (continuous batching)')
    parser.add_argument('--concurrency-reps', type=int, default=None,
                        help='repetitions per level of the concurrency measurement (3)')
    parser.add_argument('--bandwidth-mb', type=int, default=None, help='array size (1024)')
    parser.add_argument('--matmul-n', type=int, default=None, help='matrix size (2048)')
    parser.add_argument('--out', default=os.path.join(common.BENCH_DIR, 'results'))
    parser.add_argument('--name', default='latest', help='file name stem of the results')
    parser.add_argument('--note', default=None, help='a remark printed at the top')
    parser.add_argument('--timeout', type=float, default=7200.0,
                        help='seconds one path process may take')
    parser.add_argument('--rebuild', action='store_true', help='rebuild the models first')


def _settings(args):
    threads = args.threads or os.cpu_count() or 1
    tiny = args.tiny
    splits = []
    words = args.splits.lower().replace('both', 'off,on').split(',')
    for word in (w.strip() for w in words):
        if word not in ('off', 'on'):
            raise SystemExit(f'--splits takes off, on, off,on or both, got {word!r}')
        if (word == 'on') not in splits:
            splits.append(word == 'on')
    return {
        'threads': threads,
        'new_tokens': args.new_tokens if not tiny or args.new_tokens != 64 else 16,
        'warmup': args.warmup if args.warmup is not None else (0 if tiny else 1),
        'repetitions': args.reps if args.reps is not None else (1 if tiny else 5),
        'prompt': common.PROMPT,
        'image': {'width': common.IMAGE_SIZE, 'height': common.IMAGE_SIZE,
                  'kind': 'synthetic, fixed seed (vlm_ros_bench.common.bench_image)'},
        'n_ctx': args.n_ctx,
        'splits': splits,
        'group_splits': tiny if args.group_splits is None else bool(args.group_splits),
        'paths': [p.name for p in paths.select([n for n in args.paths.split(',') if n])],
        'models': ['tiny-a'] if tiny else [m for m in args.models.split(',') if m],
        'ignore_eos': True,
    }


def _build(name, rebuild):
    """Build a model in a child process (torch stays out of this one); return its manifest."""
    target = models.model_path(name)
    manifest = models.load_manifest(target) if os.path.isdir(target) else None
    if manifest is None or rebuild:
        _log(f'building {name} (once; cached in {models.cache_root()})')
        cmd = [sys.executable, '-m', 'vlm_ros_bench.models', name]
        if rebuild:
            cmd.append('--rebuild')
        subprocess.run(cmd, check=True, env=common.child_env())
        manifest = models.load_manifest(target)
    return manifest


def _hardware(settings, args, workdir):
    out = os.path.join(workdir, 'hardware.json')
    mb = args.bandwidth_mb or (64 if args.tiny else 1024)
    n = args.matmul_n or (256 if args.tiny else 2048)
    cmd = [sys.executable, '-m', 'vlm_ros_bench.hardware', out,
           '--threads', str(settings['threads']), '--mb', str(mb), '--matmul-n', str(n)]
    if args.tiny:
        cmd.append('--no-torch')
    subprocess.run(cmd, check=True, env=common.child_env(settings['threads']))
    with open(out, encoding='utf-8') as f:
        return json.load(f)


def _prompt_lengths(manifest, settings):
    """Prompt length (image tokens included) per split, as our pipeline lays it out."""
    from vlm_ros.engine.families import load_family
    from vlm_ros.engine.datatypes import ImageOptions

    family = load_family(manifest['model_dir'])
    image = common.bench_image()
    return {split: int(family.prepare(image, settings['prompt'], '',
                                      ImageOptions(do_image_splitting=split)).input_ids.size)
            for split in settings['splits']}


def _run_worker(spec, workdir, timeout, threads):
    tag = f'{spec["model_name"]}-{spec["path"]["name"]}-{len(os.listdir(workdir))}'
    result, failure = common.run_child('vlm_ros_bench.worker', spec, os.path.join(workdir, tag),
                                       common.child_env(threads), timeout, 'worker')
    if result is not None:
        return result
    return {'cases': [{'split': c['split'], 'status': 'error', 'error': failure,
                       'reps': [], 'files': c['files']} for c in spec['cases']]}


def _measure_model(manifest, settings, args, hw, workdir):
    records = []
    lengths = _prompt_lengths(manifest, settings)
    for path in paths.select(settings['paths']):
        cases = [{'split': split, 'files': paths.case_files(path, manifest, split),
                  'prompt_tokens': lengths[split]} for split in settings['splits']]
        groups = [cases] if settings['group_splits'] else [[c] for c in cases]
        for group in groups:
            spec = {'model_name': manifest['name'], 'path': path.describe(),
                    'model_dir': manifest['model_dir'], 'threads': settings['threads'],
                    'n_ctx': settings['n_ctx'], 'new_tokens': settings['new_tokens'],
                    'warmup': settings['warmup'], 'reps': settings['repetitions'],
                    'prompt': settings['prompt'], 'image_size': common.IMAGE_SIZE,
                    'cases': group}
            start = time.perf_counter()
            result = _run_worker(spec, workdir, args.timeout, settings['threads'])
            for case in result['cases']:
                record = report.run_record(manifest, path, case, settings, hw)
                records.append(record)
                split = 'on' if record['split'] else 'off'
                if record['status'] == 'ok':
                    t = record['timings']
                    _log(f'{manifest["name"]} {path.name} split {split}: e2e '
                         f'{t["e2e_ms"]["median"]:.0f} ms, TPOT {t["tpot_ms"]["median"]:.2f} '
                         f'ms, peak RSS {record["peak_rss_mb"]:.0f} MB '
                         f'({time.perf_counter() - start:.0f} s)')
                else:
                    _log(f'{manifest["name"]} {path.name} split {split}: ERROR '
                         f'{record["error"][:300]}')
    return records


def _ros(settings, args, workdir):
    if args.no_ros:
        return {'status': 'skipped', 'error': 'skipped (--no-ros)', 'model': None, 'cases': []}
    try:
        if args.tiny or args.ros_model == 'tiny':
            from vlm_ros_tools.export_onnx import cached_test_model

            model_dir, label = cached_test_model('a'), 'tiny test model a (ONNX)'
        else:
            model_dir = _build(args.ros_model, False)['model_dir']
            label = f'{args.ros_model} (ONNX fp32)'
        from vlm_ros_bench import ros_overhead
    except Exception as exc:  # noqa: B902 -- no ROS in this environment: report, go on
        return {'status': 'skipped', 'error': f'{type(exc).__name__}: {exc}', 'model': None,
                'cases': []}
    reps = args.ros_reps or (2 if args.tiny else 20)
    _log(f'ROS overhead: vlm_node on {label}, {reps} calls per image')
    try:
        return ros_overhead.measure_transports(model_dir, label, settings['threads'], reps,
                                               1 if args.tiny else 3, workdir)
    except Exception as exc:  # noqa: B902 -- reported in the results, the run goes on
        return {'status': 'error', 'error': f'{type(exc).__name__}: {exc}', 'model': label,
                'cases': []}


def _action(settings, args, manifests, workdir):
    """Measure ~/generate on the first model's int8 vision + Q8_0 files (or the tiny one)."""
    if args.no_action:
        return action_stream.skipped('skipped (--no-action)')
    manifest = manifests[0]
    files = paths.case_files(paths.BY_NAME['onnx-int8-vision+llamacpp-q8_0'], manifest, False)
    node_args = ['-p', f'model_file_name:={files["vision_model"]}',
                 '-p', f'llm_model_name:={files["decoder_model"]}',
                 '-p', f'n_ctx:={settings["n_ctx"]}']
    label = f'{manifest["name"]} (int8 vision + llama.cpp Q8_0)'
    reps = args.action_reps or (2 if args.tiny else 20)
    _log(f'~/generate action: vlm_node on {label}, {reps} goals per setting')
    return action_stream.measure_in_child(manifest['model_dir'], label, node_args,
                                          settings['threads'], reps, settings['new_tokens'],
                                          workdir)


def _paired_overhead(settings, args, manifests, workdir):
    """Our per-token cost over raw llama.cpp, in pairs, on the first model's GGUFs."""
    if args.no_overhead:
        return overhead.skipped('skipped (--no-overhead)')
    manifest = manifests[0]
    reps = args.overhead_reps or (2 if args.tiny else 20)
    _log(f'paired overhead: {manifest["name"]}, {reps} pairs per GGUF type and split')
    return overhead.measure_in_child(manifest, settings, _prompt_lengths(manifest, settings),
                                     reps, workdir)


REUSE_PATHS = ('onnx-int8', 'onnx-int8-vision+llamacpp-q8_0')


def _reuse(settings, args, manifests, workdir):
    """Measure the caches on the first model: follow-ups and conversation turns."""
    if args.no_reuse:
        return []
    manifest = manifests[0]
    reps = args.reuse_reps or (1 if args.tiny else 5)
    out = []
    for name in REUSE_PATHS:
        files = {k: v for k, v in paths.case_files(paths.BY_NAME[name], manifest, False).items()
                 if k.endswith('_model')}
        spec = {'model_dir': manifest['model_dir'], 'files': files, 'path': name,
                'threads': settings['threads'], 'n_ctx': settings['n_ctx'], 'reps': reps,
                'new_tokens': 4}
        _log(f'reuse: {manifest["name"]} {name}, {reps} repetitions')
        part, failure = common.run_child('vlm_ros_bench.reuse', spec,
                                         os.path.join(workdir, f'reuse-{name}'),
                                         common.child_env(settings['threads']),
                                         args.timeout, 'reuse process')
        if part is None:
            part = {'path': name, 'status': 'error', 'error': failure, 'repetitions': reps,
                    'first_ttft_ms': None, 'follow_up_ttft_ms': None, 'new_image_ttft_ms': None,
                    'follow_up_fraction': None, 'follow_up_cached_tokens': None,
                    'new_image_cached_tokens': None, 'turns': []}
        part['model'] = manifest['name']
        out.append(part)
    return out


CONCURRENCY_PATH = 'onnx-int8-vision+llamacpp-q8_0'


def _concurrency(settings, args, manifests, workdir):
    """Measure 1/2/4/8 concurrent requests on the first model, beside raw llama.cpp."""
    from vlm_ros_bench import concurrency
    if args.no_concurrency:
        return concurrency.skipped('skipped (--no-concurrency)')
    manifest = manifests[0]
    reps = args.concurrency_reps or (1 if args.tiny else 3)
    files = {k: v for k, v in paths.case_files(paths.BY_NAME[CONCURRENCY_PATH], manifest,
                                               False).items() if k.endswith('_model')}
    spec = {'model_name': manifest['name'], 'model_dir': manifest['model_dir'], 'files': files,
            'path': CONCURRENCY_PATH, 'threads': settings['threads'],
            'n_ctx': settings['n_ctx'], 'prompt': settings['prompt'],
            'new_tokens': settings['new_tokens'], 'reps': reps,
            'levels': list(concurrency.LEVELS)}
    _log(f'concurrency: {manifest["name"]} {CONCURRENCY_PATH}, {reps} repetitions per level')
    part, failure = common.run_child('vlm_ros_bench.concurrency', spec,
                                     os.path.join(workdir, 'concurrency'),
                                     common.child_env(settings['threads']), args.timeout,
                                     'concurrency process')
    return part if part is not None else concurrency.skipped(failure, manifest['name'], 'error')


def _write(doc):
    """Draw the chart, check the schema, write JSON and markdown."""
    skipped = report.chart(doc, doc['artifacts']['json'][:-len('.json')] + '.png')
    if skipped:
        _log(f'chart skipped: {skipped}')
        doc['artifacts'].update(chart=None, chart_skipped=skipped)
    else:
        doc['artifacts'].update(chart=doc['artifacts']['json'][:-len('.json')] + '.png',
                                chart_skipped=None)
    problems = schema.validate(doc)
    if problems:
        raise RuntimeError('the results do not match the schema:\n' + '\n'.join(problems))
    public = common.repo_relative(doc)
    with open(doc['artifacts']['json'], 'w', encoding='utf-8') as f:
        json.dump(public, f, indent=1)
        f.write('\n')
    with open(doc['artifacts']['markdown'], 'w', encoding='utf-8') as f:
        f.write(report.markdown(public))
    _log(f'wrote {doc["artifacts"]["json"]} and {doc["artifacts"]["markdown"]}')


def rerender(argv):
    """Re-render markdown and chart of results JSON files (``report``; Qwen2-VL's too)."""
    if not argv or any(a.startswith('-') for a in argv):
        print('usage: python -m vlm_ros_bench report RESULTS.json [...]', file=sys.stderr)
        return 2
    for path in argv:
        with open(path, encoding='utf-8') as f:
            doc = json.load(f)
        if qwen2vl.is_qwen2vl_document(doc):
            qwen2vl.rerender(path)
            continue
        stem = os.path.abspath(path)[:-len('.json')]
        doc.setdefault('overhead_paired', None)  # results from before the section existed
        doc.setdefault('concurrency', None)
        doc['artifacts'].update(json=stem + '.json', markdown=stem + '.md')
        _write(doc)
    return 0


def run(args, argv):
    """Run the benchmark described by parsed ``args``; return the written document."""
    start = time.perf_counter()
    settings = _settings(args)
    os.makedirs(args.out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix='vlm_ros_bench-')
    _log(f'{settings["threads"]} threads; work files in {workdir}')
    machine = hardware.machine_facts(settings['threads'], common.REPO)
    if args.tiny:
        manifests = [models.tiny_manifest()]
    else:
        manifests = [_build(name, args.rebuild) for name in settings['models']]
    _log('measuring memory bandwidth and matmul throughput')
    hw = _hardware(settings, args, workdir)
    _log(f'read bandwidth {hw["bandwidth"]["memory_read_gbps"]:.1f} GB/s, fp32 matmul '
         f'{hw["matmul"]["peak_gflops"]:.0f} GFLOP/s')
    runs = []
    for manifest in manifests:
        runs += _measure_model(manifest, settings, args, hw, workdir)
    paired = _paired_overhead(settings, args, manifests, workdir)
    ros = _ros(settings, args, workdir)
    action = _action(settings, args, manifests, workdir)
    reuse = _reuse(settings, args, manifests, workdir)
    batching = _concurrency(settings, args, manifests, workdir)
    stem = os.path.join(os.path.abspath(args.out), args.name)
    doc = {
        'schema_version': SCHEMA_VERSION,
        'created': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        'command': 'python -m vlm_ros_bench ' + ' '.join(shlex.quote(a) for a in argv),
        'mode': 'tiny' if args.tiny else 'full',
        'note': args.note,
        'duration_s': 0.0,
        'settings': settings,
        'machine': machine,
        'hardware': hw,
        'models': manifests,
        'runs': runs,
        'decode_overhead': report.decode_overhead(runs),
        'engine_targets': report.engine_targets(runs, manifests),
        'overhead_paired': paired,
        'ros_overhead': ros,
        'action': action,
        'reuse': reuse,
        'concurrency': batching,
        'artifacts': {'json': stem + '.json', 'markdown': stem + '.md', 'chart': stem + '.png',
                      'chart_skipped': None},
    }
    doc['duration_s'] = time.perf_counter() - start
    _write(doc)
    _log(f'done in {doc["duration_s"] / 60:.1f} min')
    return doc

"""
The Qwen2-VL benchmark: ``python -m vlm_ros_bench qwen2vl`` (``make bench`` runs it too).

A random-weight Qwen2-VL at Qwen2-VL-2B-Instruct's published shapes (``qwen2vl_models``),
on the benchmark's fixed 512x512 image and prompt, every path in its own process:

* ``transformers-fp32``: the PyTorch reference (one repetition: ~9 GB of float32 weights);
* ``onnx-int8-vision+llamacpp-q4_0`` / ``onnx-vision+llamacpp-q4_0``: our engine, our ONNX
  vision encoder (int8 / fp32) feeding the Q4_0 GGUF in llama.cpp with M-RoPE positions;
* ``mtmd+llamacpp-q4_0``: our engine with llama.cpp's projector (mmproj f16 through
  libmtmd) and the same GGUF;
* ``llamacpp-mtmd-raw-q4_0``: llama.cpp and libmtmd on the same GGUF and mmproj with none of
  our code (``qwen2vl_worker.RawMtmdRunner``).

Qwen2-VL does not tile: every path resizes the image within the processor's default pixel
budget (3136 to 12845056 pixels), 512x512 becoming 504x504, 324 image tokens. Results go to
``--out`` as ``qwen2vl.json`` and ``qwen2vl.md``; ``--tiny`` runs the tiny test model
``qwen2-a`` in seconds (the test uses it).
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

from vlm_ros_bench import common, hardware, models, report, schema, SCHEMA_VERSION
from vlm_ros_bench.paths import BenchPath
from vlm_ros_bench.qwen2vl_models import model_path, NAME, tiny_qwen2vl_manifest

PATHS = (
    BenchPath('transformers-fp32', 'transformers', 'transformers fp32', 'transformers fp32'),
    BenchPath('onnx-int8-vision+llamacpp-q4_0', 'pipeline', 'onnxruntime int8',
              'llama.cpp q4_0', onnx_variant='int8', gguf_type='q4_0'),
    BenchPath('onnx-vision+llamacpp-q4_0', 'pipeline', 'onnxruntime fp32', 'llama.cpp q4_0',
              onnx_variant='fp32', gguf_type='q4_0'),
    BenchPath('mtmd+llamacpp-q4_0', 'mtmd', 'llama.cpp mtmd f16', 'llama.cpp q4_0',
              gguf_type='q4_0'),
    BenchPath('llamacpp-mtmd-raw-q4_0', 'raw-mtmd', 'llama.cpp mtmd f16 (raw helpers)',
              'llama.cpp q4_0 (raw loop)', gguf_type='q4_0'),
)
BY_NAME = {p.name: p for p in PATHS}
DEFAULT_PATHS = tuple(p.name for p in PATHS)
RAW_PATH = 'llamacpp-mtmd-raw-q4_0'
REFERENCE_PATH = 'transformers-fp32'


def _log(message):
    print(f'[bench] {message}', file=sys.stderr, flush=True)


def add_arguments(parser):
    """Add the Qwen2-VL run's options to an argparse parser."""
    parser.add_argument('--tiny', action='store_true',
                        help='the tiny test model qwen2-a, 1 repetition (end-to-end check of '
                             'the harness; the numbers mean nothing)')
    parser.add_argument('--paths', default=','.join(DEFAULT_PATHS),
                        help='comma-separated, from ' + ', '.join(BY_NAME))
    parser.add_argument('--no-transformers', action='store_true',
                        help='skip the transformers reference (~9 GB, the slowest path)')
    parser.add_argument('--reps', type=int, default=None,
                        help='measured repetitions per path (3; 1 with --tiny)')
    parser.add_argument('--warmup', type=int, default=None,
                        help='warm-up runs per path (1; 0 with --tiny)')
    parser.add_argument('--transformers-reps', type=int, default=1,
                        help='measured repetitions of the reference (no warm-up)')
    parser.add_argument('--new-tokens', type=int, default=32)
    parser.add_argument('--threads', type=int, default=0, help='0: every core')
    parser.add_argument('--n-ctx', type=int, default=4096, help='llama.cpp context size')
    parser.add_argument('--out', default=os.path.join(common.BENCH_DIR, 'results'))
    parser.add_argument('--name', default='qwen2vl', help='file name stem of the results')
    parser.add_argument('--note', default=None, help='a remark printed at the top')
    parser.add_argument('--timeout', type=float, default=3600.0,
                        help='seconds one path process may take')
    parser.add_argument('--rebuild', action='store_true', help='rebuild the model first')


def select(names):
    """Return the paths named (comma-separated string or list), in the canonical order."""
    names = [n.strip() for n in (names.split(',') if isinstance(names, str) else names)
             if n.strip()]
    unknown = sorted(set(names) - set(BY_NAME))
    if unknown:
        raise SystemExit(f'unknown paths {unknown} (known: {", ".join(BY_NAME)})')
    return [p for p in PATHS if p.name in names]


def _settings(args, manifest):
    from vlm_ros.engine.families.qwen2_vl import Qwen2VLFamily

    tiny = args.tiny
    chosen = [p.name for p in select(args.paths)
              if not (args.no_transformers and p.name == REFERENCE_PATH)]
    family = Qwen2VLFamily(manifest['model_dir'])
    plan = family.plan(common.IMAGE_SIZE, common.IMAGE_SIZE)
    return {
        'threads': args.threads or os.cpu_count() or 1,
        'new_tokens': args.new_tokens,
        'warmup': args.warmup if args.warmup is not None else (0 if tiny else 1),
        'repetitions': args.reps if args.reps is not None else (1 if tiny else 3),
        'reference_repetitions': args.transformers_reps,
        'prompt': common.PROMPT,
        'image': {'width': common.IMAGE_SIZE, 'height': common.IMAGE_SIZE,
                  'kind': 'synthetic, fixed seed (vlm_ros_bench.common.bench_image)',
                  'resized_width': int(plan.width), 'resized_height': int(plan.height),
                  'image_tokens': int(plan.num_tokens)},
        'pixel_budget': {'min_pixels': int(family.min_pixels),
                         'max_pixels': int(family.max_pixels)},
        'image_token_bounds': [int(n) for n in family.image_token_bounds()],
        'n_ctx': args.n_ctx,
        'paths': chosen,
        'model': manifest['name'],
        'ignore_eos': True,
    }


def _build(rebuild):
    """Build the model in a child process (torch stays out of this one); return its manifest."""
    target = model_path()
    manifest = models.load_manifest(target) if os.path.isdir(target) else None
    if manifest is None or rebuild:
        _log(f'building {NAME} (once, ~15 min; cached in {models.cache_root()})')
        cmd = [sys.executable, '-m', 'vlm_ros_bench.qwen2vl_models']
        if rebuild:
            cmd.append('--rebuild')
        subprocess.run(cmd, check=True, env=common.child_env())
        manifest = models.load_manifest(target)
    return manifest


def case_files(path, manifest):
    """Return the files ``path`` loads, relative to the model folder (or absolute)."""
    files = manifest['files']
    if path.kind == 'transformers':
        return {}
    out = {'decoder_model': files['gguf'][path.gguf_type]}
    if path.onnx_variant:
        out['vision_model'] = files['onnx'][path.onnx_variant]['vision']
    else:
        out['vision_model'] = files['mmproj']['path']
        out['mmproj_type'] = files['mmproj']['type']
    return out


def files_mb(manifest, files):
    """
    Return the MiB of what a path loads.

    Its model files (an ONNX graph's external data included), or the checkpoint's
    safetensors for transformers.
    """
    model_dir = manifest['model_dir']
    paths = [v if os.path.isabs(v) else os.path.join(model_dir, v)
             for k, v in files.items() if k.endswith('_model')]
    paths += [p + '.data' for p in paths if os.path.isfile(p + '.data')]
    if not paths:
        paths = [os.path.join(model_dir, n) for n in os.listdir(model_dir)
                 if n.endswith('.safetensors')]
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) / 2 ** 20


def _decode_bytes(manifest, path):
    """Bytes one decode step reads from the weights (GGUF: its own count; float32 text)."""
    if path.gguf_type:
        return manifest['sizes']['gguf'][path.gguf_type]['decode_bytes_per_token']
    p = manifest['params']
    head = p['embedding'] if manifest['shapes']['text']['tie_word_embeddings'] \
        else p['lm_head_untied']
    return 4 * (p['text_layers'] + head)


def _record(manifest, path, case, settings, reps_warmup):
    """Build a run record (``report.run_record``'s) with TTFT and the decode bandwidth."""
    record = report.run_record(manifest, path, case, settings, None)
    record['warmup'], _ = reps_warmup
    record['model_files_mb'] = files_mb(manifest, case.get('files') or {})
    reps = case.get('reps') or []
    ok = record['status'] == 'ok'
    record['timings']['ttft_ms'] = common.summarize(
        [sum(r.get(k) or 0.0 for k in ('preprocess_ms', 'vision_ms', 'prefill_ms'))
         for r in reps]) if ok else None
    weights = _decode_bytes(manifest, path)
    tpot = record['timings']['tpot_ms']
    record['decode'] = {'weight_bytes_per_token': weights,
                        'achieved_gbps': weights / tpot['median'] / 1e6 if ok and tpot
                        else None}
    return record


def _measure(manifest, settings, args, workdir):
    records = []
    for path in select(settings['paths']):
        reference = path.name == REFERENCE_PATH
        reps_warmup = (0, settings['reference_repetitions']) if reference else \
            (settings['warmup'], settings['repetitions'])
        case = {'split': False, 'files': case_files(path, manifest)}
        spec = {'model_name': manifest['name'], 'path': path.describe(),
                'model_dir': manifest['model_dir'], 'threads': settings['threads'],
                'n_ctx': settings['n_ctx'], 'new_tokens': settings['new_tokens'],
                'warmup': reps_warmup[0], 'reps': reps_warmup[1],
                'prompt': settings['prompt'], 'image_size': common.IMAGE_SIZE,
                'image_tokens': settings['image_token_bounds'], 'cases': [case]}
        start = time.perf_counter()
        tag = f'{manifest["name"]}-{path.name}'
        result, failure = common.run_child('vlm_ros_bench.qwen2vl_worker', spec,
                                           os.path.join(workdir, tag),
                                           common.child_env(settings['threads']),
                                           args.timeout, 'worker')
        if result is None:
            result = {'cases': [{'split': False, 'status': 'error', 'error': failure,
                                 'reps': [], 'files': case['files']}]}
        record = _record(manifest, path, result['cases'][0], settings, reps_warmup)
        records.append(record)
        if record['status'] == 'ok':
            t = record['timings']
            _log(f'{path.name}: TTFT {t["ttft_ms"]["median"]:.0f} ms, TPOT '
                 f'{t["tpot_ms"]["median"]:.1f} ms, peak RSS {record["peak_rss_mb"]:.0f} MB, '
                 f'{record["image_tokens"]} image tokens '
                 f'({time.perf_counter() - start:.0f} s)')
        else:
            _log(f'{path.name}: ERROR {record["error"][:300]}')
    return records


def comparison(runs):
    """Set each of our engine's paths against raw llama.cpp and the reference."""
    ok = {r['path']: r for r in runs if r['status'] == 'ok'}
    raw, ref = ok.get(RAW_PATH), ok.get(REFERENCE_PATH)
    out = []
    for r in runs:
        if r['status'] != 'ok' or r['path_info']['kind'] not in ('pipeline', 'mtmd'):
            continue
        t = r['timings']
        ttft, tpot = t['ttft_ms']['median'], t['tpot_ms']['median']
        row = {'path': r['path'], 'ttft_ms': ttft, 'tpot_ms': tpot,
               'peak_rss_mb': r['peak_rss_mb'], 'raw_ttft_ms': None, 'raw_tpot_ms': None,
               'raw_peak_rss_mb': None, 'ttft_vs_raw': None, 'tpot_overhead_ms': None,
               'tpot_overhead_fraction': None, 'tpot_ranges_overlap': None,
               'reference_ttft_ms': None, 'ttft_vs_reference': None}
        if raw:
            rt, rp = raw['timings']['ttft_ms']['median'], raw['timings']['tpot_ms']['median']
            ours, theirs = t['tpot_ms'], raw['timings']['tpot_ms']
            # A few repetitions resolve no difference smaller than their own spread.
            overlap = ours['min'] <= theirs['max'] and theirs['min'] <= ours['max']
            row.update(raw_ttft_ms=rt, raw_tpot_ms=rp, raw_peak_rss_mb=raw['peak_rss_mb'],
                       ttft_vs_raw=ttft / rt, tpot_overhead_ms=tpot - rp,
                       tpot_overhead_fraction=(tpot - rp) / rp, tpot_ranges_overlap=overlap)
        if ref:
            rt = ref['timings']['ttft_ms']['median']
            row.update(reference_ttft_ms=rt, ttft_vs_reference=ttft / rt)
        out.append(row)
    return out


# -- markdown -------------------------------------------------------------------------------

def _fmt(value, digits=1):
    return report._fmt(value, digits)


def _cell(stats, digits=1):
    return report._cell(stats, digits)


def markdown(doc):
    """Render the Qwen2-VL results as markdown."""
    m, s, model = doc['machine'], doc['settings'], doc['model']
    v, git, p = m['versions'], m['git'], model['params']
    flags = ', '.join(k for k, on in m['flags'].items() if on) or 'none'
    text, vision = model['shapes']['text'], model['shapes']['vision']
    image = s['image']
    lines = ['# vlm_ros benchmark: Qwen2-VL', '']
    if doc['note']:
        lines += [f'> **{doc["note"]}**', '']
    lines += [
        f'- command: `{doc["command"]}`',
        f'- date: {doc["created"]}, mode: {doc["mode"]}, commit: {git.get("commit")}'
        f'{" (with uncommitted changes)" if git.get("dirty") else ""}, '
        f'duration: {doc["duration_s"] / 60:.1f} min',
        f'- machine: {m["cpu_model"]}, {m["logical_cores"]} logical / {m["physical_cores"]} '
        f'physical cores, {m["memory_total_gb"]:.0f} GB; flags: {flags}',
        f'- threads: **{s["threads"]}** for every path (ONNX Runtime intra-op, llama.cpp and '
        'libmtmd n_threads, torch.set_num_threads, BLAS)',
        f'- versions: onnxruntime {v.get("onnxruntime")}, llama-cpp-python '
        f'{v.get("llama_cpp_python")}, torch {v.get("torch")}, transformers '
        f'{v.get("transformers")}, numpy {v.get("numpy")}, python {m["python"]}',
        f'- model: {model["name"]}, {model["hub_id"]} shapes with random weights, '
        f'{p["total"] / 1e6:,.1f}M parameters (vision tower {p["vision"] / 1e6:.1f}M + merger '
        f'{p["connector"] / 1e6:.1f}M, language model {p["text_layers"] / 1e6:.1f}M + '
        f'embedding {p["embedding"] / 1e6:.1f}M{", tied" if text["tie_word_embeddings"] else ""}'
        f'); text {text["num_hidden_layers"]} layers x {text["hidden_size"]}, '
        f'{text["num_attention_heads"]} heads / {text["num_key_value_heads"]} KV; vision '
        f'{vision["depth"]} blocks x {vision["embed_dim"]}, {vision["num_heads"]} heads',
        f'- input: fixed synthetic {image["width"]}x{image["height"]} RGB image, resized within '
        f'the processor\'s pixel budget ({s["pixel_budget"]["min_pixels"]:,} to '
        f'{s["pixel_budget"]["max_pixels"]:,} pixels) to {image["resized_width"]}x'
        f'{image["resized_height"]}: **{image["image_tokens"]} image tokens** (Qwen2-VL does '
        f'not tile); prompt "{s["prompt"]}", {s["new_tokens"]} new tokens with EOS ignored; '
        f'llama.cpp n_ctx {s["n_ctx"]}',
        f'- repetitions: {s["warmup"]} warm-up + {s["repetitions"]} measured per path '
        f'(transformers: {s["reference_repetitions"]}, no warm-up), each path in its own '
        'process; cells are median (min–max)',
        '', '## Time per phase, first token and memory', '',
        'TTFT = preprocess + vision + prefill. TPOT = decode time after the first new token / '
        'the tokens that followed. Decode GB/s = weights read per token / TPOT.', '',
        '| path | image / prompt tokens | preprocess ms | vision ms | prefill ms | TTFT ms | '
        'TPOT ms | tokens/s | end-to-end ms | decode GB/s | model files MiB | '
        'peak RSS MiB |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for r in doc['runs']:
        if r['status'] != 'ok':
            lines.append(f'| {r["path"]} | error: {r["error"][:300]} ||||||||||')
            continue
        t = r['timings']
        lines.append(
            f'| {r["path"]} | {r["image_tokens"]} / {r["prompt_tokens"]} | '
            f'{_cell(t["preprocess_ms"])} | {_cell(t["vision_ms"])} | '
            f'{_cell(t["prefill_ms"])} | {_cell(t["ttft_ms"])} | {_cell(t["tpot_ms"], 2)} | '
            f'{_cell(t["tokens_per_s"])} | {_cell(t["e2e_ms"])} | '
            f'{_fmt(r["decode"]["achieved_gbps"])} | {_fmt(r["model_files_mb"], 0)} | '
            f'{_fmt(r["peak_rss_mb"], 0)} |')
    lines += ['', 'Phases of libmtmd paths: our engine counts resizing the image as the '
              'processor does and laying the prompt out (`mtmd_tokenize`, which normalises '
              'the image) as vision; the raw loop times `mtmd_tokenize` (which resizes with '
              "libmtmd's own filter) as preprocessing. The reference's end-to-end time is the "
              'sum of its phases.', '']
    if doc['comparison']:
        gguf = ', '.join(t.upper() for t in model['files']['gguf'])
        lines += ['## Our engine against raw llama.cpp and the reference', '',
                  f'Raw llama.cpp: the same {gguf} GGUF and '
                  f'{model["files"]["mmproj"]["type"]} mmproj through '
                  "libmtmd's helpers and a "
                  'plain greedy `llama_decode` loop, none of our code. Overhead = our TPOT - '
                  'raw TPOT (medians); "within spread" when the min–max ranges of the two '
                  "overlap, i.e. these repetitions do not resolve it (the main run's paired "
                  'overhead measures it on SmolVLM2).', '',
                  '| path | TTFT ms | raw TTFT ms | vs raw | reference TTFT ms | vs reference | '
                  'TPOT ms | raw TPOT ms | overhead ms/token | peak RSS MiB | raw peak RSS MiB |',
                  '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
        for c in doc['comparison']:
            over = '–' if c['tpot_overhead_ms'] is None else \
                f'{c["tpot_overhead_ms"]:+.2f} ({100 * c["tpot_overhead_fraction"]:+.0f}%' + \
                (', within spread)' if c['tpot_ranges_overlap'] else ')')
            lines.append(
                f'| {c["path"]} | {_fmt(c["ttft_ms"])} | {_fmt(c["raw_ttft_ms"])} | '
                f'{_ratio(c["ttft_vs_raw"])} | {_fmt(c["reference_ttft_ms"])} | '
                f'{_ratio(c["ttft_vs_reference"])} | {_fmt(c["tpot_ms"], 2)} | '
                f'{_fmt(c["raw_tpot_ms"], 2)} | {over} | {_fmt(c["peak_rss_mb"], 0)} | '
                f'{_fmt(c["raw_peak_rss_mb"], 0)} |')
        lines.append('')
    sizes = model['sizes']
    build = model.get('build_s') or {}
    lines += ['## Model files', '',
              '| file | MiB |', '| --- | ---: |',
              f'| checkpoint (float32 safetensors) | {_fmt(sizes["checkpoint_mb"], 0)} |']
    for ftype, g in sizes['gguf'].items():
        lines.append(f'| language model GGUF {ftype} | {_fmt(g["file_bytes"] / 2 ** 20, 0)} |')
    lines.append(f'| mmproj {model["files"]["mmproj"]["type"]} | '
                 f'{_fmt(sizes["mmproj_mb"], 0)} |')
    for variant, mb in sizes['onnx_mb'].items():
        lines.append(f'| ONNX vision encoder {variant} | {_fmt(mb, 0)} |')
    if build:
        steps = ', '.join(f'{k[:-2]} {v / 60:.1f} min' for k, v in build.items())
        lines += ['', f'Built once in {sum(build.values()) / 60:.1f} min ({steps}).']
    return '\n'.join(lines + ['']) + '\n'


def _ratio(value):
    return '–' if value is None else f'{value:.2f}x'


# -- run ------------------------------------------------------------------------------------

def _write(doc):
    """Check the schema, write JSON and markdown."""
    problems = schema.validate_qwen2vl(doc)
    if problems:
        raise RuntimeError('the results do not match the schema:\n' + '\n'.join(problems))
    public = common.repo_relative(doc)
    with open(doc['artifacts']['json'], 'w', encoding='utf-8') as f:
        json.dump(public, f, indent=1)
        f.write('\n')
    with open(doc['artifacts']['markdown'], 'w', encoding='utf-8') as f:
        f.write(markdown(public))
    _log(f'wrote {doc["artifacts"]["json"]} and {doc["artifacts"]["markdown"]}')


def rerender(path):
    """Re-render the markdown of a Qwen2-VL results JSON (``python -m vlm_ros_bench report``)."""
    with open(path, encoding='utf-8') as f:
        doc = json.load(f)
    stem = os.path.abspath(path)[:-len('.json')]
    doc['artifacts'].update(json=stem + '.json', markdown=stem + '.md')
    doc['comparison'] = comparison(doc['runs'])  # as this version compares
    _write(doc)


def is_qwen2vl_document(doc):
    """Tell a Qwen2-VL results document from the main run's."""
    return 'comparison' in doc and 'model' in doc


def run(args, argv):
    """Run the Qwen2-VL benchmark described by parsed ``args``; return the document."""
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    manifest = tiny_qwen2vl_manifest() if args.tiny else _build(args.rebuild)
    settings = _settings(args, manifest)
    workdir = tempfile.mkdtemp(prefix='vlm_ros_bench-qwen2vl-')
    _log(f'{settings["threads"]} threads; work files in {workdir}')
    machine = hardware.machine_facts(settings['threads'], common.REPO)
    runs = _measure(manifest, settings, args, workdir)
    stem = os.path.join(os.path.abspath(args.out), args.name)
    doc = {
        'schema_version': SCHEMA_VERSION,
        'created': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        'command': ' '.join(['python -m vlm_ros_bench qwen2vl'] + [shlex.quote(a) for a in argv]),
        'mode': 'tiny' if args.tiny else 'full',
        'note': args.note,
        'duration_s': 0.0,
        'settings': settings,
        'machine': machine,
        'model': manifest,
        'runs': runs,
        'comparison': comparison(runs),
        'artifacts': {'json': stem + '.json', 'markdown': stem + '.md'},
    }
    doc['duration_s'] = time.perf_counter() - start
    _write(doc)
    _log(f'Qwen2-VL done in {doc["duration_s"] / 60:.1f} min')
    return doc


def main(argv=None):
    """Command line of ``python -m vlm_ros_bench qwen2vl``; exit status 1 if a path failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog='python -m vlm_ros_bench qwen2vl',
                                     description='Benchmark Qwen2-VL (2B shapes) on every path.')
    add_arguments(parser)
    args = parser.parse_args(argv)
    doc = run(args, argv)
    return 1 if any(r['status'] != 'ok' for r in doc['runs']) else 0


if __name__ == '__main__':
    raise SystemExit(main())

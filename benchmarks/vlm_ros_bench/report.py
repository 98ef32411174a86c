"""
Turning worker results into the run records, the markdown report and the chart.

Every timing is summarized as median, min, max and quartiles over the measured repetitions
(warm-up runs excluded). TPOT is the decode time after the first new token divided by the
tokens that followed it; tokens/s is 1000 / TPOT per repetition.
"""

import os

from vlm_ros_bench import common
from vlm_ros_bench.roofline import roofline

PHASES = (('preprocess_ms', 'preprocess'), ('vision_ms', 'vision'), ('prefill_ms', 'prefill'),
          ('decode_ms', 'decode'))
COLORS = ('#8da0cb', '#66c2a5', '#fc8d62', '#e78ac3')


def run_record(manifest, path, case, settings, hardware):
    """Build the JSON record of one (model, path, split) measurement."""
    reps = case.get('reps') or []
    ok = case['status'] == 'ok' and bool(reps)

    def stats(name):
        return common.summarize([r.get(name) for r in reps]) if ok else None

    names = ('preprocess_ms', 'vision_ms', 'prefill_ms', 'decode_ms', 'tpot_ms', 'e2e_ms')
    timings = {name: stats(name) for name in names}
    timings['tokens_per_s'] = common.summarize(
        [1000.0 / r['tpot_ms'] for r in reps if r.get('tpot_ms')]) if ok else None
    extra = {}
    if ok:
        for key in ('engine_total_ms', 'phases_total_ms', 'llama_tpot_ms'):
            if any(r.get(key) is not None for r in reps):
                extra[key] = common.summarize([r.get(key) for r in reps])
        if any('llama_perf' in r for r in reps):
            extra['llama_perf'] = [r['llama_perf'] for r in reps]
        if any('generate_new_tokens' in r for r in reps):
            extra['generate_new_tokens'] = [r['generate_new_tokens'] for r in reps]
        extra['warmup_e2e_ms'] = [r.get('e2e_ms') for r in case.get('warmup_reps', [])]
    if case.get('traceback'):
        extra['traceback'] = case['traceback']
    first = reps[0] if reps else {}
    record = {
        'model': manifest['name'], 'path': path.name, 'path_info': path.describe(),
        'split': bool(case['split']),
        'status': 'ok' if ok else 'error',
        'error': case.get('error') or (None if ok else 'no repetition finished'),
        'threads': settings['threads'], 'new_tokens': settings['new_tokens'],
        'warmup': settings['warmup'], 'repetitions': len(reps),
        'prompt_tokens': first.get('prompt_tokens'), 'image_tokens': first.get('image_tokens'),
        'load_ms': case.get('load_ms'), 'rss_start_mb': case.get('rss_start_mb'),
        'rss_after_load_mb': case.get('rss_after_load_mb'),
        'peak_rss_mb': case.get('peak_rss_mb'),
        'model_files_mb': model_files_mb(manifest, case.get('files') or {}),
        'timings': timings, 'extra': extra, 'roofline': None, 'files': case.get('files') or {},
    }
    if ok and hardware:
        record['roofline'] = roofline(manifest, path.describe(), record, hardware)
    return record


def model_files_mb(manifest, files):
    """Return the MiB of the model files a path loads (the unit of peak RSS)."""
    weights = [v for k, v in files.items() if k.endswith('_model')] or ['model.safetensors']
    total = 0
    for rel in weights:
        full = rel if os.path.isabs(rel) else os.path.join(manifest['model_dir'], rel)
        total += os.path.getsize(full) if os.path.isfile(full) else 0
    return total / (1024.0 * 1024.0)


def decode_overhead(runs):
    """Compare each pipeline llama.cpp path with the raw llama.cpp loop on the same GGUF."""
    raw = {(r['model'], r['split'], r['path_info']['gguf_type']): r for r in runs
           if r['path_info']['kind'] == 'raw' and r['status'] == 'ok'}
    out = []
    for r in runs:
        info = r['path_info']
        if info['kind'] not in ('pipeline', 'mtmd') or not info['gguf_type'] or \
                r['status'] != 'ok':
            continue
        base = raw.get((r['model'], r['split'], info['gguf_type']))
        if base is None:
            continue
        ours, theirs = r['timings']['tpot_ms']['median'], base['timings']['tpot_ms']['median']
        out.append({'model': r['model'], 'split': r['split'], 'gguf_type': info['gguf_type'],
                    'path': r['path'], 'pipeline_tpot_ms': ours, 'raw_tpot_ms': theirs,
                    'overhead_ms_per_token': ours - theirs,
                    'overhead_fraction': (ours - theirs) / theirs if theirs else 0.0})
    return out


TTFT_TARGET = 0.20
"""First token of int8 vision + a quantized GGUF, as a fraction of the reference's."""
PREPROCESS_TARGET_MS = 20.0
RSS_TARGET = 1.2
"""Peak RSS against raw llama.cpp's peak on the same GGUF plus the vision encoder file."""


def _first_token_ms(run):
    t = run['timings']
    parts = [t[k]['median'] for k in ('preprocess_ms', 'vision_ms', 'prefill_ms') if t.get(k)]
    return sum(parts) if parts else None


def engine_targets(runs, manifests):
    """
    Set the int8-vision + quantized-GGUF paths against the engine-speed issue's targets.

    First token = preprocess + vision + prefill medians, against transformers' in the same
    run; peak RSS against 1.2 x (raw llama.cpp's peak on the same GGUF + the vision file).
    """
    by_key = {(r['model'], r['split'], r['path']): r for r in runs if r['status'] == 'ok'}
    model_dirs = {m['name']: m['model_dir'] for m in manifests}
    out = []
    for r in runs:
        info = r['path_info']
        if r['status'] != 'ok' or info['kind'] != 'pipeline' or \
                info['onnx_variant'] != 'int8' or not info['gguf_type']:
            continue
        ref = by_key.get((r['model'], r['split'], 'transformers-fp32'))
        raw = by_key.get((r['model'], r['split'], f'llamacpp-raw-{info["gguf_type"]}'))
        vision = r['files'].get('vision_model')
        vision_path = vision if not vision or os.path.isabs(vision) else \
            os.path.join(model_dirs.get(r['model'], ''), vision)
        vision_mb = os.path.getsize(vision_path) / 2 ** 20 if vision_path and \
            os.path.isfile(vision_path) else None
        ttft, ref_ttft = _first_token_ms(r), _first_token_ms(ref) if ref else None
        bound = RSS_TARGET * (raw['peak_rss_mb'] + vision_mb) if raw and vision_mb and \
            raw['peak_rss_mb'] else None
        out.append({
            'model': r['model'], 'split': r['split'], 'path': r['path'],
            'preprocess_ms': r['timings']['preprocess_ms']['median'],
            'first_token_ms': ttft, 'reference_first_token_ms': ref_ttft,
            'first_token_fraction': ttft / ref_ttft if ttft and ref_ttft else None,
            'peak_rss_mb': r['peak_rss_mb'],
            'raw_peak_rss_mb': raw['peak_rss_mb'] if raw else None,
            'vision_file_mb': vision_mb, 'peak_rss_bound_mb': bound})
    return out


# -- markdown -------------------------------------------------------------------------------

def _targets_section(targets):
    if not targets:
        return []
    lines = ['## Engine-speed targets: first token and memory', '',
             'First token = preprocess + vision + prefill (medians), against the transformers '
             f'reference in this run (target <= {_pct(TTFT_TARGET)}; preprocessing <= '
             f'{PREPROCESS_TARGET_MS:.0f} ms). Peak RSS against {RSS_TARGET} x (the peak of raw '
             'llama.cpp on the same GGUF + the vision encoder file).', '',
             '| model | split | path | preprocess ms | first token ms | reference ms | '
             'fraction | peak RSS MiB | bound MiB (raw + vision file) |',
             '| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    for t in targets:
        raw = t['raw_peak_rss_mb']
        bound = (f'{_fmt(t["peak_rss_bound_mb"], 0)} ({_fmt(raw, 0)} + '
                 f'{_fmt(t["vision_file_mb"], 0)})') if t['peak_rss_bound_mb'] else '–'
        lines.append(f'| {t["model"]} | {"on" if t["split"] else "off"} | {t["path"]} | '
                     f'{_fmt(t["preprocess_ms"])} | {_fmt(t["first_token_ms"])} | '
                     f'{_fmt(t["reference_first_token_ms"])} | '
                     f'{_pct(t["first_token_fraction"])} | {_fmt(t["peak_rss_mb"], 0)} | '
                     f'{bound} |')
    return lines + ['']


def _fmt(value, digits=1):
    if value is None:
        return '–'
    if abs(value) >= 1000:
        return f'{value:,.0f}'
    return f'{value:.{digits}f}'


def _cell(stats, digits=1):
    if not stats:
        return '–'
    if stats['n'] == 1:
        return _fmt(stats['median'], digits)
    return (f'{_fmt(stats["median"], digits)} '
            f'({_fmt(stats["min"], digits)}–{_fmt(stats["max"], digits)})')


def _ratio(value, base):
    return '–' if value is None or not base else f'{value / base:.1f}x'


def _pct(value):
    return '–' if value is None else f'{100 * value:.0f}%'


def markdown(doc):
    """Render the document as a markdown report."""
    m, s, hw = doc['machine'], doc['settings'], doc['hardware']
    flags = ', '.join(k for k, v in m['flags'].items() if v) or 'none'
    v = m['versions']
    lines = ['# vlm_ros benchmark', '']
    if doc['note']:
        lines += [f'> **{doc["note"]}**', '']
    git = m['git']
    lines += [
        f'- command: `{doc["command"]}`',
        f'- date: {doc["created"]}, mode: {doc["mode"]}, commit: {git.get("commit")}'
        f'{" (with uncommitted changes)" if git.get("dirty") else ""}, '
        f'duration: {doc["duration_s"] / 60:.1f} min',
        f'- machine: {m["cpu_model"]}, {m["logical_cores"]} logical / {m["physical_cores"]} '
        f'physical cores, {m["memory_total_gb"]:.0f} GB; flags: {flags}',
        f'- threads: **{s["threads"]}** for every path (ONNX Runtime intra-op, llama.cpp '
        'n_threads / n_threads_batch, torch.set_num_threads, BLAS)',
        f'- versions: onnxruntime {v.get("onnxruntime")}, llama-cpp-python '
        f'{v.get("llama_cpp_python")}, torch {v.get("torch")}, transformers '
        f'{v.get("transformers")}, numpy {v.get("numpy")}, python {m["python"]}',
        f'- input: fixed synthetic {s["image"]["width"]}x{s["image"]["height"]} RGB image, '
        f'prompt "{s["prompt"]}", {s["new_tokens"]} new tokens with EOS ignored; '
        f'llama.cpp n_ctx {s["n_ctx"]}',
        f'- repetitions: {s["warmup"]} warm-up + {s["repetitions"]} measured per path and '
        'split, each path in its own process'
        + (' (split off and on in the same process, off first)' if s['group_splits'] else '')
        + '; cells are median (min–max)',
        '',
        '## Hardware limits (measured in this run)', '',
        '| measure | value | how |', '| --- | --- | --- |',
        f'| memory read bandwidth | {hw["bandwidth"]["memory_read_gbps"]:.1f} GB/s '
        f'(numpy 1 thread {hw["bandwidth"]["read_single_thread_gbps"]:.1f}, numpy '
        f'{hw["threads"]} threads {hw["bandwidth"]["read_threaded_gbps"]:.1f}, onnxruntime '
        f'{_fmt(hw["bandwidth"].get("read_onnxruntime_gbps"))}) | '
        f'{hw["bandwidth"]["method"]} |',
        f'| fp32 matmul | {hw["matmul"]["peak_gflops"]:.0f} GFLOP/s (numpy '
        f'{hw["matmul"]["numpy_gflops"]:.0f}, torch {_fmt(hw["matmul"]["torch_gflops"], 0)}, '
        f'onnxruntime {_fmt(hw["matmul"].get("onnxruntime_gflops"), 0)}) '
        f'| {hw["matmul"]["method"]} |', '']
    for model in doc['models']:
        p = model['params']
        lines += [f'## {model["name"]} ({model["hub_id"]}, random weights, '
                  f'{p["total"] / 1e6:.1f}M parameters)', '']
        for split in s['splits']:
            runs = [r for r in doc['runs'] if r['model'] == model['name'] and
                    r['split'] == split]
            if not runs:
                continue
            ref = next((r for r in runs if r['status'] == 'ok' and r['image_tokens']), runs[0])
            lines += [f'### image splitting {"on" if split else "off"}: '
                      f'{ref["image_tokens"]} image tokens, {ref["prompt_tokens"]} prompt '
                      'tokens', '',
                      '| path | image / prompt tokens | preprocess ms | vision ms | prefill ms '
                      '| TPOT ms | tokens/s | end-to-end ms | model files MiB | peak RSS MiB '
                      '(x files) |',
                      '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
            for r in runs:
                if r['status'] != 'ok':
                    lines.append(f'| {r["path"]} | error: {r["error"]} |||||||||')
                    continue
                t = r['timings']
                lines.append(
                    f'| {r["path"]} | {r["image_tokens"]} / {r["prompt_tokens"]} | '
                    f'{_cell(t["preprocess_ms"])} | {_cell(t["vision_ms"])} | '
                    f'{_cell(t["prefill_ms"])} | {_cell(t["tpot_ms"], 2)} | '
                    f'{_cell(t["tokens_per_s"])} | {_cell(t["e2e_ms"])} | '
                    f'{_fmt(r["model_files_mb"], 0)} | {_fmt(r["peak_rss_mb"], 0)} '
                    f'({_ratio(r["peak_rss_mb"], r["model_files_mb"])}) |')
            lines += ['', '| path | weights + KV read per token MB | TPOT bound ms | '
                      'bandwidth reached | achieved GB/s | vision GFLOP | vision % of peak | '
                      'prefill GFLOP | prefill % of peak |',
                      '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
            for r in runs:
                f = r['roofline']
                if not f:
                    continue
                executed = ''
                if f['prefill_gflop_executed'] and f['prefill_gflop'] and \
                        f['prefill_gflop_executed'] > f['prefill_gflop'] * 1.01:
                    executed = f' ({_fmt(f["prefill_gflop_executed"])} run)'
                lines.append(
                    f'| {r["path"]} | {f["decode_bytes_per_token"] / 1e6:.1f} | '
                    f'{f["tpot_bound_ms"]:.2f} | {_pct(f["bandwidth_fraction"])} | '
                    f'{_fmt(f["achieved_gbps"])} | {_fmt(f["vision_gflop"])} | '
                    f'{_pct(f["vision_fraction_of_peak"])} | {_fmt(f["prefill_gflop"])}'
                    f'{executed} | {_pct(f["prefill_fraction_of_peak"])} |')
            lines.append('')
    if doc['decode_overhead']:
        lines += ['## Our per-token overhead over raw llama.cpp', '',
                  "TPOT of our pipeline on a GGUF minus TPOT of llama.cpp's own decode loop "
                  '(llama_decode + its greedy sampler, no code of ours) on the same file, '
                  'prompt length and context size.', '',
                  '| model | split | path | ours ms | raw ms | overhead ms/token |',
                  '| --- | --- | --- | ---: | ---: | ---: |']
        for o in doc['decode_overhead']:
            lines.append(f'| {o["model"]} | {"on" if o["split"] else "off"} | {o["path"]} | '
                         f'{o["pipeline_tpot_ms"]:.2f} | {o["raw_tpot_ms"]:.2f} | '
                         f'{o["overhead_ms_per_token"]:+.2f} '
                         f'({100 * o["overhead_fraction"]:+.0f}%) |')
        lines.append('')
    lines += _paired_section(doc.get('overhead_paired'))
    lines += _targets_section(doc.get('engine_targets'))
    ros = doc['ros_overhead']
    lines += ['## ROS overhead', '']
    if ros['status'] != 'ok':
        lines += [f'Not measured: {ros["error"]}', '']
    else:
        lines += [f'{ros["method"]}. Model: {ros["model"]} ({ros["new_tokens"]} new tokens); '
                  f'{ros["warmup"]} warm-up + {ros["repetitions"]} calls per image.', '',
                  'Transports: '
                  + '; '.join(f'{t["name"]} ({os.path.basename(t["profile"])})' if t['profile']
                              else t['name'] for t in ros.get('transports', [])) + '.', '',
                  '| transport | image | message bytes | round trip ms | engine total_ms | '
                  'overhead ms | of which in-process: serialize + deserialize + to array ms |',
                  '| --- | --- | ---: | ---: | ---: | ---: | ---: |']
        for c in ros['cases']:
            local = c.get('in_process') or {}
            parts = [local.get(k) for k in ('serialize_ms', 'deserialize_ms', 'to_array_ms')]
            in_process = (' + '.join(f'{v:.2f}' for v in parts) if all(
                v is not None for v in parts) else '–')
            lines.append(f'| {c.get("transport", "–")} | {c["name"]} | '
                         f'{c["message_bytes"]:,} | '
                         f'{_cell(c["round_trip_ms"])} | {_cell(c["engine_total_ms"])} | '
                         f'{_cell(c["overhead_ms"])} | {in_process} |')
        lines.append('')
    lines += _action_section(doc.get('action'))
    lines += _reuse_section(doc.get('reuse') or [])
    lines += _concurrency_section(doc.get('concurrency'))
    lines += ['## Method notes', '',
              '- Models: random weights at the published shapes (see benchmarks/vlm_ros_bench/'
              "models.py), exported by the project's exporters; speed depends on shapes and "
              'precision, not on trained values. Q4_0 here quantizes every 2-D tensor, '
              'output projection included (llama-quantize keeps that one at higher precision).',
              '- Roofline: decode bytes per token = weights the step reads at their stored '
              'precision (all layers, output norm and projection, one embedding row) + the KV '
              "cache at the answer's average length; bound = bytes / measured read bandwidth. "
              'Vision and prefill FLOPs against the measured fp32 matmul peak (quantized paths '
              'compute in other types; the fp32 peak is only a yardstick there). A fraction '
              'above 100% means the probe underestimated the machine (e.g. other load while '
              'it ran).',
              '- transformers: phases timed one by one (processor, get_image_features, one '
              'prompt forward, one forward per token); end-to-end is processor + generate '
              '(min_new_tokens suppresses EOS), a separate run.',
              '- raw llama.cpp: random prompt tokens of the same length, no vision; its '
              'end-to-end is prefill + decode.',
              "- libmtmd (llama.cpp's projector) lays the prompt out itself; without "
              'splitting (an mmproj whose preprocessing size is one tile) it still encodes a '
              "1x1 grid plus the global view, twice the image tokens of transformers' single "
              'frame.', '']
    art = doc['artifacts']
    if art['chart']:
        lines += [f'![time per phase]({os.path.basename(art["chart"])})', '']
    elif art['chart_skipped']:
        lines += [f'Chart skipped: {art["chart_skipped"]}', '']
    return '\n'.join(lines)


def _paired_section(paired):
    """Return the markdown of the paired per-token overhead over raw llama.cpp."""
    if paired is None:
        return []
    lines = ['## Per-token overhead over raw llama.cpp, in pairs', '']
    if paired['status'] != 'ok':
        return lines + [f'Not measured: {paired["error"]}', '']
    lines += [f'{paired["method"]}. Model: {paired["model"]}; {paired["repetitions"]} pairs '
              f'per row, {paired["new_tokens"]} new tokens, {paired["threads"]} threads.', '',
              '| GGUF | split | ours ms/token | raw ms/token | overhead: median (quartiles; '
              'min-max) |', '| --- | --- | ---: | ---: | ---: |']
    for c in paired['cases']:
        split = 'on' if c['split'] else 'off'
        if c['status'] != 'ok':
            lines.append(f'| {c["gguf_type"]} | {split} | – | – | {c["error"]} |')
            continue
        o = c['overhead_fraction']
        lines.append(f'| {c["gguf_type"]} | {split} | {_cell(c["pipeline_tpot_ms"], 2)} | '
                     f'{_cell(c["raw_tpot_ms"], 2)} | {100 * o["median"]:+.1f}% '
                     f'({100 * o["q1"]:+.1f}% to {100 * o["q3"]:+.1f}%; '
                     f'{100 * o["min"]:+.1f}% to {100 * o["max"]:+.1f}%) |')
    return lines + ['', 'Target: at most +3% (Q8_0 and Q4_0, splitting on and off).', '']


def _action_section(action):
    """Return the markdown of the ~/generate action: feedback cost and cancel latency."""
    lines = ['## The ~/generate action', '']
    if not action or action['status'] != 'ok':
        return lines + [f'Not measured: {(action or {}).get("error", "not in this run")}', '']
    step = action['cancel_tpot_ms']
    spare, lean = action.get('spare_core'), action.get('lean')
    settings = [(f'n_threads {action["threads"]}, ActionClient', action)]
    if lean:
        settings.append((f'n_threads {action["threads"]}, lean caller', lean))
    if spare:
        settings.append((f'n_threads {spare["threads"]}, ActionClient', spare))
    lines += [f'{action["method"]}. Model: {action["model"]}; {action["repetitions"]} goals per '
              f'setting, {action["new_tokens"]} new tokens.', '',
              '| measure | ' + ' | '.join(name for name, _ in settings) + ' |',
              '| --- |' + ' ---: |' * len(settings)]
    rows = [('decode ms/token, feedback every delta', lambda a: _cell(a['tpot_feedback_ms'], 2)),
            ('decode ms/token, feedback held back', lambda a: _cell(a['tpot_no_feedback_ms'], 2)),
            ('feedback cost, ratio of medians',
             lambda a: _signed_pct(a['feedback_cost_fraction'])),
            ('feedback cost, median of pairs (quartiles) (target <= 3%)',
             lambda a: _paired(a.get('feedback_cost_paired'))),
            ('feedback messages per goal', lambda a: _cell(a['feedback_messages'], 0))]
    for name, cell in rows:
        lines.append(f'| {name} | ' + ' | '.join(cell(a) for _, a in settings) + ' |')
    lines += ['', f'Cancel (n_threads {action["threads"]}): cancel sent -> result received '
              f'{_cell(action["cancel_latency_ms"])} ms after {action["cancel_after_tokens"]} '
              f'tokens; one decode step of those goals {_cell(step, 2)} ms (target: latency '
              '<= one step + 20 ms).', '']
    if lean:
        lines += ["The lean caller sends goals through the action's services and reads the "
                  'feedback with a DDS reader it spins only after each result: the node writes '
                  'and the transport delivers every delta as for the ActionClient, but no rclpy '
                  'executor in the caller works per message. The difference between the two '
                  "columns is what the ActionClient's executor costs when it shares the "
                  'decoding cores.', '']
    if spare:
        lines += [f'With n_threads {action["threads"]} every core decodes: whatever else runs '
                  "per feedback message (the caller's executor above all) takes a core from a "
                  'decode thread that the others then wait for. With a core left over '
                  f'(n_threads {spare["threads"]}) it does not.', '']
    return lines


def _paired(stats):
    if not stats:
        return '–'
    return (f'{100 * stats["median"]:+.1f}% ({100 * stats["q1"]:+.1f}% to '
            f'{100 * stats["q3"]:+.1f}%)')


def _signed_pct(fraction):
    return '–' if fraction is None else f'{100 * fraction:+.1f}%'


def _reuse_section(reuse):
    """Return the markdown of the reuse measurement: follow-ups and conversation turns."""
    if not reuse:
        return []
    lines = ['## Reuse: feature and prefix caches', '',
             'Time to first token (preprocess + vision + prefill) with the caches on; image '
             'splitting off; images never seen before in each repetition. Target: a '
             "follow-up on the same frame at most 15% of the first question's.", '',
             '| model | path | first question ms | follow-up, same image ms | follow-up / '
             'first | new image, same size ms | tokens reused: follow-up / new image |',
             '| --- | --- | ---: | ---: | ---: | ---: | ---: |']
    for r in reuse:
        if r['status'] != 'ok':
            lines.append(f'| {r["model"]} | {r["path"]} | error: {r["error"][:120]} |'
                         ' | | | |')
            continue
        lines.append(f'| {r["model"]} | {r["path"]} | {_cell(r["first_ttft_ms"])} | '
                     f'{_cell(r["follow_up_ttft_ms"])} | {_pct(r["follow_up_fraction"])} | '
                     f'{_cell(r["new_image_ttft_ms"])} | '
                     f'{_fmt(r["follow_up_cached_tokens"]["median"], 0)} / '
                     f'{_fmt(r["new_image_cached_tokens"]["median"], 0)} |')
    lines += ['', 'A conversation, turn by turn (the image shown in turn 1, scripted answers '
              'fed back as history):', '',
              '| model | path | turn | prompt tokens | prefilled tokens | TTFT ms |',
              '| --- | --- | ---: | ---: | ---: | ---: |']
    for r in reuse:
        for t in r['turns']:
            lines.append(f'| {r["model"]} | {r["path"]} | {t["turn"]} | {t["prompt_tokens"]} | '
                         f'{_fmt(t["prefilled_tokens"]["median"], 0)} | '
                         f'{_cell(t["ttft_ms"])} |')
    return lines + ['']


def _concurrency_section(part):
    """Return the markdown of concurrent requests (continuous batching) beside raw llama.cpp."""
    if not part:
        return []
    lines = ['## Concurrent requests: continuous batching', '']
    if part['status'] != 'ok':
        return lines + [f'Not measured: {part["error"]}', '']
    lines += [f'{part["model"]}, {part["path"]}, `max_concurrent` 8, {part["threads"]} '
              f'threads, {part["new_tokens"]} new tokens (EOS ignored), about '
              f'{part["prompt_tokens"]} prompt tokens, {part["repetitions"]} repetitions per '
              'level. Aggregate = all tokens / time from the start to the last answer; TTFT '
              'from the common start. Raw llama.cpp: the same number of sequences of the same '
              'prompt length decoded together on the same GGUF (decode only). Targets: '
              'aggregate at 4 requests >= 2.5x one, at 8 >= 3.5x; time per token at 4 <= '
              '1.6x alone.', '']
    for title, levels in (('Each request about its own image (encoded one image at a time):',
                           part['levels']),
                          ('Each request its own question about one new frame (encoded '
                           'once):', part.get('one_frame_levels') or [])):
        if not levels:
            continue
        lines += [title, '',
                  '| requests | aggregate tokens/s | vs one | TPOT ms | TPOT vs alone | '
                  'TTFT ms | raw llama.cpp decode tokens/s | raw vs one | step batches by '
                  'size |',
                  '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |']
        for level in levels:
            batches = ', '.join(f'{k}: {v}' for k, v in level['step_batches'].items())
            lines.append(f'| {level["requests"]} | {_cell(level["aggregate_tokens_per_s"])} | '
                         f'{level["speedup"]:.2f}x | {_cell(level["tpot_ms"])} | '
                         f'{level["tpot_vs_alone"]:.2f}x | {_cell(level["ttft_ms"])} | '
                         f'{_cell(level["raw_decode_tokens_per_s"])} | '
                         f'{level["raw_speedup"]:.2f}x | {batches or "-"} |')
        lines.append('')
    return lines


# -- chart ----------------------------------------------------------------------------------

def chart(doc, path):
    """Draw the time per phase of every path; return None, or why the chart was skipped."""
    try:
        import matplotlib
    except ImportError:
        return ('matplotlib is not installed (it is in requirements/dev.txt: '
                'pip install -r requirements/dev.txt)')
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    groups = []
    for model in doc['models']:
        for split in doc['settings']['splits']:
            runs = [r for r in doc['runs'] if r['model'] == model['name'] and
                    r['split'] == split and r['status'] == 'ok']
            if runs:
                groups.append((f'{model["name"]}, splitting {"on" if split else "off"}', runs))
    if not groups:
        return 'no successful run to draw'
    height = sum(1.2 + 0.35 * len(runs) for _, runs in groups)
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, max(3.0, height)), squeeze=False)
    for ax, (title, runs) in zip(axes[:, 0], groups, strict=True):
        labels = [r['path'] for r in runs][::-1]
        left = [0.0] * len(runs)
        for (key, label), color in zip(PHASES, COLORS, strict=True):
            widths = [(r['timings'][key] or {}).get('median', 0.0) or 0.0
                      for r in runs][::-1]
            ax.barh(labels, widths, left=left, color=color, label=label)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        for y, r in enumerate(runs[::-1]):
            tpot = r['timings']['tpot_ms']
            ax.text(left[y], y, f'  TPOT {tpot["median"]:.1f} ms' if tpot else '',
                    va='center', fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel('ms (median)', fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlim(0, max(left) * 1.25 if max(left) else 1)
    axes[0, 0].legend(fontsize=7, loc='lower right')
    fig.suptitle(f'vlm_ros: time per phase, {doc["settings"]["new_tokens"]} new tokens, '
                 f'{doc["settings"]["threads"]} threads ({doc["machine"]["cpu_model"]})',
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None

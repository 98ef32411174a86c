"""
``python -m vlm_ros_bench.serve_perf``: vlm_serve under concurrent load, measured by evalscope.

``make bench-serve`` runs it. It builds (once, like ``make bench``) the random-weight
SmolVLM2-256M at its published configuration, starts ``vlm_serve`` on its int8 ONNX vision
encoder and Q8_0 GGUF language model (``make bench``'s fastest pair; image splitting off), and
runs ``evalscope perf`` -- from its own venv, ``.venv-evalscope`` -- once per concurrency
level (1, 2, 4) with image prompts: one random 512x512 PNG and a short random text per
request, a fixed answer length (EOS ignored), streamed.

Per level it records evalscope's client-side figures (TTFT, TPOT, inter-token latency,
latency, output tokens/s, requests/s) and, beside them, the server's own: its ``/metrics``
histograms read before and after the level (TTFT from arrival, wait in the queue, time per
token, the engine's phases). ``make bench``'s single-request figures for the same path, when
``benchmarks/results/latest.json`` has them, go in as the reference. Results:
``benchmarks/results/serve_latest.json`` and ``serve_latest.md``. ``--tiny`` runs the
whole harness on the tiny test model in well under a minute.

evalscope counts prompt tokens with a chat template applied client-side; the benchmark gives
it the model's tokenizer with a generic template (the model's own reads only list contents),
so its input token counts are approximate, while the output counts come from the server's
``usage``. One stream chunk carries one text delta, which can span several tokens, so
evalscope's "decoded tokens per iteration" is not speculative decoding here.
"""

import argparse
import base64
import datetime
import glob
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

from vlm_ros_bench.common import REPO, repo_relative

RESULTS = os.path.join(REPO, 'benchmarks', 'results')
MODEL = 'smolvlm2-256m'
BENCH_PATH = 'onnx-int8-vision+llamacpp-q8_0'
"""The ``make bench`` path whose files are served, for the single-request reference."""
PHASES = ('preprocess', 'vision', 'prefill', 'decode')
GENERIC_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'text' %}"
    "{{ p['text'] }}{% else %}<image>{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    '{% if add_generation_prompt %}assistant:{% endif %}')


def _log(message):
    print(f'[bench-serve] {message}', file=sys.stderr, flush=True)


def add_arguments(parser):
    """Options of the serve benchmark."""
    parser.add_argument('--evalscope', default=os.path.join(REPO, '.venv-evalscope', 'bin',
                                                            'evalscope'),
                        help='the evalscope executable (default: .venv-evalscope)')
    parser.add_argument('--tiny', action='store_true',
                        help='the tiny test model instead of SmolVLM2-256M (a quick check)')
    parser.add_argument('--concurrency', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--requests', type=int, default=0,
                        help='requests per level (default: max(8, 4 x concurrency))')
    parser.add_argument('--max-tokens', type=int, default=64, help='tokens per answer')
    parser.add_argument('--prompt-tokens', type=int, default=16,
                        help='random text tokens per prompt, beside the image')
    parser.add_argument('--image-size', type=int, default=512)
    parser.add_argument('--threads', type=int, default=0, help='server threads; 0 = all')
    parser.add_argument('--port', type=int, default=0, help='0: a free port')
    parser.add_argument('--out', help='results JSON (default: benchmarks/results/'
                        'serve_latest.json; with --tiny, serve_tiny.json in the workdir)')
    parser.add_argument('--workdir', default=os.path.join(REPO, '.cache', 'bench_serve'))


def _manifest(tiny):
    from vlm_ros_bench import models
    if tiny:
        return models.tiny_manifest()
    _log(f'building {MODEL} (once; cached in .cache/bench_models)')
    return models.cached_bench_model(MODEL)


def _served_files(manifest):
    """Return (vision, decoder) of the served path, as vlm_serve options take them."""
    return (manifest['files']['onnx']['int8']['vision'],
            manifest['files']['gguf']['q8_0'])


def _tokenizer_dir(model_dir, workdir):
    """Write the model's tokenizer for evalscope, with a template it can apply to text."""
    out = os.path.join(workdir, 'evalscope_tokenizer')
    os.makedirs(out, exist_ok=True)
    for name in ('tokenizer.json', 'special_tokens_map.json'):
        if os.path.isfile(os.path.join(model_dir, name)):
            shutil.copy(os.path.join(model_dir, name), out)
    with open(os.path.join(model_dir, 'tokenizer_config.json'), encoding='utf-8') as f:
        config = json.load(f)
    config['chat_template'] = GENERIC_TEMPLATE
    with open(os.path.join(out, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
        json.dump(config, f)
    return out


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class Server:
    """vlm_serve on 127.0.0.1, its output in a log file."""

    def __init__(self, args, manifest, name, queue_size, workdir):
        vision, decoder = _served_files(manifest)
        self.port = args.port or _free_port()
        self.base = f'http://127.0.0.1:{self.port}'
        exe = shutil.which('vlm_serve')
        cmd = [exe] if exe else [sys.executable, '-m', 'vlm_ros.serve']
        cmd += [manifest['model_dir'], '--vision-model', vision, '--decoder-model', decoder,
                '--no-split', '--threads', str(args.threads), '--n-ctx', '4096',
                '--queue-size', str(queue_size), '--served-model-name', name,
                '--port', str(self.port), '--log-level', 'warning']
        self.command = cmd
        self.log_path = os.path.join(workdir, 'vlm_serve.log')
        self._log = open(self.log_path, 'w')
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=300.0):
        import httpx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f'vlm_serve exited: {self.output()[-2000:]}')
            try:
                if httpx.get(self.base + '/health', timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f'vlm_serve did not start within {timeout:g} s')

    def output(self):
        with open(self.log_path, encoding='utf-8', errors='replace') as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def scrape(base):
    """Return the server's metric samples: {(name, ((label, value), ...)): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(base + '/metrics', timeout=10.0).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def server_delta(before, after):
    """Return the server's own figures for what happened between two scrapes."""
    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    def mean_ms(name, **labels):
        count = delta(name + '_count', **labels)
        return delta(name + '_sum', **labels) / count * 1000.0 if count else None

    outcomes = sorted({dict(k[1]).get('outcome') for k in after
                       if k[0] == 'vlm_serve_requests_total'} - {None})
    return {
        'requests': {o: delta('vlm_serve_requests_total', outcome=o) for o in outcomes},
        'completion_tokens': delta('vlm_serve_completion_tokens_total'),
        'prompt_tokens': delta('vlm_serve_prompt_tokens_total'),
        'ttft_ms_mean': mean_ms('vlm_serve_time_to_first_token_seconds'),
        'queue_wait_ms_mean': mean_ms('vlm_serve_queue_wait_seconds'),
        'tpot_ms_mean': mean_ms('vlm_serve_time_per_output_token_seconds'),
        'duration_ms_mean': mean_ms('vlm_serve_request_duration_seconds'),
        'phases_ms_mean': {p: mean_ms('vlm_serve_engine_phase_seconds', phase=p)
                           for p in PHASES},
    }


def _percentile(rows, name, which):
    for row in rows:
        if row.get('Percentiles') == which:
            return row.get(name)
    return None


def client_figures(outdir):
    """Read evalscope's summary and percentiles of one level."""
    summaries = glob.glob(os.path.join(outdir, '**', 'benchmark_summary.json'), recursive=True)
    if not summaries:
        raise RuntimeError(f'evalscope wrote no benchmark_summary.json under {outdir}')
    with open(summaries[0], encoding='utf-8') as f:
        summary = json.load(f)
    rows = []
    percentiles = os.path.join(os.path.dirname(summaries[0]), 'benchmark_percentile.json')
    if os.path.isfile(percentiles):
        with open(percentiles, encoding='utf-8') as f:
            rows = json.load(f)

    def spread(avg_key, name):
        return {'mean': summary.get(avg_key), 'p50': _percentile(rows, name, '50%'),
                'p99': _percentile(rows, name, '99%')}

    return {
        'requests': summary.get('Total Requests'),
        'succeeded': summary.get('Success Requests'),
        'failed': summary.get('Failed Requests'),
        'requests_per_s': summary.get('Req Throughput (req/s)'),
        'output_tokens_per_s': summary.get('Output Throughput (tok/s)'),
        'avg_output_tokens': summary.get('Avg Output Tokens'),
        'avg_input_tokens_approx': summary.get('Avg Input Tokens'),
        'ttft_ms': spread('Avg TTFT (ms)', 'TTFT (ms)'),
        'tpot_ms': spread('Avg TPOT (ms)', 'TPOT (ms)'),
        'itl_ms_mean': summary.get('Avg ITL (ms)'),
        'latency_s': spread('Avg Latency (s)', 'Latency (s)'),
        'summary_file': os.path.relpath(summaries[0], REPO),
    }


def run_level(args, server, name, tokenizer, concurrency, requests, outdir):
    """Run evalscope perf at one concurrency; return its command and the client figures."""
    shutil.rmtree(outdir, ignore_errors=True)
    size = str(args.image_size)
    cmd = [args.evalscope, 'perf', '--url', server.base + '/v1/chat/completions',
           '--api', 'openai', '--model', name, '--dataset', 'random_vl',
           '--tokenizer-path', tokenizer, '--image-width', size, '--image-height', size,
           '--image-format', 'RGB', '--image-num', '1',
           '--min-prompt-length', str(args.prompt_tokens),
           '--max-prompt-length', str(args.prompt_tokens),
           '--max-tokens', str(args.max_tokens), '--min-tokens', str(args.max_tokens),
           '--extra-args', json.dumps({'ignore_eos': True}), '--temperature', '0',
           '--stream', '--parallel', str(concurrency), '--number', str(requests),
           '--outputs-dir', outdir, '--no-timestamp',
           # Its connection test is a text-only request the server would count among the
           # level's: its tiny TTFT would pull the server-side mean down (the harness has
           # already checked /health and sent a warm-up request).
           '--no-test-connection']
    _log(f'concurrency {concurrency}: {requests} requests')
    with open(outdir + '.log', 'w') as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f'evalscope perf failed (exit {done.returncode}); see {outdir}.log')
    return cmd, client_figures(outdir)


def reference(model_name):
    """Return ``make bench``'s single-request figures for the served path, if recorded."""
    path = os.path.join(RESULTS, 'latest.json')
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        doc = json.load(f)
    for entry in doc.get('runs', []):
        if entry.get('model') == model_name and entry.get('path') == BENCH_PATH and \
                not entry.get('split') and entry.get('status') == 'ok':
            t = entry['timings']
            med = {k: (v or {}).get('median') for k, v in t.items()}
            return {'source': 'benchmarks/results/latest.json', 'created': doc.get('created'),
                    'path': BENCH_PATH, 'new_tokens': entry.get('new_tokens'),
                    'ttft_ms': sum(med.get(f'{p}_ms') or 0.0 for p in PHASES[:3]),
                    'tpot_ms': med.get('tpot_ms'), 'e2e_ms': med.get('e2e_ms'),
                    'phases_ms': {p: med.get(f'{p}_ms') for p in PHASES}}
    return None


def _warm_up(server, name, args):
    """Send one request outside the measured levels: first-call costs stay out of them."""
    import httpx
    from PIL import Image
    from vlm_ros_bench.common import bench_image
    buffer = io.BytesIO()
    Image.fromarray(bench_image(args.image_size)).save(buffer, 'PNG')
    url = 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode()
    body = {'model': name, 'max_tokens': 8, 'stream': True, 'messages': [
        {'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': url}},
                                     {'type': 'text', 'text': 'Describe the image.'}]}]}
    # Streamed, like the measured requests: the event stream's first use stays out of them.
    with httpx.stream('POST', server.base + '/v1/chat/completions', json=body,
                      timeout=300.0) as reply:
        reply.raise_for_status()
        reply.read()


def run(args, argv):
    """Measure every level; write and return the results document."""
    if not os.path.isfile(args.evalscope):
        raise SystemExit(f'no evalscope at {args.evalscope}: make bench-serve installs it '
                         'into .venv-evalscope (pip install -r benchmarks/serve_requirements.txt)')
    from vlm_ros_bench import hardware
    os.makedirs(args.workdir, exist_ok=True)
    manifest = _manifest(args.tiny)
    name = manifest['name']
    vision, decoder = _served_files(manifest)
    tokenizer = _tokenizer_dir(manifest['model_dir'], args.workdir)
    server = Server(args, manifest, name, max(args.concurrency), args.workdir)
    started = time.monotonic()
    levels = []
    try:
        server.wait_ready()
        _warm_up(server, name, args)
        for concurrency in args.concurrency:
            requests = args.requests or max(8, 4 * concurrency)
            before = scrape(server.base)
            load_before = os.getloadavg()[0]
            outdir = os.path.join(args.workdir, f'evalscope_c{concurrency}')
            cmd, client = run_level(args, server, name, tokenizer, concurrency, requests,
                                    outdir)
            # The 1-minute load average around the level: other work on the machine shows.
            side = server_delta(before, scrape(server.base))
            served = sum(side['requests'].values())
            if served != requests:
                _log(f'the server counted {served} requests for {requests} sent: its means '
                     'are not of the same requests')
            levels.append({'concurrency': concurrency, 'requests': requests,
                           'client': client, 'server': side,
                           'server_requests': int(served),
                           'ttft_gap_ms': _gap(client['ttft_ms']['mean'], side['ttft_ms_mean']),
                           'load_average_1m': [load_before, os.getloadavg()[0]],
                           'evalscope_command': cmd})
    finally:
        server.stop()
    doc = {
        'schema_version': 1,
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'command': 'python -m vlm_ros_bench.serve_perf ' + ' '.join(argv),
        'duration_s': time.monotonic() - started,
        'note': ('Random-weight model at the published configuration: speed depends on '
                 'shapes, not on trained values. Client (evalscope) and server share the '
                 "machine's cores."),
        'machine': hardware.machine_facts(args.threads or os.cpu_count(), REPO),
        'evalscope_version': _evalscope_version(args.evalscope),
        'model': {'name': name, 'hub_id': manifest.get('hub_id'),
                  'random_weights': manifest.get('random_weights'), 'vision_model': vision,
                  'decoder_model': decoder, 'image_splitting': False},
        'server': {'command': [os.path.basename(server.command[0])] + server.command[1:],
                   'queue_size': max(args.concurrency), 'threads': args.threads},
        'settings': {'concurrency': args.concurrency, 'max_tokens': args.max_tokens,
                     'ignore_eos': True, 'prompt_text_tokens': args.prompt_tokens,
                     'image': f'{args.image_size}x{args.image_size} PNG, random shapes '
                              "(evalscope's random_vl), one per request",
                     'stream': True, 'temperature': 0},
        'levels': levels,
        'reference_single_request': None if args.tiny else reference(name),
    }
    _write(doc, args.out or (os.path.join(args.workdir, 'serve_tiny.json') if args.tiny
                             else os.path.join(RESULTS, 'serve_latest.json')))
    return doc


def _gap(client_ms, server_ms):
    """TTFT as evalscope sees it minus the server's own (from arrival), in ms."""
    if client_ms is None or server_ms is None:
        return None
    return client_ms - server_ms


def _evalscope_version(exe):
    python = os.path.join(os.path.dirname(exe), 'python')
    try:
        done = subprocess.run([python, '-c', 'from importlib.metadata import version; '
                               'print(version("evalscope"))'], capture_output=True,
                              text=True, timeout=60)
        return done.stdout.strip() or None
    except OSError:
        return None


def _fmt(value, digits=1):
    return '-' if value is None else f'{value:.{digits}f}'


def markdown(doc):
    """Return the results as markdown tables."""
    lines = [f'# vlm_serve under load: {doc["model"]["name"]}', '',
             f'`{doc["command"]}` at {doc["created"]} (evalscope {doc["evalscope_version"]}); '
             f'vision `{doc["model"]["vision_model"]}`, decoder '
             f'`{doc["model"]["decoder_model"]}`, image splitting off, '
             f'{doc["settings"]["max_tokens"]} tokens per answer, one '
             f'{doc["settings"]["image"]}.', '', doc['note'], '',
             '## Client side (evalscope)', '',
             '| concurrency | requests (failed) | req/s | output tok/s | TTFT mean / p50 / p99 '
             '(ms) | TPOT mean (ms) | ITL mean (ms) | latency mean (s) |',
             '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for level in doc['levels']:
        c = level['client']
        ttft = c['ttft_ms']
        lines.append(
            f'| {level["concurrency"]} | {c["requests"]} ({c["failed"]}) | '
            f'{_fmt(c["requests_per_s"], 2)} | {_fmt(c["output_tokens_per_s"])} | '
            f'{_fmt(ttft["mean"])} / {_fmt(ttft["p50"])} / {_fmt(ttft["p99"])} | '
            f'{_fmt(c["tpot_ms"]["mean"], 2)} | {_fmt(c["itl_ms_mean"], 2)} | '
            f'{_fmt(c["latency_s"]["mean"], 3)} |')
    lines += ['', "## Server side (vlm_serve's /metrics, means per request)", '',
              '| concurrency | requests | TTFT (ms) | evalscope TTFT - this (ms) | '
              'queue wait (ms) | preprocess | vision | prefill | decode (ms) | TPOT (ms) | '
              'duration (ms) | load avg (1 min) |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for level in doc['levels']:
        s = level['server']
        p = s['phases_ms_mean']
        lines.append(
            f'| {level["concurrency"]} | {level.get("server_requests", "-")} | '
            f'{_fmt(s["ttft_ms_mean"])} | {_fmt(level.get("ttft_gap_ms"))} | '
            f'{_fmt(s["queue_wait_ms_mean"])} | {_fmt(p["preprocess"])} | '
            f'{_fmt(p["vision"])} | {_fmt(p["prefill"])} | {_fmt(p["decode"])} | '
            f'{_fmt(s["tpot_ms_mean"], 2)} | {_fmt(s["duration_ms_mean"])} | '
            f'{_fmt(level["load_average_1m"][0])} -> {_fmt(level["load_average_1m"][1])} |')
    lines += ['', 'The server times a request from its arrival (headers read) to its first '
              'text; evalscope from just before sending to the first content chunk parsed. '
              'Their difference is the HTTP and streaming path both ways (target at '
              'concurrency 1: within 10 ms).']
    ref = doc.get('reference_single_request')
    if ref:
        lines += ['', f'Reference, one request in process (`make bench`, {ref["path"]}, '
                  f'{ref["created"]}): TTFT {_fmt(ref["ttft_ms"])} ms (preprocess + vision + '
                  f'prefill), TPOT {_fmt(ref["tpot_ms"], 2)} ms, end to end '
                  f'{_fmt(ref["e2e_ms"])} ms for {ref["new_tokens"]} tokens.']
    return '\n'.join(lines) + '\n'


def _write(doc, out):
    doc = repo_relative(doc)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w', encoding='utf-8') as f:
        json.dump(doc, f, indent=1)
        f.write('\n')
    md = out[:-len('.json')] + '.md' if out.endswith('.json') else out + '.md'
    with open(md, 'w', encoding='utf-8') as f:
        f.write(markdown(doc))
    _log(f'wrote {out} and {md}')


def main(argv=None):
    """Command line: see the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog='python -m vlm_ros_bench.serve_perf',
                                     description='Benchmark vlm_serve with evalscope perf.')
    add_arguments(parser)
    args = parser.parse_args(argv)
    doc = run(args, argv)
    failed = sum(level['client']['failed'] or 0 for level in doc['levels'])
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())

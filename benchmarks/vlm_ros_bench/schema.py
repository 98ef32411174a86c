"""
The benchmark JSON document's schema, and a checker for it (no dependencies).

A spec is a type, a tuple of types, a dict of key -> spec (every key required, more keys
allowed) or ``ListOf(spec)``. ``validate(document)`` returns a list of problems, empty when
the document is well formed; the benchmark checks its own output with it before writing.
"""

NUM = (int, float)
NONE = type(None)


class ListOf:
    """A list whose items all match ``item``."""

    def __init__(self, item):
        self.item = item


def opt(spec):
    """Return a spec that also accepts None."""
    if isinstance(spec, tuple):
        return spec + (NONE,)
    if isinstance(spec, type):
        return (spec, NONE)
    return Nullable(spec)


class Nullable:
    """A dict or list spec that also accepts None."""

    def __init__(self, spec):
        self.spec = spec


STATS = {'median': NUM, 'min': NUM, 'max': NUM, 'q1': NUM, 'q3': NUM, 'n': int,
         'values': ListOf(NUM)}
TIMING_NAMES = ('preprocess_ms', 'vision_ms', 'prefill_ms', 'decode_ms', 'tpot_ms',
                'tokens_per_s', 'e2e_ms')
ROOFLINE = {
    'bandwidth_gbps': NUM, 'peak_gflops': NUM,
    'decode_weight_bytes_per_token': NUM, 'decode_kv_bytes_per_token': NUM,
    'decode_bytes_per_token': NUM, 'tpot_bound_ms': NUM, 'achieved_gbps': opt(NUM),
    'bandwidth_fraction': opt(NUM), 'vision_frames': NUM, 'vision_gflop': opt(NUM),
    'vision_gflops_achieved': opt(NUM), 'vision_fraction_of_peak': opt(NUM),
    'prefill_gflop': opt(NUM), 'prefill_gflop_executed': opt(NUM),
    'prefill_gflops_achieved': opt(NUM), 'prefill_fraction_of_peak': opt(NUM),
}
RUN = {
    'model': str, 'path': str, 'split': bool, 'status': str, 'error': opt(str),
    'path_info': {'name': str, 'kind': str, 'vision': str, 'decoder': str,
                  'onnx_variant': opt(str), 'gguf_type': opt(str)},
    'threads': int, 'new_tokens': int, 'warmup': int, 'repetitions': int,
    'prompt_tokens': opt(int), 'image_tokens': opt(int), 'load_ms': opt(NUM),
    'rss_start_mb': opt(NUM), 'rss_after_load_mb': opt(NUM), 'peak_rss_mb': opt(NUM),
    'model_files_mb': NUM,
    'timings': {name: opt(STATS) for name in TIMING_NAMES},
    'extra': dict, 'roofline': opt(ROOFLINE), 'files': dict,
}
MODEL = {
    'name': str, 'hub_id': str, 'random_weights': bool, 'model_dir': str,
    'shapes': {'text': dict, 'vision': dict, 'scale_factor': int, 'image_seq_len': int},
    'params': {'vision': int, 'connector': int, 'text_layers': int, 'embedding': int,
               'lm_head_untied': int, 'total': int},
    'tile_size': int, 'longest_edge': int, 'files': dict,
    'bytes': {'onnx': dict, 'gguf': dict, 'mmproj': dict},
}
MACHINE = {
    'cpu_model': str, 'logical_cores': int, 'physical_cores': opt(int),
    'usable_cores': opt(int), 'threads_used': int, 'flags': dict, 'memory_total_gb': NUM,
    'os': str, 'python': str, 'versions': dict, 'llama_cpp_system_info': str,
    'onnxruntime_providers': list, 'git': dict,
}
HARDWARE = {
    'threads': int, 'seconds': NUM,
    'bandwidth': {'memory_read_gbps': NUM, 'read_single_thread_gbps': NUM,
                  'read_threaded_gbps': NUM, 'read_onnxruntime_gbps': opt(NUM),
                  'copy_threaded_gbps': NUM, 'array_mb': int,
                  'passes': int, 'method': str},
    'matmul': {'matmul_n': int, 'passes': int, 'numpy_gflops': NUM, 'torch_gflops': opt(NUM),
               'onnxruntime_gflops': opt(NUM),
               'torch_skipped': opt(str), 'peak_gflops': NUM, 'method': str},
}
ROS_CASE = {'name': str, 'encoding': str, 'width': int, 'height': int, 'message_bytes': int,
            'in_process': {'serialize_ms': NUM, 'deserialize_ms': NUM, 'to_array_ms': NUM},
            'round_trip_ms': opt(STATS), 'engine_total_ms': opt(STATS),
            'overhead_ms': opt(STATS), 'errors': list, 'transport': str}
ROS = {'status': str, 'error': opt(str), 'model': opt(str), 'cases': ListOf(ROS_CASE)}
ACTION = {'status': str, 'error': opt(str), 'model': opt(str), 'threads': int,
          'repetitions': int, 'new_tokens': int, 'cancel_after_tokens': int,
          'tpot_feedback_ms': opt(STATS), 'tpot_no_feedback_ms': opt(STATS),
          'feedback_cost_fraction': opt(NUM), 'cancel_latency_ms': opt(STATS),
          'cancel_tpot_ms': opt(STATS), 'feedback_messages': opt(STATS),
          'spare_core': opt({'threads': int, 'tpot_feedback_ms': STATS,
                             'tpot_no_feedback_ms': STATS, 'feedback_cost_fraction': NUM,
                             'feedback_cost_paired': opt(STATS), 'feedback_messages': STATS}),
          'feedback_cost_paired': opt(STATS),
          'lean': opt({'tpot_feedback_ms': STATS, 'tpot_no_feedback_ms': STATS,
                       'feedback_cost_fraction': NUM, 'feedback_cost_paired': STATS,
                       'feedback_messages': STATS}),
          'method': str}
PAIRED_CASE = {'gguf_type': str, 'split': bool, 'status': str, 'error': opt(str),
               'pipeline_tpot_ms': opt(STATS), 'raw_tpot_ms': opt(STATS),
               'overhead_fraction': opt(STATS)}
PAIRED = {'status': str, 'error': opt(str), 'model': opt(str), 'threads': int,
          'repetitions': int, 'new_tokens': int, 'cases': ListOf(PAIRED_CASE), 'method': str}
REUSE_TURN = {'turn': int, 'prompt_tokens': int, 'prefilled_tokens': STATS, 'ttft_ms': STATS}
REUSE = {'model': str, 'path': str, 'status': str, 'error': opt(str), 'repetitions': int,
         'first_ttft_ms': opt(STATS), 'follow_up_ttft_ms': opt(STATS),
         'new_image_ttft_ms': opt(STATS), 'follow_up_fraction': opt(NUM),
         'follow_up_cached_tokens': opt(STATS), 'new_image_cached_tokens': opt(STATS),
         'turns': ListOf(REUSE_TURN)}
CONCURRENCY_LEVEL = {'requests': int, 'aggregate_tokens_per_s': STATS, 'tpot_ms': STATS,
                     'ttft_ms': STATS, 'raw_decode_tokens_per_s': STATS, 'step_batches': dict,
                     'speedup': NUM, 'raw_speedup': NUM, 'tpot_vs_alone': NUM}
CONCURRENCY = {'status': str, 'error': opt(str), 'model': opt(str), 'path': str,
               'threads': int, 'repetitions': int, 'new_tokens': int, 'prompt_tokens': int,
               'levels': ListOf(CONCURRENCY_LEVEL),
               'one_frame_levels': ListOf(CONCURRENCY_LEVEL)}
OVERHEAD = {'model': str, 'split': bool, 'gguf_type': str, 'path': str, 'pipeline_tpot_ms': NUM,
            'raw_tpot_ms': NUM, 'overhead_ms_per_token': NUM, 'overhead_fraction': NUM}
TARGET = {'model': str, 'split': bool, 'path': str, 'preprocess_ms': NUM,
          'first_token_ms': opt(NUM), 'reference_first_token_ms': opt(NUM),
          'first_token_fraction': opt(NUM), 'peak_rss_mb': opt(NUM),
          'raw_peak_rss_mb': opt(NUM), 'vision_file_mb': opt(NUM),
          'peak_rss_bound_mb': opt(NUM)}
DOCUMENT = {
    'schema_version': int, 'created': str, 'command': str, 'mode': str, 'note': opt(str),
    'duration_s': NUM,
    'settings': {'threads': int, 'new_tokens': int, 'warmup': int, 'repetitions': int,
                 'prompt': str, 'image': dict, 'n_ctx': int, 'splits': ListOf(bool),
                 'group_splits': bool, 'paths': ListOf(str), 'models': ListOf(str),
                 'ignore_eos': bool},
    'machine': MACHINE, 'hardware': HARDWARE, 'models': ListOf(MODEL), 'runs': ListOf(RUN),
    'decode_overhead': ListOf(OVERHEAD), 'engine_targets': ListOf(TARGET),
    'overhead_paired': opt(PAIRED),
    'ros_overhead': ROS, 'action': ACTION,
    'reuse': ListOf(REUSE), 'concurrency': opt(CONCURRENCY),
    'artifacts': {'json': str, 'markdown': str, 'chart': opt(str), 'chart_skipped': opt(str)},
}
QWEN2VL_MODEL = {
    'name': str, 'hub_id': str, 'random_weights': bool, 'model_dir': str,
    'shapes': {'text': dict, 'vision': dict},
    'params': {'vision': int, 'connector': int, 'text_layers': int, 'embedding': int,
               'lm_head_untied': int, 'total': int},
    'pixels': {'min': int, 'max': int}, 'files': dict,
    'sizes': {'gguf': dict, 'mmproj_mb': NUM, 'onnx_mb': dict, 'checkpoint_mb': NUM},
    'build_s': dict,
}
QWEN2VL_RUN = dict(RUN, timings={name: opt(STATS) for name in TIMING_NAMES + ('ttft_ms',)},
                   decode={'weight_bytes_per_token': NUM, 'achieved_gbps': opt(NUM)})
QWEN2VL_COMPARISON = {
    'path': str, 'ttft_ms': NUM, 'tpot_ms': NUM, 'peak_rss_mb': opt(NUM),
    'raw_ttft_ms': opt(NUM), 'raw_tpot_ms': opt(NUM), 'raw_peak_rss_mb': opt(NUM),
    'ttft_vs_raw': opt(NUM), 'tpot_overhead_ms': opt(NUM), 'tpot_overhead_fraction': opt(NUM),
    'tpot_ranges_overlap': opt(bool),
    'reference_ttft_ms': opt(NUM), 'ttft_vs_reference': opt(NUM),
}
QWEN2VL_DOCUMENT = {
    'schema_version': int, 'created': str, 'command': str, 'mode': str, 'note': opt(str),
    'duration_s': NUM,
    'settings': {'threads': int, 'new_tokens': int, 'warmup': int, 'repetitions': int,
                 'reference_repetitions': int, 'prompt': str,
                 'image': {'width': int, 'height': int, 'kind': str, 'resized_width': int,
                           'resized_height': int, 'image_tokens': int},
                 'pixel_budget': {'min_pixels': int, 'max_pixels': int},
                 'image_token_bounds': ListOf(int), 'n_ctx': int, 'paths': ListOf(str),
                 'model': str, 'ignore_eos': bool},
    'machine': MACHINE, 'model': QWEN2VL_MODEL, 'runs': ListOf(QWEN2VL_RUN),
    'comparison': ListOf(QWEN2VL_COMPARISON),
    'artifacts': {'json': str, 'markdown': str},
}
"""The Qwen2-VL run's document (``python -m vlm_ros_bench qwen2vl``)."""


def _name(types):
    types = types if isinstance(types, tuple) else (types,)
    return ' or '.join(t.__name__ for t in types)


def check(value, spec, where, problems):
    """Append to ``problems`` every way ``value`` differs from ``spec``."""
    if isinstance(spec, Nullable):
        if value is None:
            return
        spec = spec.spec
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f'{where}: expected an object, got {type(value).__name__}')
            return
        for key, sub in spec.items():
            if key not in value:
                problems.append(f'{where}: missing {key!r}')
            else:
                check(value[key], sub, f'{where}.{key}', problems)
    elif isinstance(spec, ListOf):
        if not isinstance(value, list):
            problems.append(f'{where}: expected a list, got {type(value).__name__}')
            return
        for i, item in enumerate(value):
            check(item, spec.item, f'{where}[{i}]', problems)
    else:
        ok = isinstance(value, spec) and not (isinstance(value, bool) and bool not in (
            spec if isinstance(spec, tuple) else (spec,)))
        if not ok:
            problems.append(f'{where}: expected {_name(spec)}, got {type(value).__name__}')


def validate(document):
    """Return the list of problems of a benchmark document (empty: well formed)."""
    problems = []
    check(document, DOCUMENT, '$', problems)
    return problems


def validate_qwen2vl(document):
    """Return the list of problems of a Qwen2-VL results document (empty: well formed)."""
    problems = []
    check(document, QWEN2VL_DOCUMENT, '$', problems)
    return problems

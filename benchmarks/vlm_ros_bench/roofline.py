"""
Roofline figures: bytes a decode step must read, FLOPs of vision and prefill.

Decode (one token, batch 1) is bound by memory bandwidth: every weight of the language
model's layers and of the output projection is read once per token, plus one row of the
token embedding and the KV cache so far. The bytes per token come from the model files the
path runs (``models.onnx_bytes_entry`` / ``models.gguf_weight_bytes``: tensor bytes at their
stored precision) or, for transformers, from the float32 parameter count; the KV cache is
counted at its runtime precision for the average context length of the answer. The lower
bound of the time per output token is bytes / measured read bandwidth, and the fraction
reached is that bound over the measured TPOT.

Vision and prefill are compute bound; their FLOPs (2 per multiply-add, linear layers plus
attention scores and values, causal halves for the decoder) are set against the measured
float32 matmul throughput. The prefill counts logits for the last position only (what a
prefill needs); ``prefill_gflop_executed`` adds the logits the ONNX decoder graph computes
for every prompt position, which our export does.
"""


def kv_bytes_per_position(shapes, element_bytes):
    """Return the bytes of keys and values for one position across all layers."""
    t = shapes['text']
    return 2 * t['num_hidden_layers'] * t['num_key_value_heads'] * t['head_dim'] * element_bytes


def vision_gflop(shapes, frames):
    """Return the GFLOP of the vision tower and connector for ``frames`` tiles."""
    v, scale = shapes['vision'], shapes['scale_factor']
    d, ff, p = v['hidden_size'], v['intermediate_size'], v['patch_size']
    tokens = (v['image_size'] // p) ** 2
    layer = 2 * tokens * (4 * d * d + 2 * d * ff) + 2 * 2 * tokens * tokens * d
    patch = 2 * tokens * 3 * p * p * d
    connector = 2 * (tokens // scale ** 2) * (d * scale ** 2) * shapes['text']['hidden_size']
    return frames * (v['num_hidden_layers'] * layer + patch + connector) / 1e9


def prefill_gflop(shapes, n, logits_positions=1):
    """Return the GFLOP of the decoder over an ``n``-token prompt (causal attention)."""
    t = shapes['text']
    h, ff, hd = t['hidden_size'], t['intermediate_size'], t['head_dim']
    q_out, kv_out = t['num_attention_heads'] * hd, t['num_key_value_heads'] * hd
    linear = 2 * n * (h * q_out + 2 * h * kv_out + q_out * h + 3 * h * ff)
    attention = 2 * 2 * q_out * n * (n + 1) / 2
    head = 2 * h * t['vocab_size'] * logits_positions
    return (t['num_hidden_layers'] * (linear + attention) + head) / 1e9


def decode_weight_bytes(manifest, path):
    """Return (weight bytes read per decoded token, KV element bytes) for ``path``."""
    bytes_ = manifest['bytes']
    if path['gguf_type']:
        return bytes_['gguf'][path['gguf_type']]['decode_bytes_per_token'], 2
    if path['onnx_variant']:
        return bytes_['onnx'][path['onnx_variant']]['decode_bytes_per_token'], 4
    params = manifest['params']
    head = params['lm_head_untied'] or params['embedding']
    row = params['embedding'] // manifest['shapes']['text']['vocab_size']
    return 4 * (params['text_layers'] + head + row), 4


def _median(timings, name):
    stats = timings.get(name)
    return stats['median'] if stats else None


def roofline(manifest, path, record, hardware):
    """Return the roofline figures of one measured run (None entries where not measurable)."""
    shapes = manifest['shapes']
    bandwidth = hardware['bandwidth']['memory_read_gbps']
    peak = hardware['matmul']['peak_gflops']
    timings = record['timings']
    out = {'bandwidth_gbps': bandwidth, 'peak_gflops': peak}
    weights, kv_element = decode_weight_bytes(manifest, path)
    prompt = record['prompt_tokens'] or 0
    new = record['new_tokens']
    kv = kv_bytes_per_position(shapes, kv_element) * (prompt + new / 2.0)
    out['decode_weight_bytes_per_token'] = weights
    out['decode_kv_bytes_per_token'] = kv
    out['decode_bytes_per_token'] = weights + kv
    out['tpot_bound_ms'] = (weights + kv) / (bandwidth * 1e9) * 1000.0
    tpot = _median(timings, 'tpot_ms')
    out['achieved_gbps'] = (weights + kv) / (tpot / 1000.0) / 1e9 if tpot else None
    out['bandwidth_fraction'] = out['tpot_bound_ms'] / tpot if tpot else None

    frames = (record['image_tokens'] or 0) / shapes['image_seq_len']
    vis = vision_gflop(shapes, frames) if frames else None
    out['vision_frames'] = frames
    out['vision_gflop'] = vis
    vision_ms = _median(timings, 'vision_ms')
    out['vision_gflops_achieved'] = vis / (vision_ms / 1000.0) if vis and vision_ms else None
    out['vision_fraction_of_peak'] = (out['vision_gflops_achieved'] / peak
                                      if out['vision_gflops_achieved'] else None)
    pre = prefill_gflop(shapes, prompt) if prompt else None
    out['prefill_gflop'] = pre
    executed = pre
    if pre is not None and path['onnx_variant'] and not path['gguf_type']:
        executed = prefill_gflop(shapes, prompt, logits_positions=prompt)
    out['prefill_gflop_executed'] = executed
    prefill_ms = _median(timings, 'prefill_ms')
    out['prefill_gflops_achieved'] = pre / (prefill_ms / 1000.0) if pre and prefill_ms else None
    out['prefill_fraction_of_peak'] = (out['prefill_gflops_achieved'] / peak
                                       if out['prefill_gflops_achieved'] else None)
    return out

"""
Check the tiny SmolVLM ONNX exports against transformers, end to end.

Run with ``PYTHONPATH=tools python -m vlm_ros_tools.check_export [--variants a b]``.

For every variant: build + export a tiny model, make ``input_ids`` / ``pixel_values`` for a
random 200x150 RGB image and "Describe this image." with transformers' processor, then run
the three ONNX graphs by hand (embed tokens, scatter the image features into the
``<image>`` positions, decoder with an empty cache, greedy loop with the KV cache) and
compare with ``model(...)`` logits and ``model.generate(do_sample=False)``.  Extra checks
cover a padding image and a partial pixel mask in the vision encoder, a left-padded batch
in the decoder, and the int8 graphs.  Exits with status 1 if an fp32 check fails.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')

LOGIT_TOL = 1e-3
NEW_TOKENS = 16
PROMPT = 'Describe this image.'


def _session(path):
    """Open an onnxruntime CPU session."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])


class OnnxSmolVLM:
    """Minimal numpy driver of the three exported graphs (hub input/output names)."""

    def __init__(self, onnx_dir, config, suffix=''):
        """Open ``vision_encoder``/``embed_tokens``/``decoder_model_merged`` + ``suffix``."""
        self.vision = _session(os.path.join(onnx_dir, f'vision_encoder{suffix}.onnx'))
        self.embed = _session(os.path.join(onnx_dir, f'embed_tokens{suffix}.onnx'))
        self.decoder = _session(os.path.join(onnx_dir, f'decoder_model_merged{suffix}.onnx'))
        text = config.text_config
        self.num_layers = text.num_hidden_layers
        self.kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, 'head_dim', None) or (
            text.hidden_size // text.num_attention_heads)
        self.image_token_id = config.image_token_id

    def image_features(self, pixel_values, pixel_attention_mask):
        """Run the vision encoder."""
        return self.vision.run(['image_features'], {
            'pixel_values': np.asarray(pixel_values, dtype=np.float32),
            'pixel_attention_mask': np.asarray(pixel_attention_mask).astype(np.bool_),
        })[0]

    def embeds(self, input_ids):
        """Run the token embedding graph."""
        return self.embed.run(['inputs_embeds'], {'input_ids': input_ids.astype(np.int64)})[0]

    def empty_past(self, batch):
        """Return a zero-length KV cache feed."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        past = {}
        for i in range(self.num_layers):
            for kind in ('key', 'value'):
                past[f'past_key_values.{i}.{kind}'] = np.zeros(shape, np.float32)
        return past

    def decode(self, embeds, attention_mask, position_ids, past):
        """Run one decoder step; return logits and the next past feed."""
        feed = {'inputs_embeds': embeds, 'attention_mask': attention_mask.astype(np.int64),
                'position_ids': position_ids.astype(np.int64)}
        feed.update(past)
        outputs = self.decoder.run(None, feed)
        names = [o.name for o in self.decoder.get_outputs()]
        new_past = {}
        for name, value in zip(names[1:], outputs[1:], strict=True):
            new_past[name.replace('present.', 'past_key_values.')] = value
        return outputs[0], new_past

    def generate(self, input_ids, attention_mask, pixel_values, pixel_attention_mask,
                 max_new_tokens):
        """Greedy decoding; return (first-step logits, new tokens, smallest top-2 gap)."""
        embeds = self.embeds(input_ids)
        feats = self.image_features(pixel_values, pixel_attention_mask)
        image_pos = input_ids == self.image_token_id
        embeds[image_pos] = feats.reshape(-1, feats.shape[-1])
        position_ids = np.cumsum(attention_mask, axis=-1) - 1
        position_ids[attention_mask == 0] = 1
        past = self.empty_past(input_ids.shape[0])
        logits, past = self.decode(embeds, attention_mask, position_ids, past)
        first_logits = logits
        tokens, gap = [], np.inf
        for step in range(max_new_tokens):
            last = logits[:, -1, :]
            gap = min(gap, _top2_gap(last))
            nxt = last.argmax(-1)
            tokens.append(int(nxt[0]))
            if step + 1 == max_new_tokens:
                break
            attention_mask = np.concatenate(
                [attention_mask, np.ones((attention_mask.shape[0], 1), np.int64)], axis=1)
            position_ids = position_ids[:, -1:] + 1
            logits, past = self.decode(self.embeds(nxt[:, None]), attention_mask,
                                       position_ids, past)
        return first_logits, tokens, gap


def _top2_gap(logits):
    """Return the smallest gap between the two best logits of each row."""
    top = np.sort(logits, axis=-1)[:, -2:]
    return float((top[:, 1] - top[:, 0]).min())


def _inputs(processor):
    """Return processor outputs (torch) for the random image and the prompt."""
    from PIL import Image

    rng = np.random.RandomState(1234)
    image = Image.fromarray(rng.randint(0, 256, (150, 200, 3), dtype=np.uint8))
    messages = [{'role': 'user', 'content': [
        {'type': 'image'}, {'type': 'text', 'text': PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=prompt, images=[image], return_tensors='pt')


def _hf_generate(model, inputs, max_new_tokens):
    """Greedy ``model.generate`` without early stopping; return the new tokens."""
    import torch

    gen_cfg = model.generation_config
    saved = gen_cfg.eos_token_id
    gen_cfg.eos_token_id = None
    try:
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens)
    finally:
        gen_cfg.eos_token_id = saved
    return out[0, inputs['input_ids'].shape[1]:].tolist()


def _check_vision_edge_cases(model, runner, inputs):
    """Compare the vision graph with transformers on a padding image and a partial mask."""
    import torch

    pv = inputs['pixel_values'][:, :2].clone()
    mask = inputs['pixel_attention_mask'][:, :2].clone().bool()
    # Second image: right part is padding (pixels zeroed, mask off, not patch aligned).
    width = pv.shape[-1]
    cut = width // 2 + 3
    pv[:, 1, :, :, cut:] = 0.0
    mask[:, 1, :, cut:] = False
    # Third image: an all-zero padding image that both implementations must drop.
    pv = torch.cat([pv, torch.zeros_like(pv[:, :1])], dim=1)
    mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
    with torch.no_grad():
        ref = model.get_image_features(pv, mask).pooler_output
    ref = torch.cat(list(ref), 0).numpy()
    got = runner.image_features(pv.numpy(), mask.numpy())
    if got.reshape(-1, got.shape[-1]).shape != ref.shape:
        return float('inf')
    return float(np.abs(got.reshape(ref.shape) - ref).max())


def _check_padded_batch(model, runner, processor):
    """Left-padded two-prompt text batch: compare decoder logits at the real positions."""
    import torch

    tok = processor.tokenizer
    tok.padding_side = 'left'
    batch = tok(['User: What is in the picture?', 'Hi'], return_tensors='pt', padding=True)
    ids, mask = batch['input_ids'], batch['attention_mask']
    pos = mask.cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    logits, past = runner.decode(runner.embeds(ids.numpy()), mask.numpy(), pos.numpy(),
                                 runner.empty_past(ids.shape[0]))
    valid = mask.numpy().astype(bool)
    diff = float(np.abs(logits[valid] - ref[valid]).max())
    # One cached step on top of the padded prompt.
    nxt = logits[:, -1].argmax(-1)
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    ids2 = torch.cat([ids, torch.from_numpy(nxt)[:, None]], 1)
    pos2 = mask2.cumsum(-1) - 1
    pos2 = pos2.masked_fill(mask2 == 0, 1)
    with torch.no_grad():
        ref2 = model(input_ids=ids2, attention_mask=mask2, position_ids=pos2).logits.numpy()
    step, _ = runner.decode(runner.embeds(nxt[:, None]), mask2.numpy(), pos2[:, -1:].numpy(),
                            past)
    return max(diff, float(np.abs(step[:, -1] - ref2[:, -1]).max()))


def check_variant(variant, workdir, use_cache=False, seed=0):
    """Build, export and compare one variant; return a result dict."""
    import torch
    from transformers import AutoModelForImageTextToText

    from . import export_onnx, smolvlm_factory

    res = {'variant': variant}
    t0 = time.time()
    if use_cache:
        model_dir = export_onnx.cached_test_model(variant, seed=seed)
        res['build_s'] = res['export_s'] = None
        res['cached_s'] = time.time() - t0
    else:
        model_dir = os.path.join(workdir, variant)
        smolvlm_factory.build_tiny_smolvlm(model_dir, variant=variant, seed=seed)
        t1 = time.time()
        export_onnx.export_smolvlm_onnx(model_dir)
        res['build_s'], res['export_s'] = t1 - t0, time.time() - t1
    res['model_dir'] = model_dir
    res['sizes_kb'] = {
        name: os.path.getsize(os.path.join(model_dir, name)) // 1024
        for name in ('model.safetensors', 'onnx/vision_encoder.onnx',
                     'onnx/embed_tokens.onnx', 'onnx/decoder_model_merged.onnx',
                     'onnx/decoder_model_merged_int8.onnx')}

    processor = smolvlm_factory.load_processor(model_dir)
    inputs = _inputs(processor)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).eval()
    res['seq_len'] = int(inputs['input_ids'].shape[1])
    res['num_tiles'] = int(inputs['pixel_values'].shape[1])
    with torch.no_grad():
        ref_logits = model(**inputs).logits.numpy()
    ref_tokens = _hf_generate(model, inputs, NEW_TOKENS)

    np_in = {k: v.numpy() for k, v in inputs.items()}
    for label, suffix in (('fp32', ''), ('int8', '_int8')):
        runner = OnnxSmolVLM(os.path.join(model_dir, 'onnx'), model.config, suffix)
        first, tokens, gap = runner.generate(
            np_in['input_ids'], np_in['attention_mask'], np_in['pixel_values'],
            np_in['pixel_attention_mask'], NEW_TOKENS)
        res[label] = {
            'logit_diff': float(np.abs(first - ref_logits).max()),
            'argmax_agreement': float((first.argmax(-1) == ref_logits.argmax(-1)).mean()),
            'tokens': tokens,
            'tokens_match': tokens == ref_tokens,
            'matching_prefix': _common_prefix(tokens, ref_tokens),
            'min_top2_gap': gap,
        }
        if label == 'fp32':
            res['vision_edge_diff'] = _check_vision_edge_cases(model, runner, inputs)
            res['padded_batch_diff'] = _check_padded_batch(model, runner, processor)
    res['hf_tokens'] = ref_tokens
    res['distinct_tokens'] = len(set(ref_tokens))
    res['hf_text'] = processor.tokenizer.decode(ref_tokens)
    res['ok'] = (res['fp32']['logit_diff'] < LOGIT_TOL and res['fp32']['tokens_match']
                 and res['vision_edge_diff'] < LOGIT_TOL
                 and res['padded_batch_diff'] < LOGIT_TOL)
    return res


def _common_prefix(a, b):
    """Return the length of the common prefix of two lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _report(res):
    """Print one variant's results."""
    print(f"== variant {res['variant']} ({res['model_dir']})")
    if res.get('build_s') is not None:
        print(f"  build {res['build_s']:.2f}s, export (+int8) {res['export_s']:.2f}s")
    else:
        print(f"  cached model ready in {res['cached_s']:.2f}s")
    sizes = ', '.join(f'{name}={kib}' for name, kib in res['sizes_kb'].items())
    print(f'  sizes (KiB): {sizes}')
    print(f"  prompt tokens {res['seq_len']}, tiles {res['num_tiles']}")
    print(f"  transformers greedy: {res['hf_tokens']} ({res['distinct_tokens']} distinct) "
          f"{res['hf_text']!r}")
    for label in ('fp32', 'int8'):
        r = res[label]
        verdict = 'MATCH' if r['tokens_match'] else 'DIFFER'
        print(f"  {label}: first-step logits max|diff| {r['logit_diff']:.3g}, "
              f"prompt argmax agreement {r['argmax_agreement']:.1%}, tokens {verdict} "
              f"({r['matching_prefix']}/{NEW_TOKENS}), min top-2 gap {r['min_top2_gap']:.3g}")
        if not r['tokens_match']:
            print(f"        onnx tokens: {r['tokens']}")
    print(f"  vision padding/partial-mask max|diff| {res['vision_edge_diff']:.3g}")
    print(f"  left-padded batch decoder max|diff| {res['padded_batch_diff']:.3g}")
    print('  => ' + ('OK' if res['ok'] else 'FAILED'))


def main(argv=None):
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--variants', nargs='+', default=['a', 'b'])
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--cache', action='store_true',
                        help='use cached_test_model() instead of a fresh build')
    parser.add_argument('--keep', metavar='DIR', help='build into DIR and keep it')
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    workdir = args.keep or tempfile.mkdtemp(prefix='vlm_ros_check_')
    ok = True
    try:
        for variant in args.variants:
            res = check_variant(variant, workdir, use_cache=args.cache, seed=args.seed)
            _report(res)
            ok = ok and res['ok']
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print('ALL OK' if ok else 'SOME CHECKS FAILED')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())

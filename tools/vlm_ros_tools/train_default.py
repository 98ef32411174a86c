"""
Train the embedded default model: a tiny SmolVLM that answers questions about shape scenes.

``python -m vlm_ros_tools.train_default --seed 0 --out vlm_ros/models/default`` trains a
SmolVLM (Idefics3 architecture: SigLIP-style vision tower, pixel-shuffle connector, Llama
language model) from scratch on CPU with PyTorch, on the synthetic scenes of ``scenes``,
then exports it with the project's own exporters (``export_onnx``: ONNX fp32 + int8;
``gguf_export``: the language model as GGUF f16 and Q8_0) and writes the hub-style model
folder plus ``vlm_ros.json`` (the label the node logs) and ``checksums.json``.

The model sees one 96 x 96 tile per image (no splitting: ``do_image_splitting`` is false
and ``size.longest_edge`` is the tile), i.e. 12 x 12 patches of 8 pixels, pixel-shuffled by
4 into 3 x 3 = 9 image tokens -- one per cell of the scenes' 3 x 3 layout of places.
Training has two stages: the vision tower and connector first learn to make each image
token read as the words of its cell's object (``pretrain_vision``), then the language model
learns the questions and answers with the vision part frozen.  Training inputs are made by
the engine's own preprocessing and prompt code (``Idefics3Family.prepare``, equal to
transformers' ``SmolVLMProcessor``), and the loss covers the answer tokens and the closing
``<end_of_utterance>`` only.  The tokenizer is tiny_tokenizer's byte-level BPE layout
trained on the scene text, so answers are a few tokens.  Everything is seeded; the run is
reproducible on the same library versions and thread count.
"""

import argparse
import hashlib
import math
import os
import shutil
import tempfile
import time

import numpy as np

from . import hub_files, scenes, smolvlm_factory, tiny_tokenizer

TILE = 96
# Shapes of the model (SmolVLMConfig vision_config / text_config).
SPEC = {
    'vision': {'hidden_size': 64, 'intermediate_size': 256, 'num_hidden_layers': 3,
               'num_attention_heads': 4, 'image_size': TILE, 'patch_size': 8},
    'text': {'hidden_size': 128, 'intermediate_size': 256, 'num_hidden_layers': 3,
             'num_attention_heads': 4, 'num_key_value_heads': 2, 'head_dim': 32,
             'rope_theta': 10000.0},
    'scale_factor': 4,
    'tie_word_embeddings': True,
}
# Upper bound of the trained BPE part; the trainer stops earlier when merges run out.
BASE_VOCAB_SIZE = 512
# Image sizes drawn for training (the preprocessor resizes each to the tile).
TRAIN_SIZES = (64, 96, 128, 160)
# Relative frequency of the question kinds in training.
KIND_WEIGHTS = {'describe': 2.0, 'colour': 1.0, 'shape': 1.0, 'count': 1.0, 'where': 1.0,
                'exists': 1.0}
LABEL = 'a demonstration model trained on synthetic shape scenes, not a general model'
# Files of the shipped folder besides the ONNX graphs and GGUF files.
CONFIG_FILES = ('config.json', 'generation_config.json', 'preprocessor_config.json',
                'processor_config.json', 'chat_template.json', 'tokenizer.json',
                'tokenizer_config.json', 'special_tokens_map.json')
GGUF_FILES = {'f16': 'gguf/model-f16.gguf', 'q8_0': 'gguf/model-q8_0.gguf'}
CHECKSUMS = 'checksums.json'
KEEP = ('MODEL_CARD.md',)


# Tokenizer and configs -------------------------------------------------------------------

def write_tokenizer(out_dir, seed=0):
    """Write the tokenizer files trained on the scene text; return the special ids."""
    tokenizer = tiny_tokenizer.build_tiny_tokenizer(BASE_VOCAB_SIZE, scenes.corpus_lines(seed))
    return tiny_tokenizer.write_tiny_tokenizer(out_dir, tokenizer, sort_keys=True)


def image_seq_len():
    """Return the number of ``<image>`` tokens of the tile."""
    side = TILE // SPEC['vision']['patch_size']
    return side * side // SPEC['scale_factor'] ** 2


def make_config(ids):
    """Return the ``SmolVLMConfig`` of the model given the tokenizer's special ids."""
    return smolvlm_factory.config_from_spec(SPEC, ids)


def preprocessor_config():
    """Return ``preprocessor_config.json``: one tile per image, no splitting."""
    return smolvlm_factory.image_processor_config(TILE, 1, do_image_splitting=False)


def save_checkpoint(model, ids, out_dir):
    """Save weights and every config file of the hub layout into ``out_dir``."""
    smolvlm_factory.save_checkpoint(model, ids, out_dir, preprocessor_config(), image_seq_len(),
                                    tiles_per_edge=1)


# Training data ----------------------------------------------------------------------------

def _vary_question(question, rng):
    """Return ``question`` sometimes lower-cased or without its final punctuation."""
    if rng.random() < 0.1:
        question = question[0].lower() + question[1:]
    if rng.random() < 0.1:
        question = question.rstrip('?.')
    return question


class Examples:
    """Encode scenes and questions exactly as the engine does at inference."""

    def __init__(self, model_dir):
        """Load the engine's SmolVLM family (preprocessing, template, tokenizer)."""
        from vlm_ros.engine.families.idefics3 import Idefics3Family

        self.family = Idefics3Family(model_dir)
        self.eou_id = self.family.tokenizer.token_to_id(tiny_tokenizer.END_OF_UTTERANCE_TOKEN)
        self.pad_id = self.family.tokenizer.token_to_id(tiny_tokenizer.PAD_TOKEN)
        self._prompts = {}
        if self.family.do_image_splitting:
            raise ValueError('the default model is trained on single tiles (no splitting)')

    def encode(self, image, question, answer):
        """Return (ids, labels, pixel_values [1, 3, H, W]) of one training example."""
        prompt = self._prompts.get(question)
        if prompt is None:
            # The prompt ids depend on the question only: one image, no splitting.
            prompt = self.family.prepare(image, question).input_ids.tolist()
            self._prompts[question] = prompt
        target = self.family.tokenizer.encode(' ' + answer, add_special_tokens=False)
        target.append(self.eou_id)
        labels = [-100] * len(prompt) + target
        return prompt + target, labels, self.pixels(image)

    def pixels(self, image):
        """Return the engine's pixel_values [1, 3, H, W] of one image."""
        vision, _ = self.family.preprocess(image)
        return vision['pixel_values'][0]

    def random(self, rng, vary=True):
        """Return an encoded random example and its question kind."""
        scene = scenes.random_scene(rng)
        size = TRAIN_SIZES[int(rng.integers(len(TRAIN_SIZES)))]
        image = scenes.render(scene, size)
        weights = np.array([KIND_WEIGHTS[k] for k in scenes.KINDS])
        kind = scenes.KINDS[int(rng.choice(len(scenes.KINDS), p=weights / weights.sum()))]
        qa = scenes.ask(scene, kind, rng)
        question = _vary_question(qa.question, rng) if vary else qa.question
        return self.encode(image, question, qa.answer), kind

    def collate(self, encoded):
        """Pad a list of encoded examples into model inputs (torch tensors)."""
        import torch

        length = max(len(ids) for ids, _, _ in encoded)
        batch = len(encoded)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        for row, (ids, lab, _) in enumerate(encoded):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(lab)] = torch.tensor(lab)
            attention[row, :len(ids)] = 1
        pixels = torch.from_numpy(np.stack([p for _, _, p in encoded]))
        mask = torch.ones((batch, 1, pixels.shape[-2], pixels.shape[-1]), dtype=torch.bool)
        return {'input_ids': input_ids, 'attention_mask': attention, 'labels': labels,
                'pixel_values': pixels, 'pixel_attention_mask': mask}


def _word_ids(tokenizer, words):
    """Return the single token id of each `` word`` (as it follows a space in the text)."""
    ids = []
    for word in words:
        encoded = tokenizer.encode(' ' + word, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f'{word!r} is not a single token of the trained tokenizer')
        ids.append(encoded[0])
    return ids


def cell_targets(scene):
    """Return (shape, colour, place) class ids per grid cell, row-major (0: no shape)."""
    shapes = np.zeros(9, dtype=np.int64)
    colours = np.zeros(9, dtype=np.int64)
    places = np.full(9, -100, dtype=np.int64)  # ignored where the cell is empty
    names = list(scenes.COLOURS)
    for item in scene.items:
        row, col = scenes.PLACE_CELLS[item.place]
        shapes[3 * row + col] = 1 + scenes.SHAPES.index(item.shape)
        colours[3 * row + col] = 1 + names.index(item.colour)
        places[3 * row + col] = list(scenes.PLACES).index(item.place)
    return shapes, colours, places


def _cosine_logits(tokens, rows, extra, temperature):
    """Return ``temperature`` x cosine of normalised ``tokens`` with each class row."""
    from torch.nn import functional
    import torch

    table = rows if extra is None else torch.cat([extra, rows])
    return temperature * tokens @ functional.normalize(table, dim=-1).T


def pretrain_vision(model, examples, rng, steps, batch_size=32, lr=2e-3, weight_decay=0.05,
                    temperature=20.0, log_every=500, log=print):
    """
    Stage 1: make each image token read as the words of the object in its cell.

    A vision transformer learned from scratch picks up shapes slowly when its only signal
    comes through the language model.  Here each of the 9 connector outputs (one per cell
    of the scenes' 3 x 3 layout) is classified, by cosine similarity with the language
    model's own (tied) embeddings of the words `` circle`` .. `` cross``, `` red`` ..
    `` orange`` and `` top`` .. `` bottom``, as the shape, colour and place of the object
    in its cell (or as a learned "nothing" direction).  The image tokens then arrive in the
    language model as sums of the words a question asks for, so stage 2 only has to learn
    to find the token that matches the question and copy a word out of it.
    """
    import torch
    from torch.nn import functional

    inner = model.model
    if image_seq_len() != 9:
        raise ValueError('stage 1 expects 3 x 3 image tokens')
    tokenizer = examples.family.tokenizer
    words = {
        'shape': torch.tensor(_word_ids(tokenizer, scenes.SHAPES)),
        'colour': torch.tensor(_word_ids(tokenizer, list(scenes.COLOURS))),
        'place': torch.tensor(_word_ids(tokenizer, list(scenes.PLACES))),
    }
    embeddings = model.get_input_embeddings().weight
    nothing = torch.nn.Parameter(torch.randn(2, embeddings.shape[1]) * 0.02)
    params = (list(inner.vision_model.parameters()) + list(inner.connector.parameters()) +
              [embeddings, nothing])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    inner.vision_model.train()
    start = time.monotonic()
    running = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group['lr'] = _learning_rate(step, steps, lr, 100)
        pixels, targets = [], []
        for _ in range(batch_size):
            scene = scenes.random_scene(rng)
            size = TRAIN_SIZES[int(rng.integers(len(TRAIN_SIZES)))]
            pixels.append(examples.pixels(scenes.render(scene, size))[0])
            targets.append(cell_targets(scene))
        pixels = torch.from_numpy(np.stack(pixels))
        shapes, colours, places = (torch.from_numpy(np.stack(t)).reshape(-1)
                                   for t in zip(*targets, strict=True))
        tokens = inner.connector(inner.vision_model(pixel_values=pixels).last_hidden_state)
        tokens = functional.normalize(tokens.reshape(-1, tokens.shape[-1]), dim=-1)

        shape_logits = _cosine_logits(tokens, embeddings[words['shape']], nothing[:1],
                                      temperature)
        colour_logits = _cosine_logits(tokens, embeddings[words['colour']], nothing[1:],
                                       temperature)
        place_logits = _cosine_logits(tokens, embeddings[words['place']], None, temperature)
        loss = (functional.cross_entropy(shape_logits, shapes) +
                functional.cross_entropy(colour_logits, colours) +
                functional.cross_entropy(place_logits, places, ignore_index=-100))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            ok = ((shape_logits.argmax(-1) == shapes) & (colour_logits.argmax(-1) == colours) &
                  ((place_logits.argmax(-1) == places) | (places == -100)))
            running.append(ok.reshape(batch_size, -1).all(1).float().mean().item())
        if (step + 1) % log_every == 0:
            log(f'vision step {step + 1}/{steps}  loss {loss.item():.4f}  '
                f'all cells right {np.mean(running):.3f}  {time.monotonic() - start:.0f} s')
            running = []
    return time.monotonic() - start


def answer_loss(model, batch):
    """Return (loss, per-example exact-match flags) over the answer tokens only."""
    import torch
    from torch.nn import functional

    out = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'],
                pixel_values=batch['pixel_values'],
                pixel_attention_mask=batch['pixel_attention_mask'])
    logits = out.logits[:, :-1]
    labels = batch['labels'][:, 1:]
    mask = labels != -100
    ce = functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                  ignore_index=-100, reduction='none').view(labels.shape)
    per_example = (ce * mask).sum(1) / mask.sum(1)
    with torch.no_grad():
        # All answer tokens argmax-correct under teacher forcing == greedy gives the answer.
        exact = ((logits.argmax(-1) == labels) | ~mask).all(1)
    return per_example.mean(), exact


def _learning_rate(step, steps, peak, warmup):
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def validate(model, examples, batches):
    """Return exact-match accuracy per question kind on fixed validation batches."""
    import torch

    hits = {k: [] for k in scenes.KINDS}
    model.eval()
    with torch.no_grad():
        for encoded, kinds in batches:
            _, exact = answer_loss(model, examples.collate(encoded))
            for kind, ok in zip(kinds, exact.tolist(), strict=True):
                hits[kind].append(ok)
    model.train()
    return {k: float(np.mean(v)) if v else float('nan') for k, v in hits.items()}


def train(model_dir, seed=0, steps=3000, batch_size=64, lr=1e-3, warmup=300,
          vision_steps=3000, weight_decay=0.05, threads=1, log_every=100, eval_every=500,
          log=print):
    """
    Build and train the model in ``model_dir`` (weights and configs saved there).

    Stage 1 pretrains the vision tower (``pretrain_vision``, ``vision_steps`` steps of 32
    images); stage 2 trains the whole model on question/answer pairs (``steps`` steps of
    ``batch_size``).  Returns a summary dict (steps, seconds, validation accuracies).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    os.makedirs(model_dir, exist_ok=True)
    ids = write_tokenizer(model_dir, seed)
    # Eager attention: on CPU it is several times faster than SDPA at these sizes.
    model = AutoModelForImageTextToText.from_config(
        make_config(ids), attn_implementation='eager').to(torch.float32)
    save_checkpoint(model, ids, model_dir)  # the engine family reads these files
    examples = Examples(model_dir)
    rng = scenes.scene_rng(seed, 0)
    val_rng = scenes.scene_rng(seed, 5)
    val = []
    for _ in range(8):
        pairs = [examples.random(val_rng, vary=False) for _ in range(64)]
        val.append(([e for e, _ in pairs], [k for _, k in pairs]))
    params = sum(p.numel() for p in model.parameters())
    log(f'model: {params:,} parameters, vocabulary {ids["vocab_size"]}, '
        f'{image_seq_len()} image tokens')
    vision_seconds = 0.0
    if vision_steps:
        vision_seconds = pretrain_vision(model, examples, scenes.scene_rng(seed, 6),
                                         vision_steps, weight_decay=weight_decay,
                                         log_every=log_every * 5, log=log)
        torch.save(model.state_dict(), os.path.join(model_dir, 'stage1.pt'))
    if vision_steps:
        # Stage 2 keeps the vision tower and connector of stage 1: the language model learns
        # to read tokens that already name what is in each cell (and steps get cheaper).
        for module in (model.model.vision_model, model.model.connector):
            module.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                                   {'params': no_decay, 'weight_decay': 0.0}],
                                  lr=lr, betas=(0.9, 0.98), eps=1e-8)
    model.train()
    start = time.monotonic()
    running, running_exact = [], []
    accuracy = {}
    for step in range(steps):
        for group in optimizer.param_groups:
            group['lr'] = _learning_rate(step, steps, lr, warmup)
        encoded = [examples.random(rng)[0] for _ in range(batch_size)]
        loss, exact = answer_loss(model, examples.collate(encoded))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        optimizer.step()
        running.append(loss.item())
        running_exact.append(exact.float().mean().item())
        if (step + 1) % log_every == 0:
            log(f'step {step + 1}/{steps}  loss {np.mean(running):.4f}  '
                f'exact {np.mean(running_exact):.3f}  '
                f'{time.monotonic() - start:.0f} s')
            running, running_exact = [], []
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            accuracy = validate(model, examples, val)
            log('validation: ' + '  '.join(f'{k} {v:.3f}' for k, v in accuracy.items()))
    seconds = time.monotonic() - start
    model.eval()
    save_checkpoint(model, ids, model_dir)
    return {'steps': steps, 'batch_size': batch_size, 'vision_steps': vision_steps,
            'seconds': round(vision_seconds + seconds, 1),
            'vision_seconds': round(vision_seconds, 1), 'parameters': params,
            'validation': accuracy}


# Export and shipping ----------------------------------------------------------------------

def export(model_dir):
    """Export ONNX fp32 + int8 and GGUF f16 + Q8_0 into ``model_dir``; return their paths."""
    from .export_onnx import export_smolvlm_onnx
    from .gguf_export import export_text_gguf

    written = dict(export_smolvlm_onnx(model_dir, quantize_int8=True))
    for ftype, rel in GGUF_FILES.items():
        path = os.path.join(model_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        export_text_gguf(model_dir, path, arch='llama', ftype=ftype,
                         name='vlm_ros-default-shapes')
        written[f'gguf_{ftype}'] = path
    return written


def shipped_files(model_dir):
    """Return the relative paths of the files a shipped folder must hold."""
    from .export_onnx import GRAPH_NAMES, INT8_SUFFIX

    files = list(CONFIG_FILES)
    files += [f'onnx/{name}.onnx' for name in GRAPH_NAMES]
    files += [f'onnx/{name}{INT8_SUFFIX}.onnx' for name in GRAPH_NAMES]
    files += list(GGUF_FILES.values())
    return files


def sha256(path):
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(out_dir):
    """Write ``checksums.json``: the sha256 of every other file under ``out_dir``."""
    sums = {}
    for root, _, names in os.walk(out_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, out_dir).replace(os.sep, '/')
            if rel != CHECKSUMS:
                sums[rel] = sha256(path)
    hub_files.write_json(os.path.join(out_dir, CHECKSUMS),
                         {'algorithm': 'sha256', 'files': dict(sorted(sums.items()))})
    return sums


def ship(model_dir, out_dir, info):
    """Replace the model in ``out_dir`` by the exported files of ``model_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name in KEEP:
            continue
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    for rel in shipped_files(model_dir):
        dst = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(model_dir, rel), dst)
    hub_files.write_json(os.path.join(out_dir, 'vlm_ros.json'), {'label': LABEL, **info})
    write_checksums(out_dir)


def main(argv=None):
    """Command line: train, export and ship the default model (or refresh its checksums)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='vlm_ros/models/default',
                        help='folder to (re)write with the shipped files')
    parser.add_argument('--vision-steps', type=int, default=3000, help='stage 1 steps')
    parser.add_argument('--steps', type=int, default=3000, help='stage 2 steps')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--lr', type=float, default=1e-3, help='stage 2 peak learning rate')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--work-dir', help='keep the PyTorch checkpoint here (default: a '
                        'temporary folder, removed at the end)')
    parser.add_argument('--checksums-only', action='store_true',
                        help='only rewrite OUT/checksums.json (after editing the model card)')
    args = parser.parse_args(argv)
    if args.checksums_only:
        write_checksums(args.out)
        return 0
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    work = args.work_dir or tempfile.mkdtemp(prefix='vlm-default-')
    try:
        summary = train(work, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                        lr=args.lr, vision_steps=args.vision_steps, threads=args.threads,
                        log=lambda line: print(line, flush=True))
        print(f'trained in {summary["seconds"]:.0f} s', flush=True)
        export(work)
        info = {
            'source': 'tools/vlm_ros_tools/train_default.py (see MODEL_CARD.md)',
            'command': (f'python -m vlm_ros_tools.train_default --seed {args.seed} '
                        f'--vision-steps {args.vision_steps} --steps {args.steps} '
                        f'--batch-size {args.batch_size} --lr {args.lr} --threads {args.threads} '
                        f'--out {args.out}'),
            'seed': args.seed,
            'vision_steps': summary['vision_steps'],
            'steps': summary['steps'],
            'batch_size': summary['batch_size'],
            'parameters': summary['parameters'],
            'train_seconds': summary['seconds'],
        }
        ship(work, args.out, info)
        print(f'wrote {args.out}', flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

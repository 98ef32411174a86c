"""
Train the embedded default model: a tiny SmolVLM that answers questions about shape scenes.

``python -m vlm_ros_tools.train_default --seed 0 --out vlm_ros/models/default`` trains a
SmolVLM (Idefics3 architecture: SigLIP-style vision tower, pixel-shuffle connector, Llama
language model) from scratch on CPU with PyTorch, on the synthetic scenes of ``scenes``,
then exports it with the project's own exporters (``export_onnx``: ONNX fp32 + int8;
``gguf_export``: the language model as GGUF f16 and Q8_0, the vision part as an f16
mmproj for llama.cpp's own projector) and writes the hub-style model
folder plus ``vlm_ros.json`` (the label the node logs) and ``checksums.json``.

The model sees one 96 x 96 tile per image (no splitting: ``do_image_splitting`` is false
and ``size.longest_edge`` is the tile), i.e. 12 x 12 patches of 8 pixels, pixel-shuffled by
4 into 3 x 3 = 9 image tokens -- one per cell of the scenes' 3 x 3 layout of places.
Training has two stages: the vision tower and connector first learn to make each image
token read as the words of the object whose centre is in its cell, and hold its box
(``pretrain_vision``), then the language model learns the questions, answers and grounding
answers with the vision part frozen, a quarter of them with the image laid out as libmtmd
lays it out (a tile, then the global image).  Training inputs are made by
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
    'vision': {'hidden_size': 96, 'intermediate_size': 384, 'num_hidden_layers': 4,
               'num_attention_heads': 4, 'image_size': TILE, 'patch_size': 8},
    'text': {'hidden_size': 128, 'intermediate_size': 384, 'num_hidden_layers': 4,
             'num_attention_heads': 4, 'num_key_value_heads': 2, 'head_dim': 32,
             'rope_theta': 10000.0},
    'scale_factor': 4,
    'tie_word_embeddings': True,
}
# Upper bound of the trained BPE part; the trainer stops earlier when merges run out.
BASE_VOCAB_SIZE = 512
# Image sizes drawn for training (the preprocessor resizes each to the tile), and how often.
TRAIN_SIZES = ((48, 1.0), (64, 2.0), (96, 2.0), (128, 2.0), (160, 1.5), (224, 1.0),
               (320, 0.5))
# Relative frequency of the question kinds in training.
# The kinds that need the question's object found among several weigh more.
KIND_WEIGHTS = {'describe': 1.0, 'colour': 1.0, 'shape': 1.0, 'count': 0.5, 'where': 1.5,
                'exists': 1.5, 'detect': 2.5}
_KIND_WEIGHTS = np.array([KIND_WEIGHTS[k] for k in scenes.KINDS])
KIND_PROBABILITIES = _KIND_WEIGHTS / _KIND_WEIGHTS.sum()
# How often stage 2's scenes hold 1, 2 and 3 shapes: about a lone shape, "the first shape
# there" is always the right one to read, a shortcut that scenes of several shapes punish.
POOL_SHAPE_COUNTS = (0.2, 0.4, 0.4)
# How often a training grounding question names something that is not there.
ABSENT_DETECT_RATE = 0.15
LABEL = 'a demonstration model trained on synthetic shape scenes, not a general model'
# SmolVLM's template writes "User:" before a message that opens with an image and "User: "
# before one that opens with text. llama-cpp-python's server hands the template each image
# as a text part (libmtmd's marker), so the model would get "User: " in front of the image it
# was trained to see after "User:"; here a user's message always opens with "User:".
CHAT_TEMPLATE = tiny_tokenizer.CHAT_TEMPLATE.replace(
    "{% if message['content'][0]['type'] == 'image' %}",
    "{% if message['role'] == 'user' or message['content'][0]['type'] == 'image' %}")
# Files of the shipped folder besides the ONNX graphs and GGUF files.
CONFIG_FILES = ('config.json', 'generation_config.json', 'preprocessor_config.json',
                'processor_config.json', 'chat_template.json', 'tokenizer.json',
                'tokenizer_config.json', 'special_tokens_map.json')
GGUF_FILES = {'f16': 'gguf/model-f16.gguf', 'q8_0': 'gguf/model-q8_0.gguf'}
# The vision tower and connector for llama.cpp's own projector (libmtmd).
MMPROJ_FILE = 'gguf/mmproj-f16.gguf'
# libmtmd, and so llama-cpp-python's server, lays a SmolVLM image out as a 1 x 1 grid of
# tiles followed by the global image, where the processor of a model without splitting gives
# the global image alone: training asks this share of questions in libmtmd's layout, so the
# model answers the same through both.
MTMD_LAYOUT_RATE = 0.25
# The separator libmtmd puts between the tiles and the global image; it must be one token
# of the vocabulary (llama-cpp-python's server passes a missing one on as id -1).
TILE_SEPARATOR = '\n\n'
CHECKSUMS = 'checksums.json'
KEEP = ('MODEL_CARD.md',)


# Tokenizer and configs -------------------------------------------------------------------

def write_tokenizer(out_dir, seed=0):
    """Write the tokenizer files trained on the scene text; return the special ids."""
    from tokenizers import AddedToken

    tokenizer = tiny_tokenizer.build_tiny_tokenizer(BASE_VOCAB_SIZE, scenes.corpus_lines(seed))
    # Box coordinates as whole tokens (the pre-tokenizer splits digits one by one): one
    # token per coordinate is one class to predict, read straight out of an image token.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t in scenes.NUMBER_TOKENS + (TILE_SEPARATOR,)])
    return tiny_tokenizer.write_tiny_tokenizer(out_dir, tokenizer, sort_keys=True,
                                               chat_template=CHAT_TEMPLATE)


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
    """Encode questions and answers exactly as the engine does at inference."""

    def __init__(self, model_dir):
        """Load the engine's SmolVLM family (preprocessing, template, tokenizer)."""
        from vlm_ros.engine.families.idefics3 import Idefics3Family

        self.family = Idefics3Family(model_dir)
        self.eou_id = self.family.tokenizer.token_to_id(tiny_tokenizer.END_OF_UTTERANCE_TOKEN)
        self.pad_id = self.family.tokenizer.token_to_id(tiny_tokenizer.PAD_TOKEN)
        self._prompts = {}
        token = self.family.tokenizer.token_to_id
        image_token = token(tiny_tokenizer.IMAGE_TOKEN)
        # What libmtmd puts before the global image: the one tile of its 1 x 1 grid.
        self._tile = ([token(tiny_tokenizer.FAKE_IMAGE_TOKEN), token('<row_1_col_1>')] +
                      [image_token] * image_seq_len() + [token(TILE_SEPARATOR)])
        self._global = [token(tiny_tokenizer.FAKE_IMAGE_TOKEN),
                        token(tiny_tokenizer.GLOBAL_IMAGE_TOKEN)]
        if self.family.do_image_splitting:
            raise ValueError('the default model is trained on single tiles (no splitting)')

    def encode(self, question, answer, mtmd_layout=False):
        """
        Return (ids, labels) of one training example (one image, then the question).

        With ``mtmd_layout`` the image is laid out as libmtmd does (``mtmd_prompt``).
        """
        prompt = self._prompts.get((question, mtmd_layout))
        if prompt is None:
            # The prompt ids depend on the question only: one image, one tile.
            blank = np.zeros((TILE, TILE, 3), dtype=np.uint8)
            prompt = self.family.prepare(blank, question).input_ids.tolist()
            if mtmd_layout:
                prompt = self.mtmd_prompt(prompt)
            self._prompts[(question, mtmd_layout)] = prompt
        target = self.family.tokenizer.encode(' ' + answer, add_special_tokens=False)
        target.append(self.eou_id)
        return prompt + target, [-100] * len(prompt) + target

    def mtmd_prompt(self, prompt):
        """Return the processor's one-image ``prompt`` ids with libmtmd's tile added."""
        at = next(i for i in range(len(prompt)) if prompt[i:i + 2] == self._global)
        return prompt[:at] + self._tile + prompt[at:]

    def pixels(self, image):
        """Return the engine's pixel_values [1, 3, H, W] of one image."""
        vision, _ = self.family.preprocess(image)
        return vision['pixel_values'][0]

    def collate(self, encoded, features):
        """Pad encoded examples into model inputs; ``features``: their image tokens in order."""
        import torch

        length = max(len(ids) for ids, _ in encoded)
        batch = len(encoded)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        for row, (ids, lab) in enumerate(encoded):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(lab)] = torch.tensor(lab)
            attention[row, :len(ids)] = 1
        return {'input_ids': input_ids, 'attention_mask': attention, 'labels': labels,
                'image_features': features}


class ScenePool:
    """
    Stage 2's scenes, with their image tokens from the frozen vision part computed once.

    Questions are drawn afresh at every use, so a scene serves several steps for the cost
    of drawing and encoding it once.
    """

    def __init__(self, model, examples, rng, size, chunk=64):
        """Draw, render and encode ``size`` scenes."""
        import torch

        self.scenes, tokens = [], []
        with torch.no_grad():
            for start in range(0, size, chunk):
                group, pixels = draw_scenes(examples, rng, min(chunk, size - start),
                                            POOL_SHAPE_COUNTS)
                tokens.append(image_tokens(model, pixels))
                self.scenes += group
        self.features = torch.cat(tokens)

    def batch(self, examples, rng, num_scenes, questions=2, vary=True):
        """Return (model inputs, kinds) of ``questions`` questions on each of ``num_scenes``."""
        import torch

        encoded, kinds, features = [], [], []
        for index in rng.integers(len(self.scenes), size=num_scenes):
            for _ in range(questions):
                kind = scenes.KINDS[int(rng.choice(len(scenes.KINDS), p=KIND_PROBABILITIES))]
                qa = scenes.ask(self.scenes[index], kind, rng, ABSENT_DETECT_RATE)
                question = qa.question
                if vary and kind != 'detect':
                    question = _vary_question(question, rng)
                # libmtmd's tile and global image are the same picture, so the same tokens.
                mtmd_layout = bool(rng.random() < MTMD_LAYOUT_RATE)
                encoded.append(examples.encode(question, qa.answer, mtmd_layout))
                kinds.append(kind)
                features += [self.features[index]] * (2 if mtmd_layout else 1)
        return examples.collate(encoded, torch.cat(features)), kinds


def train_size(rng):
    """Return an image side for a training scene."""
    sides, weights = zip(*TRAIN_SIZES, strict=True)
    return int(rng.choice(sides, p=np.array(weights) / sum(weights)))


def draw_scenes(examples, rng, count, shape_counts=None):
    """
    Return ``count`` random scenes and their pixel_values [count, 3, H, W] (torch).

    ``shape_counts``: how often a scene holds 1, 2, ... shapes (default: equally often).
    """
    import torch

    sizes = [None] * count if shape_counts is None else \
        1 + rng.choice(len(shape_counts), count, p=np.array(shape_counts) / sum(shape_counts))
    drawn = [scenes.random_scene(rng, None if n is None else int(n)) for n in sizes]
    pixels = [examples.pixels(scenes.render(s, train_size(rng)))[0] for s in drawn]
    return drawn, torch.from_numpy(np.stack(pixels))


def image_tokens(model, pixels):
    """Return the connector's image tokens [N, 9, width] of ``pixels``."""
    inner = model.model
    return inner.connector(inner.vision_model(pixel_values=pixels).last_hidden_state)


def _word_ids(tokenizer, words, prefix=' '):
    """Return the single token id of each ``prefix + word`` (as it follows in the text)."""
    ids = []
    for word in words:
        encoded = tokenizer.encode(prefix + word, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f'{word!r} is not a single token of the trained tokenizer')
        ids.append(encoded[0])
    return ids


# Stage 1 loss weights: shapes are the slowest to learn, box coordinates the loudest loss.
SHAPE_WEIGHT = 3.0
COORDINATE_WEIGHT = 0.15
# Place words of each grid row and column (the centre cell has neither).
ROW_WORDS = ('top', None, 'bottom')
COLUMN_WORDS = ('left', None, 'right')


def cell_targets(scene):
    """
    Return stage 1's class targets per grid cell, row-major.

    Shape and colour classes (0: no shape), row and column word classes (0: none) and the
    four box coordinates' classes (-100 where the cell is empty).
    """
    shapes = np.zeros(9, dtype=np.int64)
    colours = np.zeros(9, dtype=np.int64)
    rows = np.full(9, -100, dtype=np.int64)
    columns = np.full(9, -100, dtype=np.int64)
    boxes = np.full((9, 4), -100, dtype=np.int64)
    names = list(scenes.COLOURS)
    for item in scene.items:
        cell = scenes.cell_of(item.centre)
        shapes[cell] = 1 + scenes.SHAPES.index(item.shape)
        colours[cell] = 1 + names.index(item.colour)
        # Class 0 is "no word" (the middle row or column), then the words in order.
        rows[cell] = (1, 0, 2)[cell // 3]
        columns[cell] = (1, 0, 2)[cell % 3]
        boxes[cell] = [scenes.NUMBER_TOKENS.index(scenes.coordinate(v)) for v in item.box]
    return shapes, colours, rows, columns, boxes


def _cosine_logits(tokens, rows, extra, temperature):
    """Return ``temperature`` x cosine of normalised ``tokens`` with each class row."""
    from torch.nn import functional
    import torch

    table = rows if extra is None else torch.cat([extra, rows])
    return temperature * tokens @ functional.normalize(table, dim=-1).T


def _soft_targets(classes, count, width=1.5):
    """Return Gaussian-smoothed one-hot rows over ``count`` ordered classes."""
    import torch

    grid = torch.arange(count, dtype=torch.float32)
    weights = torch.exp(-0.5 * ((grid[None, :] - classes[:, None].float()) / width) ** 2)
    return weights / weights.sum(-1, keepdim=True)


class VisionHeads:
    """Stage 1's read-outs of an image token, all against the language model's embeddings."""

    def __init__(self, model, tokenizer, temperature=20.0):
        """Look up the word and number tokens; make the learned extra rows and projections."""
        import torch

        self.embeddings = model.get_input_embeddings().weight
        width = self.embeddings.shape[1]
        self.temperature = temperature
        self.words = {
            'shape': torch.tensor(_word_ids(tokenizer, scenes.SHAPES)),
            'colour': torch.tensor(_word_ids(tokenizer, list(scenes.COLOURS))),
            'row': torch.tensor(_word_ids(tokenizer, [w for w in ROW_WORDS if w])),
            'column': torch.tensor(_word_ids(tokenizer, [w for w in COLUMN_WORDS if w])),
            'number': torch.tensor(_word_ids(tokenizer, scenes.NUMBER_TOKENS, prefix='')),
        }
        # "Nothing" directions: no shape, no colour, no row word, no column word.
        self.nothing = torch.nn.Parameter(torch.randn(4, width) * 0.02)
        # One map per box coordinate from the token to the number embeddings: the language
        # model's attention can learn the same maps to copy a coordinate out.
        self.coordinate_maps = torch.nn.Parameter(
            torch.eye(width).repeat(4, 1, 1) + torch.randn(4, width, width) * 0.02)

    def parameters(self):
        """Return the heads' own parameters."""
        return [self.nothing, self.coordinate_maps]

    def logits(self, name, tokens, extra):
        """Return the cosine logits of ``tokens`` against the words of ``name``."""
        rows = self.embeddings[self.words[name]]
        return _cosine_logits(tokens, rows, None if extra is None else self.nothing[extra],
                              self.temperature)

    def losses(self, tokens, targets):
        """Return (summed loss, per-cell all-right flags) of unit-norm ``tokens`` [N, width]."""
        import torch
        from torch.nn import functional

        shapes, colours, rows, columns, boxes = targets
        logits = {'shape': self.logits('shape', tokens, slice(0, 1)),
                  'colour': self.logits('colour', tokens, slice(1, 2)),
                  'row': self.logits('row', tokens, slice(2, 3)),
                  'column': self.logits('column', tokens, slice(3, 4))}
        loss = (SHAPE_WEIGHT * functional.cross_entropy(logits['shape'], shapes) +
                functional.cross_entropy(logits['colour'], colours) +
                functional.cross_entropy(logits['row'], rows, ignore_index=-100) +
                functional.cross_entropy(logits['column'], columns, ignore_index=-100))
        present = shapes > 0
        guess = {name: value.argmax(-1) for name, value in logits.items()}
        ok = (guess['shape'] == shapes) & (guess['colour'] == colours)
        ok &= (guess['row'] == rows) | (rows == -100)
        ok &= (guess['column'] == columns) | (columns == -100)
        close = torch.ones_like(ok)
        stats = {'shape': (guess['shape'] == shapes)[present].float().mean().item(),
                 'colour': (guess['colour'] == colours)[present].float().mean().item(),
                 'empty': (guess['shape'] == 0)[~present].float().mean().item()}
        errors = []
        if present.any():
            numbers = self.embeddings[self.words['number']]
            numbers = functional.normalize(numbers, dim=-1)
            for k in range(4):
                mapped = functional.normalize(tokens[present] @ self.coordinate_maps[k], dim=-1)
                coordinate = self.temperature * mapped @ numbers.T
                target = boxes[present, k]
                soft = _soft_targets(target, numbers.shape[0])
                log_p = functional.log_softmax(coordinate, -1)
                loss = loss + COORDINATE_WEIGHT * torch.sum(-soft * log_p, -1).mean()
                miss = (coordinate.argmax(-1) - target).abs()
                hit = torch.zeros_like(ok)
                hit[present] = miss <= 2
                close &= hit | ~present
                errors.append(miss.float().mean().item())
        stats['coordinate_error'] = float(np.mean(errors)) if errors else 0.0
        return loss, ok & close, stats


def pretrain_vision(model, examples, rng, steps, batch_size=32, lr=2e-3, weight_decay=0.05,
                    log_every=500, log=print):
    """
    Stage 1: make each image token read as the words and the box of its cell's object.

    A vision transformer learned from scratch picks up shapes slowly when its only signal
    comes through the language model.  Here each of the 9 connector outputs (one per cell of
    a 3 x 3 grid) is classified, by cosine similarity with the language model's own (tied)
    embeddings, as the shape, colour, row and column words of the object whose centre lies
    in its cell (or as a learned "nothing" direction), and, through one learned map per
    coordinate, as the number tokens of that object's box corners (smoothed over nearby
    values, so that close is nearly right).  The image tokens then arrive in the language
    model as sums of the words a question asks for, so stage 2 mostly has to learn to find
    the token that matches the question and copy a word or a coordinate out of it.
    """
    import torch

    inner = model.model
    if image_seq_len() != 9:
        raise ValueError('stage 1 expects 3 x 3 image tokens')
    heads = VisionHeads(model, examples.family.tokenizer)
    params = (list(inner.vision_model.parameters()) + list(inner.connector.parameters()) +
              [heads.embeddings] + heads.parameters())
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
            pixels.append(examples.pixels(scenes.render(scene, train_size(rng)))[0])
            targets.append(cell_targets(scene))
        pixels = torch.from_numpy(np.stack(pixels))
        targets = [torch.from_numpy(np.stack(t)).reshape(batch_size * 9, *t[0].shape[1:])
                   for t in zip(*targets, strict=True)]
        tokens = image_tokens(model, pixels)
        tokens = torch.nn.functional.normalize(tokens.reshape(-1, tokens.shape[-1]), dim=-1)
        loss, ok, stats = heads.losses(tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(dict(stats, all=ok.reshape(batch_size, -1).all(1).float().mean().item()))
        if (step + 1) % log_every == 0:
            means = {k: np.mean([r[k] for r in running]) for k in running[0]}
            log(f'vision step {step + 1}/{steps}  loss {loss.item():.4f}  ' +
                '  '.join(f'{k} {v:.3f}' for k, v in means.items()) +
                f'  {time.monotonic() - start:.0f} s')
            running = []
    return time.monotonic() - start


def answer_loss(model, batch, per_token=False):
    """
    Return (loss, per-example exact-match flags) over the answer tokens only.

    The loss is the mean over questions of each answer's mean token loss, or with
    ``per_token`` the mean over all answer tokens.  The first weighs a one-word answer like
    a 24-token box, which teaches the short answers fast but, where a short and a long
    answer begin at the same point (``none`` or a box), pulls the first token towards the
    short one; the second does not.
    """
    import torch
    from torch.nn import functional

    input_ids = batch['input_ids']
    embeds = model.get_input_embeddings()(input_ids)
    # The image tokens go in where the prompt's <image> placeholders are, as the model's own
    # forward would put them, from features computed once per scene.
    slots = (input_ids == model.config.image_token_id).unsqueeze(-1)
    features = batch['image_features'].reshape(-1, embeds.shape[-1])
    embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))
    out = model(inputs_embeds=embeds, attention_mask=batch['attention_mask'])
    logits = out.logits[:, :-1]
    labels = batch['labels'][:, 1:]
    mask = labels != -100
    ce = functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                  ignore_index=-100, reduction='none').view(labels.shape)
    if per_token:
        loss = (ce * mask).sum() / mask.sum()
    else:
        loss = ((ce * mask).sum(1) / mask.sum(1)).mean()
    with torch.no_grad():
        # All answer tokens argmax-correct under teacher forcing == greedy gives the answer.
        exact = ((logits.argmax(-1) == labels) | ~mask).all(1)
    return loss, exact


def _learning_rate(step, steps, peak, warmup):
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def validate(model, batches):
    """Return exact-match accuracy per question kind on fixed validation batches."""
    import torch

    hits = {k: [] for k in scenes.KINDS}
    model.eval()
    with torch.no_grad():
        for batch, kinds in batches:
            _, exact = answer_loss(model, batch)
            for kind, ok in zip(kinds, exact.tolist(), strict=True):
                hits[kind].append(ok)
    model.train()
    return {k: float(np.mean(v)) if v else float('nan') for k, v in hits.items()}


def train(model_dir, seed=0, steps=5000, batch_size=32, lr=1e-3, warmup=300,
          vision_steps=4000, pool_size=12000, cycles=3, weight_decay=0.05, threads=1,
          log_every=100, eval_every=500, log=print):
    """
    Build and train the model in ``model_dir`` (weights and configs saved there).

    Stage 1 pretrains the vision tower (``pretrain_vision``, ``vision_steps`` steps of 32
    images); stage 2 freezes it and trains the language model on questions about
    ``pool_size`` scenes (``answer_stage``: ``cycles`` cycles of ``steps`` steps of
    ``batch_size`` questions).  Returns a summary dict (steps, seconds, validation accuracies).
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
    params = sum(p.numel() for p in model.parameters())
    log(f'model: {params:,} parameters, vocabulary {ids["vocab_size"]}, '
        f'{image_seq_len()} image tokens')
    start = time.monotonic()
    vision_seconds = pretrain_vision(model, examples, scenes.scene_rng(seed, 6), vision_steps,
                                     weight_decay=weight_decay, log_every=log_every * 2,
                                     log=log)
    save_checkpoint(model, ids, model_dir)
    accuracy = answer_stage(model, ids, examples, model_dir, seed, range(cycles), steps,
                            batch_size, lr, warmup, pool_size, weight_decay, log_every,
                            eval_every, log)
    return {'steps': steps, 'cycles': cycles, 'batch_size': batch_size,
            'vision_steps': vision_steps, 'pool_size': pool_size,
            'seconds': round(time.monotonic() - start, 1),
            'vision_seconds': round(vision_seconds, 1), 'parameters': params,
            'validation': accuracy}


def answer_stage(model, ids, examples, model_dir, seed, cycles, steps, batch_size, lr, warmup,
                 pool_size, weight_decay, log_every=100, eval_every=500, log=print):
    """
    Stage 2: train the language model, vision frozen, for each cycle number in ``cycles``.

    Each cycle is a fresh AdamW with its own warm-up and cosine decay (a warm restart) and its
    own stream of questions, and ends by saving the checkpoint: a run stopped between cycles
    goes on exactly where it stopped (``resume``).  Returns the last validation accuracies.
    """
    import torch

    # The language model learns to read tokens that already name what is in each cell.
    for module in (model.model.vision_model, model.model.connector):
        module.requires_grad_(False)
    model.eval()
    start = time.monotonic()
    pool = ScenePool(model, examples, scenes.scene_rng(seed, 0), pool_size)
    val_pool = ScenePool(model, examples, scenes.scene_rng(seed, 5), 256)
    val_rng = scenes.scene_rng(seed, 7)
    val = [val_pool.batch(examples, val_rng, 32, vary=False) for _ in range(8)]
    log(f'scene pool: {pool_size} scenes in {time.monotonic() - start:.0f} s')
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    accuracy = {}
    for cycle in cycles:
        decay = [p for n, p in trainable if p.ndim >= 2]
        no_decay = [p for n, p in trainable if p.ndim < 2]
        optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                                       {'params': no_decay, 'weight_decay': 0.0}],
                                      lr=lr, betas=(0.9, 0.98), eps=1e-8)
        model.train()
        rng = scenes.scene_rng(seed, 8 + cycle)
        running, running_exact = [], []
        for step in range(steps):
            for group in optimizer.param_groups:
                group['lr'] = _learning_rate(step, steps, lr, warmup)
            batch, _ = pool.batch(examples, rng, batch_size // 2)
            # The first cycle weighs questions equally, the next ones tokens (answer_loss).
            loss, exact = answer_loss(model, batch, per_token=cycle > 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
            optimizer.step()
            running.append(loss.item())
            running_exact.append(exact.float().mean().item())
            if (step + 1) % log_every == 0:
                log(f'cycle {cycle + 1} step {step + 1}/{steps}  loss {np.mean(running):.4f}  '
                    f'exact {np.mean(running_exact):.3f}  {time.monotonic() - start:.0f} s')
                running, running_exact = [], []
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                accuracy = validate(model, val)
                log('validation: ' + '  '.join(f'{k} {v:.3f}' for k, v in accuracy.items()))
        model.eval()
        save_checkpoint(model, ids, model_dir)
        log(f'cycle {cycle + 1} saved')
    return accuracy


def resume(model_dir, first_cycle, seed=0, cycles=3, threads=2, **kwargs):
    """
    Go on with stage 2 of a run saved in ``model_dir`` after cycle ``first_cycle``.

    ``kwargs`` are ``answer_stage``'s, with the run's own settings.
    """
    from tokenizers import Tokenizer
    import torch
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(threads)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation='eager')
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, 'tokenizer.json'))
    ids = tiny_tokenizer.token_ids(tokenizer)
    return answer_stage(model, ids, Examples(model_dir), model_dir, seed,
                        range(first_cycle, cycles), **kwargs)


# Export and shipping ----------------------------------------------------------------------

def export(model_dir):
    """Export ONNX fp32 + int8, GGUF f16 + Q8_0 and the f16 mmproj; return their paths."""
    from .export_onnx import export_smolvlm_onnx
    from .gguf_export import export_mmproj_gguf, export_text_gguf

    written = dict(export_smolvlm_onnx(model_dir, quantize_int8=True))
    for ftype, rel in GGUF_FILES.items():
        path = os.path.join(model_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        export_text_gguf(model_dir, path, arch='llama', ftype=ftype,
                         name='vlm_ros-default-shapes')
        written[f'gguf_{ftype}'] = path
    # libmtmd resizes to the tile's side, as the processor does (preprocessor size).
    written['mmproj_f16'] = export_mmproj_gguf(model_dir, os.path.join(model_dir, MMPROJ_FILE),
                                               ftype='f16')
    return written


def shipped_files(model_dir):
    """Return the relative paths of the files a shipped folder must hold."""
    from .export_onnx import GRAPH_NAMES, INT8_SUFFIX

    files = list(CONFIG_FILES)
    files += [f'onnx/{name}.onnx' for name in GRAPH_NAMES]
    files += [f'onnx/{name}{INT8_SUFFIX}.onnx' for name in GRAPH_NAMES]
    files += list(GGUF_FILES.values()) + [MMPROJ_FILE]
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
    parser.add_argument('--vision-steps', type=int, default=4000, help='stage 1 steps')
    parser.add_argument('--steps', type=int, default=5000, help='stage 2 steps')
    parser.add_argument('--pool-size', type=int, default=12000, help='stage 2 scenes')
    parser.add_argument('--cycles', type=int, default=3, help='stage 2 cycles (warm restarts)')
    parser.add_argument('--batch-size', type=int, default=32)
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
                        lr=args.lr, vision_steps=args.vision_steps, pool_size=args.pool_size,
                        cycles=args.cycles, threads=args.threads,
                        log=lambda line: print(line, flush=True))
        print(f'trained in {summary["seconds"]:.0f} s', flush=True)
        export(work)
        info = {
            'source': 'tools/vlm_ros_tools/train_default.py (see MODEL_CARD.md)',
            'command': (f'python -m vlm_ros_tools.train_default --seed {args.seed} '
                        f'--vision-steps {args.vision_steps} --steps {args.steps} '
                        f'--pool-size {args.pool_size} --cycles {args.cycles} '
                        f'--batch-size {args.batch_size} --lr {args.lr} --threads {args.threads} '
                        f'--out {args.out}'),
            'seed': args.seed,
            'vision_steps': summary['vision_steps'],
            'steps': summary['steps'],
            'pool_size': summary['pool_size'],
            'cycles': summary['cycles'],
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

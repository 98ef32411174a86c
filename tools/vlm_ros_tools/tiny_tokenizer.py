"""
Build a tiny byte-level BPE tokenizer laid out like SmolVLM2's hub tokenizer files.

The real SmolVLM / SmolVLM2 tokenizers are SmolLM2's GPT-2 style byte-level BPE
(``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` at ids 0, 1, 2, digits split one by
one) followed by added special tokens: ``<global-img>``, the 36 ``<row_R_col_C>`` tile
markers, ``<fake_token_around_image>``, ``<image>``, reserved tokens and, last,
``<end_of_utterance>``.  This module trains a ~430 token version of that tokenizer on a
small built-in English text, locally and deterministically, and writes
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and
``chat_template.json`` the way the hub repositories do.
"""

import os

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, Tokenizer
from tokenizers import trainers

from . import hub_files

BOS_TOKEN = '<|im_start|>'
PAD_TOKEN = '<|im_end|>'
UNK_TOKEN = '<|endoftext|>'
END_OF_UTTERANCE_TOKEN = '<end_of_utterance>'
FAKE_IMAGE_TOKEN = '<fake_token_around_image>'
IMAGE_TOKEN = '<image>'
GLOBAL_IMAGE_TOKEN = '<global-img>'
EOS_TOKEN = END_OF_UTTERANCE_TOKEN

# Trained-in specials, in SmolLM2's order (ids 0, 1, 2).
BASE_SPECIAL_TOKENS = [UNK_TOKEN, BOS_TOKEN, PAD_TOKEN]
# Number of ``<|reserved_special_token_N|>`` between ``<image>`` and ``<end_of_utterance>``
# (the real tokenizer has 88; a few keep the layout without bloating the vocabulary).
NUM_RESERVED_TOKENS = 4
# Size of the trained part (base specials + 256 byte symbols + merges).
BASE_VOCAB_SIZE = 384

# SmolVLM2's chat template (also transformers' SmolVLM DEFAULT_CHAT_TEMPLATE).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}"
    "{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}{% endfor %}"
    '<end_of_utterance>\n{% endfor %}'
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

TRAINING_TEXT = """\
User: Describe this image. Assistant: The image shows a small red robot standing on a wooden
table next to a white cup of coffee. The background is a bright kitchen with a large window.
Sunlight falls across the table and the robot casts a long shadow to the left of the frame.
User: What is in the picture? Assistant: There is a dog sitting on green grass in a park.
The dog is brown and white, with a blue collar, and it is looking at the camera. Behind the
dog there are tall trees, a wooden bench and a path where two people are walking.
User: How many people are there? Assistant: I can see three people in the image: a man in a
black jacket, a woman with a yellow umbrella and a child holding a red balloon. They are
standing on a street corner in the rain, waiting to cross the road at a traffic light.
User: Can you read the sign? Assistant: The sign on the door says OPEN in large green letters.
Below it there is a smaller line of text with the opening hours, from 9 to 17 on weekdays
and from 10 to 14 on Saturday. The door is made of glass and has a metal handle.
User: Describe the scene. Assistant: This is a photo of a city street at night. The street
lights are on and there are many cars with their lights on. On the right side there is a
tall building with lit windows, and on the left side there is a small shop selling fruit.
User: What colour is the car? Assistant: The car in the center of the image is blue. There is
also a white van parked behind it and a black bicycle leaning against the wall of a house.
The road is wet and reflects the light of the shops and the signs above the doors.
User: Is there a person in the room? Assistant: No, the room is empty. It contains a bed with
a grey blanket, a desk with a laptop and a lamp, and a chair. There is a picture of the sea
on the wall and a plant in a pot on the floor near the window. The floor is made of wood.
User: What is the robot doing? Assistant: The robot is picking up a box from a shelf in a
warehouse. It has two arms and a camera on its head. Other boxes are stacked on the shelves
around it, and a yellow line on the floor marks the path where the robot can drive safely.
"""


def _added_tokens():
    """Return the added special tokens in the order SmolVLM2's tokenizer adds them."""
    tokens = [GLOBAL_IMAGE_TOKEN]
    tokens += [f'<row_{r}_col_{c}>' for r in range(1, 7) for c in range(1, 7)]
    tokens += [FAKE_IMAGE_TOKEN, IMAGE_TOKEN]
    tokens += [f'<|reserved_special_token_{i}|>' for i in range(NUM_RESERVED_TOKENS)]
    tokens.append(END_OF_UTTERANCE_TOKEN)
    return tokens


def train_byte_level_bpe(tokenizer, vocab_size, lines, special_tokens=(), added_tokens=()):
    """
    Train ``tokenizer`` (a byte-level BPE pipeline) on ``lines``; return it.

    ``special_tokens`` are trained in first (ids 0, 1, ...), ``added_tokens`` are added
    after the trained vocabulary; both are special and not normalised.
    """
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=_special(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(lines, trainer=trainer, length=len(lines))
    tokenizer.add_special_tokens(_special(added_tokens))
    return tokenizer


def _special(tokens):
    """Return ``tokens`` as special, not normalised ``AddedToken``s."""
    return [AddedToken(t, special=True, normalized=False) for t in tokens]


def training_lines():
    """Return the non-empty lines of the built-in ``TRAINING_TEXT``."""
    return [line for line in TRAINING_TEXT.splitlines() if line]


def build_tiny_tokenizer(base_vocab_size=BASE_VOCAB_SIZE, lines=None):
    """Train and return the tiny SmolVLM-style ``tokenizers.Tokenizer`` (on ``lines``)."""
    tokenizer = Tokenizer(models.BPE(fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    return train_byte_level_bpe(tokenizer, base_vocab_size,
                                training_lines() if lines is None else lines,
                                BASE_SPECIAL_TOKENS, _added_tokens())


def token_entry(content):
    """Return the serialised form of a special token as in the hub json files."""
    return {'content': content, 'lstrip': False, 'normalized': False,
            'rstrip': False, 'single_word': False}


# The benchmarks' padded tokenizer uses these two by their old names.
_token_entry = token_entry


def _write_json(path, data):
    """Write ``data`` as pretty-printed json, keys in their order (hub style)."""
    hub_files.write_json(path, data, sort_keys=False)


def added_tokens_decoder(tokenizer, tokens):
    """Return ``tokenizer_config.json``'s ``added_tokens_decoder`` entries of ``tokens``."""
    added = {}
    for token in tokens:
        entry = token_entry(token)
        entry['special'] = True
        added[str(tokenizer.token_to_id(token))] = entry
    return added


def tokenizer_config(tokenizer):
    """Return the ``tokenizer_config.json`` dict for ``tokenizer``."""
    return {
        'add_prefix_space': False,
        'added_tokens_decoder': added_tokens_decoder(tokenizer,
                                                     BASE_SPECIAL_TOKENS + _added_tokens()),
        'additional_special_tokens': [FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN],
        'bos_token': BOS_TOKEN,
        'clean_up_tokenization_spaces': False,
        'end_of_utterance_token': END_OF_UTTERANCE_TOKEN,
        'eos_token': EOS_TOKEN,
        'extra_special_tokens': {
            'end_of_utterance_token': END_OF_UTTERANCE_TOKEN,
            'fake_image_token': FAKE_IMAGE_TOKEN,
            'global_image_token': GLOBAL_IMAGE_TOKEN,
            'image_token': IMAGE_TOKEN,
        },
        'fake_image_token': FAKE_IMAGE_TOKEN,
        'global_image_token': GLOBAL_IMAGE_TOKEN,
        'image_token': IMAGE_TOKEN,
        'legacy': False,
        'model_max_length': 8192,
        'pad_token': PAD_TOKEN,
        'processor_class': 'SmolVLMProcessor',
        'tokenizer_class': 'PreTrainedTokenizerFast',
        'truncation_side': 'left',
        'unk_token': UNK_TOKEN,
        'vocab_size': tokenizer.get_vocab_size(with_added_tokens=False),
    }


def special_tokens_map():
    """Return the ``special_tokens_map.json`` dict."""
    return {
        'additional_special_tokens': [
            token_entry(t) for t in (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN)],
        'bos_token': token_entry(BOS_TOKEN),
        'eos_token': token_entry(EOS_TOKEN),
        'pad_token': token_entry(PAD_TOKEN),
        'unk_token': token_entry(UNK_TOKEN),
    }


def token_ids(tokenizer):
    """Return the ids of the special tokens the model config needs."""
    return {
        'bos_token_id': tokenizer.token_to_id(BOS_TOKEN),
        'eos_token_id': tokenizer.token_to_id(EOS_TOKEN),
        'pad_token_id': tokenizer.token_to_id(PAD_TOKEN),
        'im_end_token_id': tokenizer.token_to_id(PAD_TOKEN),
        'image_token_id': tokenizer.token_to_id(IMAGE_TOKEN),
        'vocab_size': tokenizer.get_vocab_size(with_added_tokens=True),
    }


def write_tokenizer_files(out_dir, tokenizer, config, special_tokens, chat_template,
                          sort_keys=False):
    """
    Write ``tokenizer.json`` and the three json files a hub tokenizer comes with.

    ``config`` and ``special_tokens`` are the ``tokenizer_config.json`` and
    ``special_tokens_map.json`` dicts; ``sort_keys`` sorts their keys on writing.
    """
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, 'tokenizer.json'))
    for name, data in (('tokenizer_config.json', config),
                       ('special_tokens_map.json', special_tokens),
                       ('chat_template.json', {'chat_template': chat_template})):
        hub_files.write_json(os.path.join(out_dir, name), data, sort_keys=sort_keys)


def write_tiny_tokenizer(out_dir, tokenizer=None, sort_keys=False, chat_template=CHAT_TEMPLATE):
    """
    Write the tokenizer files into ``out_dir``; return the special token ids.

    ``tokenizer`` is ``build_tiny_tokenizer()``'s unless given (one trained on other text);
    ``sort_keys`` sorts the json files' keys (as the default model's shipped files have them).
    """
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer()
    write_tokenizer_files(out_dir, tokenizer, tokenizer_config(tokenizer), special_tokens_map(),
                          chat_template, sort_keys)
    return token_ids(tokenizer)

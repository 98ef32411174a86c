"""
A family for llama.cpp multimodal GGUFs, which carry their own tokenizer and chat template.

The ggml-org releases ship a model GGUF and an mmproj GGUF but no Hugging Face config files:
the prompt is rendered with the chat template stored in the GGUF (or, when it has none, the
fallback template the registered family declares), then laid out around the images and
tokenized by the vision stage (libmtmd), and the answer is detokenized by the GGUF's own
vocabulary. That vocabulary comes in as an object with ``detokenize`` and
``eog_token_ids`` (the llama.cpp decoder has both), so this module imports no runtime.
"""

from typing import Protocol, Sequence

import numpy as np

from vlm_ros.engine.chat_template import build_messages, ChatTemplate
from vlm_ros.engine.datatypes import PreparedRequest
from vlm_ros.engine.families.base import conversation, decode_keeping, ModelFamily
from vlm_ros.engine.gguf_file import read_metadata

IMAGE_PLACEHOLDER = '<image>'
"""What the rendered prompt holds for each image, for the vision stage to replace."""


class Vocabulary(Protocol):
    """What this family needs of the GGUF's tokenizer (a ``LlamaCppDecoder`` provides it)."""

    context_length: int
    hidden_size: int

    def detokenize(self, token_ids: Sequence[int], unparse_special: bool = True) -> str:
        """Text of ``token_ids``."""

    def eog_token_ids(self) -> Sequence[int]:
        """Ids that end generation."""

    def tokenize(self, text: str) -> Sequence[int]:
        """Token ids of ``text``, special tokens parsed."""


class GgufChatFamily(ModelFamily):
    """Prompt layout from a GGUF's metadata; image tokens are laid out later by libmtmd."""

    def __init__(self, gguf_path, vocabulary: Vocabulary, info):
        self.name = f'{info.key} (GGUF)'
        self.info = info  # answers as the registered family does (e.g. its box format)
        self.vocabulary = vocabulary
        meta = read_metadata(gguf_path, ('tokenizer.chat_template',
                                         'tokenizer.ggml.bos_token_id',
                                         'tokenizer.ggml.eos_token_id'))
        source = meta.get('tokenizer.chat_template') or info.fallback_chat_template
        special = {}
        for key, name in (('tokenizer.ggml.bos_token_id', 'bos_token'),
                          ('tokenizer.ggml.eos_token_id', 'eos_token')):
            if meta.get(key) is not None:
                special[name] = vocabulary.detokenize([int(meta[key])])
        self.chat_template = ChatTemplate(source, special)
        self.eos_token_ids = list(vocabulary.eog_token_ids())
        self.context_length = vocabulary.context_length
        self.text_hidden_size = vocabulary.hidden_size
        self._kept = {}
        for marker in getattr(info, 'grounding_tokens', ()):
            ids = vocabulary.tokenize(marker)
            if len(ids) == 1:
                self._kept[ids[0]] = marker

    def prepare(self, images, prompt, system_prompt='', image_options=None,
                history=(), skip=()) -> PreparedRequest:
        """Render the prompt with one ``<image>`` per image; libmtmd lays them out."""
        rgbs, turns = conversation(images, history)
        current = len(rgbs) - sum(n for _, n in turns)
        text = self.chat_template.render(build_messages(prompt, system_prompt, current, turns))
        return PreparedRequest(np.zeros(0, dtype=np.int64), prompt_text=text, images=rgbs)

    def decode(self, token_ids, skip_special_tokens=True) -> str:
        """
        Detokenize with llama.cpp's vocabulary, dropping end-of-generation tokens.

        Skipping special tokens keeps the family's grounding markers (``info.
        grounding_tokens``: Qwen2-VL writes its boxes with them).
        """
        eog = set(self.eos_token_ids)
        ids = [t for t in token_ids if t not in eog] if skip_special_tokens else token_ids
        if not skip_special_tokens or not self._kept:
            return self.vocabulary.detokenize(ids, unparse_special=not skip_special_tokens)
        return decode_keeping(ids, self._kept,
                              lambda run: self.vocabulary.detokenize(run, unparse_special=False))

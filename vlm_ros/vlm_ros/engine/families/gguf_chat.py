"""
A family for llama.cpp multimodal GGUFs, which carry their own tokenizer and chat template.

The ggml-org releases ship a model GGUF and an mmproj GGUF but no Hugging Face config files:
the prompt is rendered with the chat template stored in the GGUF (or, when it has none, the
family's template below), tokenized and laid out around the image by libmtmd, and the
answer is detokenized by llama.cpp.
"""

import numpy as np

from vlm_ros.engine.chat_template import build_messages, ChatTemplate
from vlm_ros.engine.families.base import ModelFamily, PreparedRequest
from vlm_ros.engine.runtimes.gguf_file import read_metadata

IMAGE_PLACEHOLDER = '<image>'

# Written for this project to reproduce what each family's published template renders, for
# GGUFs converted without one.
FALLBACK_TEMPLATES = {
    'smolvlm': (
        "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
        "{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
        "{% for part in message['content'] %}{% if part['type'] == 'text' %}"
        "{{ part['text'] }}{% else %}<image>{% endif %}{% endfor %}<end_of_utterance>\n"
        '{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}'),
    'internvl': (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for part in message['content'] %}{% if part['type'] == 'text' %}"
        "{{ part['text'] }}{% else %}<image>\n{% endif %}{% endfor %}<|im_end|>\n"
        '{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}'),
}


class GgufChatFamily(ModelFamily):
    """Prompt layout from a GGUF's metadata; image tokens are laid out later by libmtmd."""

    def __init__(self, gguf_path, decoder, family='smolvlm'):
        self.name = f'{family} (GGUF)'
        self.decoder = decoder
        meta = read_metadata(gguf_path, ('tokenizer.chat_template',
                                         'tokenizer.ggml.bos_token_id',
                                         'tokenizer.ggml.eos_token_id'))
        source = meta.get('tokenizer.chat_template') or FALLBACK_TEMPLATES[family]
        special = {}
        for key, name in (('tokenizer.ggml.bos_token_id', 'bos_token'),
                          ('tokenizer.ggml.eos_token_id', 'eos_token')):
            if meta.get(key) is not None:
                special[name] = decoder.detokenize([int(meta[key])])
        self.chat_template = ChatTemplate(source, special)
        self.eos_token_ids = decoder.eog_token_ids()
        self.context_length = decoder.context_length
        self.text_hidden_size = decoder.hidden_size

    def prepare(self, image, prompt, system_prompt='', image_options=None) -> PreparedRequest:
        """Render the prompt; the image goes to libmtmd with it (see MtmdVision)."""
        text = self.chat_template.render(
            build_messages(prompt, system_prompt, 0 if image is None else 1))
        vision = {} if image is None else {'image': image}
        return PreparedRequest(np.zeros(0, dtype=np.int64), vision, None, 0, text)

    def decode(self, token_ids, skip_special_tokens=True) -> str:
        """Detokenize with llama.cpp's vocabulary, dropping end-of-generation tokens."""
        eog = set(self.eos_token_ids)
        ids = [t for t in token_ids if t not in eog] if skip_special_tokens else token_ids
        return self.decoder.detokenize(ids, unparse_special=not skip_special_tokens)

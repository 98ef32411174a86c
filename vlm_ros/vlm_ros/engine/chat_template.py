"""
A model's own chat template, found and rendered the way transformers does.

The Jinja environment copies ``transformers.utils.chat_template_utils``: a sandbox,
``trim_blocks`` and ``lstrip_blocks``, the loop-control extension, ``raise_exception``,
``strftime_now``, a ``tojson`` that does not escape HTML, and a ``{% generation %}`` tag that
simply renders its body. The special tokens (``bos_token``, ``eos_token``, ...) are passed as
template variables, as transformers' ``apply_chat_template`` passes its tokenizer's
``special_tokens_map``.

User text can be marked (``mark_control_tokens``) so that special-token strings typed by a
user are later encoded as plain text rather than as control tokens; this is transformers'
``sanitize_control_tokens`` scheme with the same private-use marker characters.
"""

from datetime import datetime
import json
import pathlib
import re
from typing import Dict, List, Optional, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vlm_ros.engine.errors import ModelFilesError, UnsupportedModelError
from vlm_ros.engine.model_files import load_json

CONTROL_START = '\U000f0000'
CONTROL_END = '\U000f0001'


def load_chat_template(model_dir) -> str:
    """
    Return the chat template of ``model_dir``, looked up as a transformers processor does.

    Order: ``processor_config.json``'s ``chat_template``, the legacy ``chat_template.json``,
    ``chat_template.jinja``, then ``tokenizer_config.json``'s ``chat_template`` (a string, or
    a list of named templates of which ``default`` is used).
    """
    model_dir = pathlib.Path(model_dir)
    template = load_json(model_dir, 'processor_config.json', required=False).get('chat_template')
    if template is None:
        template = load_json(model_dir, 'chat_template.json', required=False).get(
            'chat_template')
    if template is None and (model_dir / 'chat_template.jinja').is_file():
        template = (model_dir / 'chat_template.jinja').read_text(encoding='utf-8')
    if template is None:
        template = load_json(model_dir, 'tokenizer_config.json', required=False).get(
            'chat_template')
    if isinstance(template, list):
        named = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
        template = named.get('default')
    if isinstance(template, dict):
        template = template.get('default')
    if not isinstance(template, str) or not template:
        raise ModelFilesError(f'no chat template in {model_dir} (looked in '
                              'processor_config.json, chat_template.json, chat_template.jinja '
                              'and tokenizer_config.json)')
    return template


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}``: renders the body (assistant-mask marker)."""

    tags = {'generation'}

    def parse(self, parser):
        """Parse the block and return it as a plain call of its body."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
        return nodes.CallBlock(self.call_method('_render'), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing underscore names (transformers' sandbox hardening)."""

    def __init__(self, *args, **kwargs):
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith('_'):
            raise jinja2.exceptions.SecurityError(
                f'chat templates cannot store underscore-prefixed attributes ({name!r})')


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _make_dict(*args, **kwargs):
    return dict(*args, **kwargs)


def compile_template(source: str) -> jinja2.Template:
    """Compile ``source`` in transformers' chat-template environment."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, 'jinja2.ext.loopcontrols'])
    env.filters['tojson'] = _tojson
    env.globals['raise_exception'] = _raise_exception
    env.globals['strftime_now'] = _strftime_now
    env.globals['dict'] = _make_dict
    env.globals['namespace'] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as exc:
        raise ModelFilesError(f'the chat template does not compile: {exc}') from exc


def build_messages(prompt: str, system_prompt: str = '', num_images: int = 0,
                   turns: Sequence = ()) -> List[Dict]:
    """
    Return a conversation in transformers' content-list form.

    ``turns`` are earlier turns, alternating user and assistant, oldest first: each a string
    or ``(text, image_count)``. Images come first in their user turn, as in the model cards'
    examples; the last user turn has ``num_images`` of them and ``prompt``. A system turn is
    added only when ``system_prompt`` is not empty.
    """
    messages = []
    if system_prompt:
        messages.append({'role': 'system',
                         'content': [{'type': 'text', 'text': system_prompt}]})
    for i, turn in enumerate(turns):
        text, count = (turn, 0) if isinstance(turn, str) else turn
        content = [{'type': 'image'} for _ in range(count)]
        content.append({'type': 'text', 'text': text})
        messages.append({'role': 'user' if i % 2 == 0 else 'assistant', 'content': content})
    content = [{'type': 'image'} for _ in range(num_images)]
    content.append({'type': 'text', 'text': prompt})
    messages.append({'role': 'user', 'content': content})
    return messages


def control_token_pattern(tokens: Sequence[str]) -> Optional['re.Pattern']:
    """Return a regex matching any of ``tokens`` (longest first), or None when empty."""
    tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
    if not tokens:
        return None
    return re.compile('|'.join(map(re.escape, tokens)))


def mark_control_tokens(value, pattern):
    """
    Wrap control tokens in the strings of ``value`` (str, list or dict) with private markers.

    Markers already present are removed first, so user text cannot forge a marked token.
    """
    if isinstance(value, str):
        value = value.replace(CONTROL_START, '').replace(CONTROL_END, '')
        if pattern is None:
            return value
        return pattern.sub(lambda m: CONTROL_START + m.group(0) + CONTROL_END, value)
    if isinstance(value, dict):
        return {key: mark_control_tokens(item, pattern) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [mark_control_tokens(item, pattern) for item in value]
    return value


class ChatTemplate:
    """A compiled chat template plus the special-token variables transformers passes it."""

    def __init__(self, source: str, special_tokens: Optional[Dict[str, str]] = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = compile_template(source)

    @classmethod
    def from_model_dir(cls, model_dir, special_tokens=None) -> 'ChatTemplate':
        """Load the template of ``model_dir`` (see ``load_chat_template``)."""
        return cls(load_chat_template(model_dir), special_tokens)

    def render(self, messages, add_generation_prompt=True, **kwargs) -> str:
        """Render ``messages``; extra keyword arguments become template variables."""
        variables = {**self.special_tokens, **kwargs}
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **variables)
        except jinja2.exceptions.TemplateError as exc:
            # e.g. a template that rejects a system turn: an option this model cannot take.
            raise UnsupportedModelError(f'the chat template refused the conversation: {exc}') \
                from exc

"""
The model's ``tokenizer.json`` through the ``tokenizers`` library, set up as transformers does.

transformers (v5, ``TokenizersBackend``) loads ``tokenizer.json`` with its own
post-processor (``add_bos_token`` / ``add_eos_token`` in ``tokenizer_config.json`` are
ignored when ``tokenizer.json`` exists), adds the named and extra special tokens the
vocabulary lacks, and honours ``split_special_tokens`` and ``clean_up_tokenization_spaces``
(the latter never for BPE). The same steps here give the same ids and text without
transformers. (Tokenizer classes with their own ``__init__``, e.g. ``LlamaTokenizer``, can
rebuild parts of the pipeline in transformers; SmolVLM's generic class does not.)
"""

import functools
import pathlib
import re
from typing import Dict, Iterable, List, Optional

from tokenizers import AddedToken
from tokenizers import Tokenizer as _RustTokenizer

from vlm_ros.engine.chat_template import CONTROL_END, CONTROL_START, control_token_pattern
from vlm_ros.engine.errors import ModelFilesError, UnsupportedModelError
from vlm_ros.engine.model_files import load_json

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names a chat template receives.
SPECIAL_TOKEN_NAMES = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token',
                       'cls_token', 'mask_token')


def _token_text(value) -> Optional[str]:
    """Return the string of a token given as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get('content')
    return value if isinstance(value, str) and value else None


def _clean_up_tokenization(text):
    """Apply transformers' ``clean_up_tokenization`` (spaces before punctuation, ...)."""
    for before, after in ((' .', '.'), (' ?', '?'), (' !', '!'), (' ,', ','), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text


class Tokenizer:
    """Encode and decode with a model's tokenizer files, as transformers would."""

    def __init__(self, model_dir):
        self.model_dir = pathlib.Path(model_dir)
        path = self.model_dir / 'tokenizer.json'
        if not path.is_file():
            raise ModelFilesError(f'tokenizer.json not found in {model_dir}')
        try:
            self._source = path.read_text(encoding='utf-8')
            self._tok = _RustTokenizer.from_str(self._source)
        except Exception as exc:  # noqa: B902 - tokenizers raises a bare Exception
            raise ModelFilesError(f'cannot load {path}: {exc}') from exc
        self.config = load_json(self.model_dir, 'tokenizer_config.json', required=False)
        token_map = load_json(self.model_dir, 'special_tokens_map.json', required=False)
        self.special_tokens: Dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(self.config.get(name)) or _token_text(token_map.get(name))
            if text is not None:
                self.special_tokens[name] = text
        extra = self.config.get('extra_special_tokens')
        self.extra_special_tokens: Dict[str, str] = {}
        if isinstance(extra, dict):
            self.extra_special_tokens = {k: t for k, t in
                                         ((k, _token_text(v)) for k, v in extra.items()) if t}
        self._add_missing_special_tokens(extra, token_map)
        self._tok.encode_special_tokens = bool(self.config.get('split_special_tokens', False))
        is_bpe = type(self._tok.model).__name__ == 'BPE'
        self.clean_up_tokenization_spaces = bool(
            self.config.get('clean_up_tokenization_spaces', False)) and (
            not is_bpe or bool(self.config.get(
                'clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output')))

    def _add_missing_special_tokens(self, extra, token_map):
        """Add named / extra special tokens the vocabulary lacks (transformers does too)."""
        wanted = list(self.special_tokens.values())
        if isinstance(extra, dict):
            wanted += list(self.extra_special_tokens.values())
        elif isinstance(extra, list):
            wanted += [t for t in map(_token_text, extra) if t]
        additional = self.config.get('additional_special_tokens',
                                     token_map.get('additional_special_tokens', []))
        if isinstance(additional, list):
            wanted += [t for t in map(_token_text, additional) if t]
        missing = [t for t in dict.fromkeys(wanted) if self._tok.token_to_id(t) is None]
        if missing:
            self._tok.add_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in missing])

    @property
    def bos_token(self) -> Optional[str]:
        """Return the beginning-of-sequence token string, if the tokenizer has one."""
        return self.special_tokens.get('bos_token')

    @property
    def eos_token(self) -> Optional[str]:
        """Return the end-of-sequence token string, if the tokenizer has one."""
        return self.special_tokens.get('eos_token')

    @property
    def vocab_size(self) -> int:
        """Return the number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def config_token(self, name, default=None) -> Optional[str]:
        """Return a named token of tokenizer_config.json (top level or extra_special_tokens)."""
        return (_token_text(self.config.get(name)) or self.extra_special_tokens.get(name)
                or default)

    def added_tokens(self) -> List[str]:
        """Return the strings of every added token (special or not)."""
        return [t.content for t in self._tok.get_added_tokens_decoder().values()]

    def control_tokens(self, chat_template: str = '') -> List[str]:
        """
        Return the tokens user text must not be able to produce (transformers' choice).

        Every special added token, plus the non-special added tokens that the chat template
        writes (whitespace tokens excepted).
        """
        return [t.content for t in self._tok.get_added_tokens_decoder().values()
                if t.special or (t.content in chat_template and not t.content.isspace())]

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of ``token``, or None if the vocabulary lacks it."""
        return self._tok.token_to_id(token)

    def _adds_special_tokens(self, text, add_special_tokens):
        if add_special_tokens is None:
            # transformers' apply_chat_template(tokenize=True) rule: a prompt that already
            # starts with BOS gets no more special tokens.
            return not (self.bos_token and text.startswith(self.bos_token))
        return bool(add_special_tokens)

    def encode(self, text: str, add_special_tokens: Optional[bool] = None) -> List[int]:
        """
        Encode ``text`` to ids; special-token strings in it become their ids.

        ``add_special_tokens`` None: the post-processor's BOS/EOS are added unless the text
        already starts with the BOS token (transformers' rule for rendered chat prompts).
        """
        add = self._adds_special_tokens(text, add_special_tokens)
        return self._tok.encode(text, add_special_tokens=add).ids

    @functools.cached_property
    def _plain(self):
        """Return a second backend that encodes special-token strings as plain text."""
        tok = _RustTokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = True
        return tok

    @functools.cached_property
    def _marker_pattern(self):
        tokens = control_token_pattern(self.added_tokens())
        alternation = tokens.pattern if tokens is not None else '(?!)'
        return re.compile(f'{CONTROL_START}({alternation}){CONTROL_END}|'
                          f'[{CONTROL_START}{CONTROL_END}]')

    def encode_marked(self, text: str, add_special_tokens: Optional[bool] = None) -> List[int]:
        """
        Encode a prompt rendered from user text marked by ``mark_control_tokens``.

        Marked tokens are encoded as plain text, the template's own tokens as control tokens
        (transformers' ``sanitize_control_tokens``). Without markers this is ``encode``.
        """
        if CONTROL_START not in text and CONTROL_END not in text:
            return self.encode(text, add_special_tokens)
        clean = self._marker_pattern.sub(lambda m: m.group(1) or '', text)
        if self._adds_special_tokens(clean, add_special_tokens) and \
                self._tok.post_processor is not None and \
                self._tok.post_processor.num_special_tokens_to_add(False):
            raise UnsupportedModelError(
                'cannot encode user text holding special tokens as plain text: the tokenizer '
                'adds BOS/EOS itself and the chat template does not write them')
        pieces = self._marker_pattern.split(text)
        newline = self._tok.encode('\n', add_special_tokens=False).ids
        ids = self._tok.encode(pieces[0], add_special_tokens=False).ids
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            encode = self._plain.encode if i % 2 else self._tok.encode
            # Encoded after a newline so SentencePiece adds no word-start space (as transformers).
            piece_ids = encode('\n' + piece, add_special_tokens=False).ids
            if piece_ids[:len(newline)] == newline:
                piece_ids = piece_ids[len(newline):]
            else:
                piece_ids = encode(piece, add_special_tokens=False).ids
            ids += piece_ids
        return ids

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Turn ids into text (special tokens dropped unless ``skip_special_tokens`` is False)."""
        text = self._tok.decode([int(t) for t in token_ids],
                                skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

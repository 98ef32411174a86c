"""
An OpenAI chat completions request, checked and turned into one engine call.

The engine answers one user turn about its images, after a system prompt and earlier turns
given as text (``history``). So: leading system (or developer) messages become the system
prompt; consecutive messages of one role are joined into one turn; the conversation must
start and end with the user; images may appear only in the last user turn, because earlier
turns reach the model as text. Sampling settings map onto the engine's names and are checked
against the engine's own limits, with the API's field names in the messages.
"""

from dataclasses import dataclass, field
import numbers
from typing import Any, Dict, List, Optional, Tuple

from vlm_ros.engine.datatypes import GENERATION_LIMITS
from vlm_ros.serve.api_errors import ApiError, bad_request, NOT_FOUND
from vlm_ros.serve.image_sources import ImageRef

SYSTEM_ROLES = ('system', 'developer')
# API field -> engine setting, in order of precedence (max_completion_tokens replaces the
# deprecated max_tokens; repeat_penalty is llama.cpp's name, which RemoteClient also sends).
INT_SETTINGS: Tuple[Tuple[str, str], ...] = (
    ('max_completion_tokens', 'max_new_tokens'), ('max_tokens', 'max_new_tokens'),
    ('min_tokens', 'min_new_tokens'), ('top_k', 'top_k'), ('seed', 'seed'))
FLOAT_SETTINGS: Tuple[Tuple[str, str], ...] = (
    ('temperature', 'temperature'), ('top_p', 'top_p'),
    ('repetition_penalty', 'repetition_penalty'), ('repeat_penalty', 'repetition_penalty'))
# Fields this server cannot honour: refused unless they hold their "off" value, so a client
# never silently gets something other than what it asked for.
UNSUPPORTED = {
    'n': (1,), 'frequency_penalty': (0, 0.0), 'presence_penalty': (0, 0.0),
    'logprobs': (False,), 'top_logprobs': (0,), 'logit_bias': ({},), 'tools': ([],),
    'functions': ([],), 'tool_choice': ('none', 'auto'), 'audio': (),
    'modalities': (['text'],), 'prediction': (), 'best_of': (1,), 'use_beam_search': (False,),
}


@dataclass
class ChatRequest:
    """One checked request: what the engine answers and how the reply is sent."""

    prompt: str
    system_prompt: str = ''
    history: List[str] = field(default_factory=list)
    images: List[ImageRef] = field(default_factory=list)
    settings: Dict[str, Any] = field(default_factory=dict)
    """Engine overrides (``Answerer.generate`` keyword arguments); absent: server default."""
    stream: bool = False
    include_usage: bool = False


def parse(body: Any, served_model: str, default_system_prompt: str = '') -> ChatRequest:
    """Check ``body`` and return the ChatRequest; raise ApiError (400, 404) naming the field."""
    if not isinstance(body, dict):
        raise bad_request('the request body must be a JSON object')
    check_model(body.get('model'), served_model)
    for name, allowed in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value not in allowed:
            raise bad_request(f'{name}={value!r} is not supported by this server',
                              name, 'unsupported_parameter')
    response_format = body.get('response_format')
    if response_format is not None and \
            (not isinstance(response_format, dict) or response_format.get('type') != 'text'):
        raise bad_request('response_format other than {"type": "text"} is not supported by '
                          'this server', 'response_format', 'unsupported_parameter')
    system, turns = _conversation(body.get('messages'))
    last = turns[-1]
    for turn in turns[:-1]:
        if turn.images:
            raise bad_request(
                f'{turn.images[0].where} is an image in an earlier turn: this server accepts '
                'images only in the last user message (earlier turns reach the model as text '
                'only); move the image to the last message or drop it', 'messages',
                'image_in_earlier_turn')
    stream = _flag(body, 'stream')
    options = body.get('stream_options') or {}
    if not isinstance(options, dict):
        raise bad_request('stream_options must be an object', 'stream_options')
    return ChatRequest(
        prompt=last.text, system_prompt=system if system is not None else default_system_prompt,
        history=[t.text for t in turns[:-1]], images=list(last.images),
        settings=settings_of(body), stream=stream,
        include_usage=stream and _flag(options, 'include_usage', 'stream_options.'))


def check_model(model, served_model):
    """Raise 400 without a model name, 404 for one this server does not serve."""
    if model is None or model == '':
        raise bad_request(f'model is required: this server serves {served_model!r}', 'model',
                          'missing_model')
    if not isinstance(model, str):
        raise bad_request(f'model must be a string, got {model!r}', 'model')
    if model != served_model:
        raise ApiError(404, f'the model {model!r} does not exist: this server serves '
                       f'{served_model!r}', NOT_FOUND, 'model', 'model_not_found')


def settings_of(body) -> Dict[str, Any]:
    """Map the sampling fields onto engine settings, checked against the engine's limits."""
    settings: Dict[str, Any] = {}
    for api, engine in INT_SETTINGS:
        value = body.get(api)
        if value is None or engine in settings:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f'{api} must be an integer, got {value!r}', api)
        if api == 'top_k' and value == -1:
            value = 0  # vLLM's "off"
        settings[engine] = _checked(api, engine, value)
    for api, engine in FLOAT_SETTINGS:
        value = body.get(api)
        if value is None or engine in settings:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad_request(f'{api} must be a number, got {value!r}', api)
        settings[engine] = _checked(api, engine, float(value))
    stop = body.get('stop')
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise bad_request('stop must be a non-empty string or a list of them, got '
                              f'{stop!r}', 'stop')
        settings['stop'] = tuple(stops)
    if body.get('ignore_eos') is not None:
        settings['ignore_eos'] = _flag(body, 'ignore_eos')
    return settings


def _checked(api, engine, value):
    reason = GENERATION_LIMITS[engine].check(api, value)
    if reason:
        raise bad_request(reason, api, 'invalid_value')
    return value


def _flag(body, name, prefix=''):
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f'{prefix}{name} must be true or false, got {value!r}',
                          prefix + name)
    return value


@dataclass
class _Turn:
    role: str
    text: str
    images: List[ImageRef]


def _conversation(messages) -> Tuple[Optional[str], List[_Turn]]:
    """Return the system prompt (None: no system message) and the turns, checked."""
    if not isinstance(messages, list) or not messages:
        raise bad_request('messages must be a non-empty list of chat messages', 'messages')
    system: List[str] = []
    turns: List[_Turn] = []
    for i, message in enumerate(messages):
        where = f'messages[{i}]'
        if not isinstance(message, dict):
            raise bad_request(f'{where} must be an object with role and content', 'messages')
        role = message.get('role')
        if role in ('tool', 'function') or message.get('tool_calls') or \
                message.get('function_call'):
            raise bad_request(f'{where}: tool and function calls are not supported by this '
                              'server', 'messages', 'unsupported_parameter')
        if role not in SYSTEM_ROLES + ('user', 'assistant'):
            raise bad_request(f'{where}: unknown role {role!r} (expected system, developer, '
                              'user or assistant)', 'messages')
        text, images = _content(message.get('content'), where, role)
        if role in SYSTEM_ROLES:
            if turns:
                raise bad_request(f'{where}: system messages must come before the '
                                  'conversation, not between its turns', 'messages')
            system.append(text)
        elif turns and turns[-1].role == role:
            # Two messages of one role in a row are one turn to the model.
            turns[-1].text = '\n'.join(t for t in (turns[-1].text, text) if t)
            turns[-1].images.extend(images)
        else:
            turns.append(_Turn(role, text, images))
    if not turns or turns[0].role != 'user':
        raise bad_request('the conversation must start with a user message (after any system '
                          'messages)', 'messages')
    if turns[-1].role != 'user':
        raise bad_request('the last message must be from the user: it is the one answered',
                          'messages')
    return ('\n'.join(system) if system else None), turns


def _content(content, where, role) -> Tuple[str, List[ImageRef]]:
    """Return the text and image references of one message's content."""
    if content is None:
        if role == 'assistant':
            return '', []
        raise bad_request(f'{where}: content is required', 'messages')
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad_request(f'{where}.content must be a string or a list of parts', 'messages')
    texts: List[str] = []
    images: List[ImageRef] = []
    for j, part in enumerate(content):
        at = f'{where}.content[{j}]'
        kind = part.get('type') if isinstance(part, dict) else None
        if kind == 'text':
            text = part.get('text')
            if not isinstance(text, str):
                raise bad_request(f'{at}: a text part needs a string "text"', 'messages')
            texts.append(text)
        elif kind == 'image_url':
            if role != 'user':
                raise bad_request(f'{at}: images are accepted in user messages only',
                                  'messages')
            image = part.get('image_url')
            url = image.get('url') if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise bad_request(f'{at}: an image_url part needs {{"url": "data:..."}}',
                                  'messages')
            images.append(ImageRef(url, at))
        elif kind == 'refusal' and role == 'assistant':
            continue
        else:
            raise bad_request(f'{at}: content part type {kind!r} is not supported (text and '
                              'image_url are)', 'messages', 'unsupported_content')
    return '\n'.join(texts), images

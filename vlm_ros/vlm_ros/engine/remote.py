"""
A remote OpenAI-compatible server (vLLM, llama.cpp's servers, ...) as an ``Answerer``.

``RemoteClient`` is a peer of the local ``Pipeline``: it takes what ``Pipeline.generate``
takes and returns the same ``Result``, so the ROS node and library callers use a server like
a local model. One request is one streamed ``POST {url}/chat/completions``:

* each image (anything ``images.to_rgb`` reads) is downscaled to ``image_max_side`` keeping
  its aspect ratio and re-encoded once as a ``data:image/jpeg;base64,...`` URL (or PNG);
* the user message is ``[image_url parts..., text part]``, the system prompt a system
  message, earlier turns (``history``) plain user / assistant messages before it;
* ``max_new_tokens`` -> ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``
  as in the OpenAI API; ``top_k``, ``repetition_penalty`` (also as llama.cpp's
  ``repeat_penalty``), ``min_new_tokens`` -> ``min_tokens`` and ``ignore_eos`` as vLLM's
  extra fields, sent only when not "off" so that strict servers, which reject unknown
  fields, work with the defaults; beam search is refused;
* ``stream: true`` with ``stream_options.include_usage``: text deltas go to ``on_text`` as
  they arrive, the final usage gives the token counts (without usage, as from llama.cpp's
  Python server, every text chunk counts as one token and the prompt count stays 0);
* timings: ``preprocess_ms`` is the image re-encode, ``prefill_ms`` the time from sending to
  the first text chunk (connecting and the server's queue included), ``decode_ms`` the rest;
  ``vision_ms`` is 0 because the server does not report it.

Failures raise the ``Remote*Error`` types of ``engine.errors``. Only connection failures
(nothing was sent) are retried, ``max_retries`` times; an HTTP error, a timeout after the
request went out or a stream cut short is never retried, because the server may already
have done the work and a retry would hide a real fault. ``should_stop`` cancels at any
point, even while the server is silent: the connection is cut, which also tells the server.
"""

import base64
import io
import json
import logging
import os
import socket
import threading
import time
from typing import Callable, Optional
import urllib.parse

# httpx rather than the ``openai`` package: it streams server-sent events with separate
# connect, read and write timeouts, it is already a runtime dependency (with a rosdep key),
# and it pulls in no extra chain (pydantic, jiter, distro, ...). The openai client also
# retries HTTP 429/5xx on its own, which would hide server faults from the node; the
# package is used only by the tests, as the reference client.
import httpx
from PIL import Image

from vlm_ros.engine import grounding
from vlm_ros.engine.answerer import Answerer
from vlm_ros.engine.datatypes import (FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP,
                                      GenerationConfig, ImageOptions, Result, Timings)
from vlm_ros.engine.errors import (GenerationError, ImageError, RemoteConfigError, RemoteError,
                                   RemoteRequestError, RemoteServerError, RemoteStreamError,
                                   RemoteTimeoutError, RemoteUnreachableError)
from vlm_ros.engine.images import to_rgb

_LOG = logging.getLogger('vlm_ros.remote')
IMAGE_FORMATS = {'jpeg': ('JPEG', 'image/jpeg'), 'png': ('PNG', 'image/png')}
RETRY_DELAY_S = 0.25
"""First pause before reconnecting; doubled per retry, capped at RETRY_DELAY_MAX_S."""
RETRY_DELAY_MAX_S = 2.0
STOP_POLL_S = 0.05
"""How often should_stop is polled while the server is silent."""
_ERROR_TEXT_LIMIT = 500


def _ms(start):
    return (time.perf_counter() - start) * 1000.0


def check_remote_settings(url, model, api_key_env=''):
    """
    Return ``url`` without a trailing slash once url, model and key variable are usable.

    Raises RemoteConfigError naming the setting: the URL must be http(s) with a host, the
    model name non-empty and a named API key variable set in the environment.
    """
    parsed = urllib.parse.urlparse(str(url or '').strip())
    if parsed.scheme not in ('http', 'https') or not parsed.netloc:
        raise RemoteConfigError(
            f'remote_url must be an http:// or https:// URL with a host, e.g. '
            f'http://gpu-server:8000/v1 (got {url!r})')
    if not str(model or '').strip():
        raise RemoteConfigError('remote_model must name the model the server serves '
                                '(e.g. Qwen/Qwen2.5-VL-7B-Instruct)')
    if api_key_env and not os.environ.get(api_key_env):
        raise RemoteConfigError(f'remote_api_key_env names the environment variable '
                                f'{api_key_env}, which is not set (or empty) for this process')
    return parsed.geturl().rstrip('/')


class RemoteClient(Answerer):
    """
    Answers through an OpenAI-compatible ``/chat/completions`` endpoint, like a Pipeline.

    The HTTP client lives until ``close()``; requests from several threads are sent one at
    a time, as a local pipeline serves them. ``extra_body`` adds server-specific fields to
    every request (e.g. vLLM's ``mm_processor_kwargs``), overriding the mapped ones.
    """

    def __init__(self, url, model, *, api_key_env='', connect_timeout_s=5.0,
                 read_timeout_s=60.0, max_retries=2, image_max_side=1024,
                 image_format='jpeg', jpeg_quality=90,
                 defaults: Optional[GenerationConfig] = None, extra_body=None,
                 box_format=grounding.NORMALIZED_1000):
        self.url = check_remote_settings(url, model, api_key_env)
        self.model = str(model).strip()
        if image_format not in IMAGE_FORMATS:
            raise RemoteConfigError(f'image_format must be one of {sorted(IMAGE_FORMATS)}, '
                                    f'got {image_format!r}')
        if image_max_side < 1 or max_retries < 0:
            raise RemoteConfigError('image_max_side must be >= 1 and max_retries >= 0')
        if box_format not in grounding.BOX_FORMATS:
            raise RemoteConfigError(f'box_format must be one of {grounding.BOX_FORMATS}, '
                                    f'got {box_format!r}')
        self.box_format = box_format
        self.endpoint = self.url + '/chat/completions'
        self.api_key_env = api_key_env
        self.connect_timeout_s = float(connect_timeout_s)
        self.read_timeout_s = float(read_timeout_s)
        self.max_retries = int(max_retries)
        self.image_max_side = int(image_max_side)
        self.image_format = image_format
        self.jpeg_quality = int(jpeg_quality)
        self.defaults = (defaults or GenerationConfig()).validate()
        self.extra_body = dict(extra_body or {})
        self.image_options = ImageOptions()
        headers = {'Accept': 'text/event-stream, application/json'}
        if api_key_env:
            # Read once here; the key lives only in the client's headers, never in a log.
            headers['Authorization'] = f'Bearer {os.environ[api_key_env]}'
        timeout = httpx.Timeout(connect=self.connect_timeout_s, read=self.read_timeout_s,
                                write=self.read_timeout_s, pool=self.connect_timeout_s)
        # One connection per request, no keep-alive: the watchdog learns each request's socket
        # when it connects (to cut it on cancel), and a restarted server never meets a stale
        # pooled connection. A TCP handshake is nothing next to a model's answer.
        self._client = httpx.Client(headers=headers, timeout=timeout,
                                    limits=httpx.Limits(max_keepalive_connections=0))
        self._lock = threading.Lock()

    def __repr__(self):
        key = f', api key from ${self.api_key_env}' if self.api_key_env else ''
        return f'RemoteClient({self.endpoint}, model={self.model!r}{key})'

    def close(self):
        """Close the HTTP client (cancel a running request first, through should_stop)."""
        self._client.close()

    def generate(self, images=None, prompt='', system_prompt='', *, history=(),
                 on_text: Optional[Callable[[str], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None,
                 on_phase: Optional[Callable[[str], None]] = None,
                 on_token: Optional[Callable[[int], None]] = None,
                 image_options: Optional[ImageOptions] = None, **overrides) -> Result:
        """
        Answer ``prompt`` about ``images`` (None, one image or a list of them).

        Same contract as ``Answerer.generate``: ``on_text`` receives text as it arrives;
        ``should_stop`` is polled between chunks, and every STOP_POLL_S from a watchdog
        thread while the server is silent; when it returns True the stream is closed and
        the answer ends with finish_reason ``cancelled``. ``image_options`` is accepted for
        compatibility and ignored: the server tiles images its own way.
        """
        config = self.defaults.replace(**overrides).validate()
        body = self.request_body(config)
        turns = list(history or ())
        if len(turns) % 2:
            raise GenerationError('history must alternate user and assistant turns, ending '
                                  f'with an assistant turn (got {len(turns)} turns)')
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        with self._lock:
            return self._generate(images, prompt, system_prompt, turns, body,
                                  _Progress(on_text, on_phase, on_token),
                                  should_stop or (lambda: False))

    # Request ----------------------------------------------------------------------------
    def request_body(self, config: GenerationConfig, messages=None):
        """Map generation settings onto a chat completions request body."""
        if config.num_beams > 1:
            raise GenerationError('beam search (num_beams > 1) is not available through the '
                                  'remote backend; set num_beams 1')
        body = {'model': self.model, 'messages': messages or [],
                'max_tokens': config.max_new_tokens, 'temperature': config.temperature,
                'top_p': config.top_p, 'stream': True,
                'stream_options': {'include_usage': True}}
        if config.seed is not None:
            body['seed'] = config.seed
        if config.stop:
            body['stop'] = list(config.stop)
        if config.top_k > 0:
            body['top_k'] = config.top_k
        # Sent even at 1.0 (off): llama-cpp-python's server otherwise applies its own 1.1.
        # llama.cpp's servers (llama-server, llama-cpp-python) read ``repeat_penalty``, vLLM
        # and LMDeploy ``repetition_penalty``; each ignores the other's field.
        body['repetition_penalty'] = config.repetition_penalty
        body['repeat_penalty'] = config.repetition_penalty
        if config.min_new_tokens > 0:
            body['min_tokens'] = config.min_new_tokens
        if config.ignore_eos:
            body['ignore_eos'] = True
        body.update(self.extra_body)
        return body

    def messages(self, image_urls, prompt, system_prompt='', history=()):
        """Build the chat messages: system, earlier turns, then [images..., text] from the user."""
        messages = []
        if system_prompt:
            # A plain string: every server takes it (llama-cpp-python's rejects a list of
            # parts for the system role); vLLM adapts it to templates that want parts.
            messages.append({'role': 'system', 'content': system_prompt})
        for i, turn in enumerate(history):
            role = 'user' if i % 2 == 0 else 'assistant'
            if isinstance(turn, dict):  # a user turn that showed images
                parts = [{'type': 'image_url', 'image_url': {'url': self.encode_image(image)}}
                         for image in turn.get('images') or ()]
                parts.append({'type': 'text', 'text': turn.get('text', '')})
                messages.append({'role': role, 'content': parts})
            else:
                messages.append({'role': role, 'content': turn})
        content = [{'type': 'image_url', 'image_url': {'url': url}} for url in image_urls]
        content.append({'type': 'text', 'text': prompt})
        messages.append({'role': 'user', 'content': content})
        return messages

    def sent_size(self, width, height):
        """
        Return the (width, height) an image of this size is sent at.

        Downscaled to ``image_max_side`` (aspect kept). With ``absolute`` boxes (Qwen2.5-VL),
        also put on the Qwen2-VL resize grid: the server then sees exactly this size, which
        its boxes refer to.
        """
        longest = max(width, height)
        if longest > self.image_max_side:
            scale = self.image_max_side / longest
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
        if self.box_format == grounding.ABSOLUTE:
            height, width = grounding.smart_resize(height, width)
        return width, height

    def encode_image(self, image) -> str:
        """Return ``image`` as a data URL at ``sent_size``."""
        rgb = to_rgb(image)
        picture = Image.fromarray(rgb)
        size = self.sent_size(*picture.size)
        if size != picture.size:
            picture = picture.resize(size, Image.LANCZOS)
        pil_format, mime = IMAGE_FORMATS[self.image_format]
        buffer = io.BytesIO()
        options = {'quality': self.jpeg_quality} if pil_format == 'JPEG' else {}
        try:
            picture.save(buffer, pil_format, **options)
        except (OSError, ValueError) as exc:
            raise ImageError(f'cannot encode the image as {pil_format}: {exc}') from exc
        return f'data:{mime};base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')

    # One request ------------------------------------------------------------------------
    def _generate(self, images, prompt, system_prompt, history, body, progress, should_stop):
        timings = Timings()
        start = time.perf_counter()
        progress.phase('preprocess')
        images = [to_rgb(image) for image in images]
        image_urls = [self.encode_image(image) for image in images]
        body = dict(body, messages=self.messages(image_urls, prompt, system_prompt, history))
        timings.preprocess_ms = _ms(start)
        progress.phase('prefill')  # the server's vision and prefill, as far as we can tell
        sent = time.perf_counter()
        answer = _Answer()
        connections = []  # the request's TCP streams, from httpcore's trace hook
        stopped, finished = threading.Event(), threading.Event()
        threading.Thread(target=_watch, args=(connections, should_stop, stopped, finished),
                         daemon=True).start()
        response = None
        try:
            response = self._open(body, should_stop, connections)
            if response is None:
                answer.finish_reason = FINISH_CANCELLED
            elif response.status_code >= 400:
                self._raise_for_status(response)
            else:
                self._read(response, answer, progress, should_stop)
        except RemoteError:
            if not stopped.is_set():
                raise
            answer.finish_reason = FINISH_CANCELLED  # the watchdog cut the connection
        finally:
            finished.set()
            if response is not None:
                # Closing an unfinished stream drops the connection: that tells the server.
                response.close()
        end = time.perf_counter()
        first = answer.first_token_at or end
        timings.prefill_ms = (first - sent) * 1000.0
        timings.decode_ms = (end - first) * 1000.0
        timings.total_ms = (end - start) * 1000.0
        result = Result(text=''.join(answer.parts), finish_reason=answer.finish_reason,
                        prompt_tokens=answer.prompt_tokens, timings=timings,
                        completion_token_count=answer.completion_tokens, backend='remote')
        if images:
            height, width = images[0].shape[:2]
            found = grounding.locate(result.text, self.box_format, (width, height),
                                     self.sent_size(width, height))
            result.detections, result.dropped_boxes = found.boxes, found.dropped
        return result

    def _read(self, response, answer, progress, should_stop):
        kind = response.headers.get('content-type', '')
        if 'text/event-stream' in kind:
            self._read_stream(response, answer, progress, should_stop)
        elif 'json' in kind:
            # A server that ignores ``stream`` answers in one piece; take it as such.
            self._read_json(response, answer, progress)
        else:
            raise RemoteStreamError(
                f'{self.endpoint} answered with content type {kind!r}, neither an event '
                'stream nor JSON (is remote_url the API root, e.g. .../v1?)', self.url)

    def _open(self, body, should_stop, connections):
        """Send the request, retrying connection failures only; None when cancelled."""

        def trace(event, info):
            if event == 'connection.connect_tcp.complete':
                connections.append(info['return_value'])

        request = self._client.build_request('POST', self.endpoint, json=body,
                                             extensions={'trace': trace})
        attempts = 1 + self.max_retries
        for attempt in range(1, attempts + 1):
            if should_stop():
                return None
            try:
                return self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Nothing reached the server, so sending again is safe.
                reason = _describe(exc, self.connect_timeout_s, 'connect')
                if attempt == attempts:
                    tries = f'{attempts} attempts' if attempts > 1 else '1 attempt'
                    raise RemoteUnreachableError(
                        f'cannot reach the server at {self.url}: {reason} ({tries}, '
                        'remote_max_retries)', self.url) from exc
                delay = min(RETRY_DELAY_S * 2 ** (attempt - 1), RETRY_DELAY_MAX_S)
                _LOG.warning('cannot reach %s: %s; retry %d of %d in %.2f s', self.url,
                             reason, attempt, self.max_retries, delay)
                if _sleep_unless(delay, should_stop):
                    return None
            except httpx.TimeoutException as exc:
                raise RemoteTimeoutError(
                    f'{self.url} accepted the connection but sent no response within '
                    f'{self.read_timeout_s:g} s (remote_read_timeout_s)', self.url) from exc
            except httpx.TransportError as exc:
                raise RemoteStreamError(f'the connection to {self.url} failed after the '
                                        f'request was sent: {_describe(exc)}', self.url) from exc
        return None  # not reached: the last attempt returns or raises

    def _raise_for_status(self, response):
        try:
            response.read()
            text = response.text
        except httpx.HTTPError:
            text = ''
        message = _error_message(text) or response.reason_phrase or 'no reason given'
        status = response.status_code
        kind = RemoteRequestError if status < 500 else RemoteServerError
        raise kind(f'{self.endpoint} answered HTTP {status}: {message}', self.url, status,
                   message)

    def _read_stream(self, response, answer, progress, should_stop):
        data = []
        try:
            for line in response.iter_lines():
                # httpx before 0.23 (Ubuntu 22.04's 0.22) keeps the line ending.
                line = line.rstrip('\r\n')
                if should_stop():
                    answer.finish_reason = FINISH_CANCELLED
                    return
                if line == '':  # a blank line ends an event
                    if data and self._on_event('\n'.join(data), answer, progress):
                        return
                    data = []
                    continue
                if line.startswith(':'):  # comment: keep-alive pings
                    continue
                field, _, value = line.partition(':')
                if field == 'data':
                    data.append(value[1:] if value.startswith(' ') else value)
            if data and self._on_event('\n'.join(data), answer, progress):
                return
        except httpx.TimeoutException as exc:
            raise RemoteTimeoutError(
                f'{self.url} stopped sending mid-answer: nothing for {self.read_timeout_s:g} s '
                f'(remote_read_timeout_s) after {answer.events} events', self.url) from exc
        except httpx.TransportError as exc:
            raise RemoteStreamError(
                f'the answer stream from {self.url} was cut off after {answer.events} events '
                f'(server crashed or connection dropped): {_describe(exc)}', self.url) from exc
        got = ('a finish reason' if answer.finish_reason else 'no finish reason')
        raise RemoteStreamError(
            f'the answer stream from {self.url} ended without [DONE] after {answer.events} '
            f'events and {got} (server crashed or connection dropped)', self.url)

    def _on_event(self, data, answer, progress):
        """Take one event's data; returns True at ``[DONE]``."""
        if data.strip() == '[DONE]':
            if answer.finish_reason is None:
                raise RemoteStreamError(
                    f'{self.url} ended the answer stream without a finish reason (interrupted '
                    'by the server, e.g. for another request)', self.url)
            return True
        try:
            event = json.loads(data)
        except ValueError:
            raise RemoteStreamError(f'{self.url} sent a malformed event: '
                                    f'{_clip(data)!r}', self.url) from None
        if not isinstance(event, dict):
            raise RemoteStreamError(f'{self.url} sent a malformed event: {_clip(data)!r}',
                                    self.url)
        answer.events += 1
        if 'error' in event or event.get('object') == 'error':
            raise RemoteStreamError(f'{self.url} reported an error mid-answer: '
                                    f'{_error_message(data)}', self.url)
        answer.take_usage(event.get('usage'))
        for choice in event.get('choices') or ():
            if not isinstance(choice, dict) or choice.get('index', 0) != 0:
                continue
            delta = choice.get('delta') or {}
            text = delta.get('content')
            if text is not None and (text or 'role' not in delta):
                # One chunk per generated token is how llama.cpp and vLLM stream; the
                # count only stands until a usage report replaces it.
                answer.chunks += 1
                if answer.first_token_at is None:
                    answer.first_token_at = time.perf_counter()
                    progress.phase('decode')
                if text:
                    answer.parts.append(text)
                    progress(text)
                progress.token(answer.chunks)
            if choice.get('finish_reason'):
                answer.finish_reason = _finish(choice['finish_reason'])
        return False

    def _read_json(self, response, answer, progress):
        try:
            response.read()
            event = response.json()
            choice = event['choices'][0]
            text = choice['message'].get('content') or ''
        except httpx.TimeoutException as exc:
            raise RemoteTimeoutError(f'{self.url} stopped sending mid-answer: nothing for '
                                     f'{self.read_timeout_s:g} s', self.url) from exc
        except httpx.TransportError as exc:
            raise RemoteStreamError(f'the answer from {self.url} was cut off: '
                                    f'{_describe(exc)}', self.url) from exc
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RemoteStreamError(f'{self.url} sent a malformed answer: '
                                    f'{_clip(response.text)!r}', self.url) from None
        answer.first_token_at = time.perf_counter()
        progress.phase('decode')
        answer.parts.append(text)
        answer.finish_reason = _finish(choice.get('finish_reason') or 'stop')
        answer.take_usage(event.get('usage'))
        if text:
            progress(text)
        progress.token(answer.completion_tokens)


class _Progress:
    """The caller's progress callbacks in one object, each optional."""

    def __init__(self, on_text, on_phase, on_token):
        self._text, self._phase, self._token = on_text, on_phase, on_token

    def __call__(self, text):
        if self._text is not None:
            self._text(text)

    def phase(self, name):
        if self._phase is not None:
            self._phase(name)

    def token(self, count):
        if self._token is not None:
            self._token(count)


class _Answer:
    """What the stream has delivered so far."""

    def __init__(self):
        self.parts = []
        self.finish_reason = None
        self.events = 0
        self.chunks = 0
        self.first_token_at = None
        self.usage_prompt = None
        self.usage_completion = None

    def take_usage(self, usage):
        if isinstance(usage, dict):
            self.usage_prompt = usage.get('prompt_tokens', self.usage_prompt)
            self.usage_completion = usage.get('completion_tokens', self.usage_completion)

    @property
    def prompt_tokens(self):
        return int(self.usage_prompt or 0)

    @property
    def completion_tokens(self):
        if self.usage_completion is not None:
            return int(self.usage_completion)
        return self.chunks


def _finish(reason):
    # 'length' is the only reason that means "cut at the token limit"; the others
    # (stop, eos, stop sequence, content filter, tool calls) all end the answer.
    return FINISH_LENGTH if reason == 'length' else FINISH_STOP


def _watch(connections, should_stop, stopped, finished):
    """
    Cut the request's connection once should_stop says so, even while the server is silent.

    A read blocked on a silent server (waiting for the response, or between chunks) cannot
    be interrupted by closing the httpx response from another thread, but shutting the
    socket down ends it at once; the reader then sees a cut connection, which ``_generate``
    turns into a cancelled answer. Keeps watching until the request is over, so a
    connection that completes after the stop is cut too.
    """
    cut = 0
    while not finished.wait(STOP_POLL_S):
        if not (stopped.is_set() or should_stop()):
            continue
        stopped.set()
        for stream in connections[cut:]:
            sock = stream.get_extra_info('socket')
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed: the reader is done with it anyway
        cut = len(connections)


def _sleep_unless(delay, should_stop):
    """Sleep ``delay`` seconds in short steps; returns True as soon as should_stop does."""
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline:
        if should_stop():
            return True
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    return should_stop()


def _describe(exc, timeout=None, phase=''):
    if isinstance(exc, httpx.TimeoutException) and timeout is not None:
        return f'{phase} timed out after {timeout:g} s'.strip()
    text = str(exc) or type(exc).__name__
    return f'{type(exc).__name__}: {text}' if text != type(exc).__name__ else text


def _clip(text):
    text = str(text)
    return text if len(text) <= _ERROR_TEXT_LIMIT else text[:_ERROR_TEXT_LIMIT] + '...'


def _error_message(text):
    """
    Return the server's own reason from an error body, whatever shape it comes in.

    OpenAI and llama.cpp: ``{"error": {"message": ...}}``; vLLM: ``{"message": ...}`` or the
    OpenAI shape; FastAPI: ``{"detail": ...}``; anything else: the (clipped) text itself.
    """
    text = (text or '').strip()
    try:
        body = json.loads(text)
    except ValueError:
        return _clip(text)
    if isinstance(body, dict):
        inner = body.get('error')
        if isinstance(inner, dict) and inner.get('message'):
            return _clip(inner['message'])
        if isinstance(inner, str) and inner:
            return _clip(inner)
        for key in ('message', 'detail'):
            if body.get(key):
                value = body[key]
                return _clip(value if isinstance(value, str) else json.dumps(value))
    return _clip(text)

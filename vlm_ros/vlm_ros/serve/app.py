"""
The HTTP API on Starlette: chat completions (plain and streamed), models, health, metrics.

A chat request is checked, its images loaded and its job queued before anything is sent,
so every mistake gets a status and an OpenAI error body. A streamed answer starts only
once the engine has produced its first text, so the first chunk carries text and an error
found while preparing the prompt (a bad image, a prompt too long) is still a 400. A client
that goes away -- while its request waits, runs or streams -- cancels its job and frees its
place in the queue.
"""

import asyncio
import contextlib
from dataclasses import dataclass, field
import functools
import hmac
import json
import logging
import time
from typing import Optional

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vlm_ros.engine.datatypes import FINISH_CANCELLED
from vlm_ros.engine.errors import VlmError
from vlm_ros.serve import chat_request, image_sources, responses
from vlm_ros.serve.api_errors import (ApiError, AUTHENTICATION, bad_request, from_engine,
                                      NOT_FOUND, RATE_LIMIT, SERVER)
from vlm_ros.serve.metrics import Metrics, outcome_of_status
from vlm_ros.serve.scheduler import (CLOSED, Closed, DONE, ERROR, Job, QueueFull, Scheduler,
                                     TEXT)

_LOG = logging.getLogger('vlm_ros.serve')
CLIENT_GONE = 499
"""Status logged for a request whose client disconnected (nothing reaches the client)."""


@dataclass
class ServeConfig:
    """How the server behaves; the model is given separately."""

    model_name: str
    api_key: Optional[str] = None
    """None: no authentication."""
    max_body_bytes: int = 20 * image_sources.MIB
    images: image_sources.ImagePolicy = field(default_factory=image_sources.ImagePolicy)
    system_prompt: str = ''
    """Used when a request has no system message (the node's system_prompt)."""


class ServeState:
    """What the handlers share: the answerer, its queue, the metrics and the settings."""

    def __init__(self, answerer, config: ServeConfig, scheduler: Scheduler):
        self.answerer = answerer
        self.config = config
        self.scheduler = scheduler
        self.metrics = Metrics(lambda: scheduler.depth, scheduler.capacity)
        self.http = None
        """httpx.AsyncClient for http(s) images, while the app runs (when allowed)."""
        self.started = int(time.time())
        self.closing = False
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        """The event loop serving the app, once started."""
        self.open_streams = 0
        """Event streams still sending (the shutdown waits for them to end)."""

    def authorize(self, request):
        """Raise 401 unless the request carries the API key (when one is set)."""
        if self.config.api_key is None:
            return
        scheme, _, token = request.headers.get('authorization', '').partition(' ')
        if scheme.lower() != 'bearer' or not token.strip():
            raise ApiError(401, 'missing API key: send it as "Authorization: Bearer <key>"',
                           AUTHENTICATION, None, 'missing_api_key',
                           {'WWW-Authenticate': 'Bearer'})
        # Constant time: the comparison must not tell how much of a guess was right.
        if not hmac.compare_digest(token.strip().encode(), self.config.api_key.encode()):
            raise ApiError(401, 'incorrect API key', AUTHENTICATION, None, 'invalid_api_key',
                           {'WWW-Authenticate': 'Bearer'})

    def fail(self, error: ApiError, count=True) -> JSONResponse:
        """Return the error response (and count the request's outcome)."""
        if count:
            self.metrics.count(outcome_of_status(error.status))
        if error.status >= 500 and error.code != 'shutting_down':
            _LOG.error('%d %s', error.status, error.message)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def error_response(error: ApiError) -> JSONResponse:
    """Return ``error`` as a JSON response (no request counted)."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def read_json(request, limit: int):
    """Return the JSON body; 413 past ``limit`` bytes, 400 when it is not JSON."""
    too_large = ApiError(413, f'the request body is larger than {limit} bytes (--max-body-mb)',
                         code='request_too_large')
    declared = request.headers.get('content-length', '')
    if declared.isdigit() and int(declared) > 2 * limit:
        raise too_large
    data = bytearray()
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            data += chunk
        elif size > 2 * limit:
            break
    if size > limit:
        # Read up to twice the limit, so a client that sent a little too much gets to read
        # the 413 instead of a connection reset; beyond that the connection is dropped.
        raise too_large
    try:
        return json.loads(bytes(data))
    except ValueError as exc:
        raise bad_request(f'the request body is not valid JSON: {exc}') from None


async def _disconnected(request):
    """Return once the client has disconnected (the body must have been read)."""
    while True:
        message = await request.receive()
        if message['type'] == 'http.disconnect':
            return


async def _next_event(job: Job, gone: asyncio.Future):
    """Return the job's next event, or None when the client disconnects first."""
    getter = asyncio.ensure_future(job.next_event())
    done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    return None


def _run(answerer, chat: chat_request.ChatRequest, images, job: Job):
    """Answer one request on the worker thread."""
    return answerer.generate(images or None, chat.prompt, chat.system_prompt,
                             history=chat.history, on_text=job.on_text,
                             should_stop=job.should_stop, **chat.settings)


def _shutting_down() -> ApiError:
    return ApiError(503, 'the server is shutting down', SERVER, None, 'shutting_down')


def _event_error(kind, value) -> ApiError:
    """Return the ApiError of an ERROR or CLOSED event."""
    if kind == CLOSED:
        return _shutting_down()
    if isinstance(value, VlmError):
        return from_engine(value)
    _LOG.error('request failed', exc_info=value)
    return ApiError(500, f'internal error: {type(value).__name__}: {value}', SERVER, None,
                    'internal_error')


async def chat_completions(request):
    """``POST /v1/chat/completions``."""
    state: ServeState = request.app.state.vlm
    arrived = request.scope.get(ARRIVED, time.perf_counter())
    try:
        state.authorize(request)
        body = await read_json(request, state.config.max_body_bytes)
        chat = chat_request.parse(body, state.config.model_name, state.config.system_prompt)
        # Refused before images are fetched or decoded, so overload costs little.
        state.scheduler.check_room()
        images = [await image_sources.load(ref, state.config.images, state.http)
                  for ref in chat.images]
        job = Job(functools.partial(_run, state.answerer, chat, images),
                  asyncio.get_running_loop(), stream=chat.stream)
        state.scheduler.submit(job)
    except QueueFull as exc:
        return state.fail(ApiError(429, str(exc), RATE_LIMIT, None, 'queue_full',
                                   {'Retry-After': str(exc.retry_after_s)}))
    except Closed:
        return state.fail(_shutting_down())
    except ApiError as exc:
        return state.fail(exc)

    gone = asyncio.ensure_future(_disconnected(request))
    try:
        first = await _next_event(job, gone)
    finally:
        gone.cancel()  # an event stream listens for the disconnect itself from here on
    if first is None:
        state.scheduler.cancel(job)
        state.metrics.count('cancelled')
        return Response(status_code=CLIENT_GONE)
    kind, value = first
    if kind in (ERROR, CLOSED):
        return state.fail(_event_error(kind, value))
    if kind == DONE and value.finish_reason == FINISH_CANCELLED:
        return state.fail(_shutting_down())  # only a shutdown cancels a job with a client
    if not chat.stream:
        state.metrics.observe(job, value, arrived)
        state.metrics.count('success')
        return JSONResponse(responses.completion(state.config.model_name, value, job))
    stream = _AnswerStream(state, job, chat, first, arrived)
    return _JobEventSource(stream.events(), stream.close, sep='\n')


class _AnswerStream:
    """The SSE events of one streamed answer, from its first event on."""

    def __init__(self, state: ServeState, job: Job, chat, first, arrived):
        self.state = state
        self.job = job
        self.first = first
        self.arrived = arrived
        self.chunks = responses.Chunks(state.config.model_name, chat.include_usage)
        self.outcome: Optional[str] = None
        state.open_streams += 1

    @staticmethod
    def _data(obj):
        return {'data': json.dumps(obj)}

    async def events(self):
        """Yield the chunks as the job's events arrive; ``[DONE]`` after the last."""
        kind, value = self.first
        while True:
            if kind == TEXT:
                yield self._data(self.chunks.text(value))
                self.job.first_sent.set()  # the chunk is with the transport: decode on
            elif kind == DONE and value.finish_reason != FINISH_CANCELLED:
                self.state.metrics.observe(self.job, value, self.arrived)
                yield self._data(self.chunks.finish(value, self.job))
                if self.chunks.include_usage:
                    yield self._data(self.chunks.usage(value))
                yield {'data': '[DONE]'}
                self.outcome = 'success'
                return
            else:
                # Failed mid-answer (or the server is stopping): the status is already
                # sent, so the error goes in the stream, and no [DONE] follows.
                error = _shutting_down() if kind == DONE else _event_error(kind, value)
                self.outcome = outcome_of_status(error.status)
                yield self._data(error.body())
                return
            kind, value = await self.job.next_event()

    def close(self):
        """Cancel the job unless it ended (the client went away) and count the outcome."""
        self.state.open_streams -= 1
        if self.outcome is None:
            self.state.scheduler.cancel(self.job)
            self.outcome = 'cancelled'
        self.state.metrics.count(self.outcome)


class _JobEventSource(EventSourceResponse):
    """An event stream that runs ``on_close`` however it ends: finished, failed or cut."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        """Send the stream, then call ``on_close``."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def list_models(request):
    """``GET /v1/models``."""
    state: ServeState = request.app.state.vlm
    try:
        state.authorize(request)
    except ApiError as exc:
        return error_response(exc)
    return JSONResponse({'object': 'list', 'data': [_model_card(state)]})


async def get_model(request):
    """``GET /v1/models/{model}``."""
    state: ServeState = request.app.state.vlm
    try:
        state.authorize(request)
        chat_request.check_model(request.path_params['model'], state.config.model_name)
    except ApiError as exc:
        return error_response(exc)
    return JSONResponse(_model_card(state))


def _model_card(state):
    return {'id': state.config.model_name, 'object': 'model', 'created': state.started,
            'owned_by': 'vlm_ros'}


async def health(request):
    """``GET /health``: 200 while serving (no key needed), 503 while shutting down."""
    state: ServeState = request.app.state.vlm
    body = {'status': 'shutting_down' if state.closing else 'ok',
            'model': state.config.model_name, 'queue_depth': state.scheduler.depth,
            'queue_capacity': state.scheduler.capacity}
    return JSONResponse(body, status_code=503 if state.closing else 200)


async def metrics(request):
    """``GET /metrics``: Prometheus text format (no key needed, like vLLM's)."""
    state: ServeState = request.app.state.vlm
    return Response(state.metrics.exposition(), media_type=state.metrics.content_type)


async def _http_error(request, exc):
    status = exc.status_code
    if status == 404:
        message = (f'no route {request.method} {request.url.path}: this server serves POST '
                   '/v1/chat/completions, GET /v1/models, GET /health and GET /metrics')
        error = ApiError(404, message, NOT_FOUND, None, 'not_found')
    else:
        error = ApiError(status, f'{request.method} {request.url.path}: {exc.detail}',
                         code='http_error')
    return error_response(error)


async def _server_error(request, exc):
    _LOG.error('unhandled error in %s %s', request.method, request.url.path, exc_info=exc)
    return error_response(ApiError(500, f'internal error: {type(exc).__name__}', SERVER, None,
                                   'internal_error'))


ARRIVED = 'vlm_serve.arrived'
"""The scope key of a request's arrival time: the start of its time to first token."""


class _StampArrival:
    """ASGI middleware: note when uvicorn hands a request over, before routing."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        scope[ARRIVED] = time.perf_counter()
        await self.app(scope, receive, send)


def create_app(answerer, config: ServeConfig, scheduler: Scheduler) -> Starlette:
    """Return the ASGI app serving ``answerer`` through ``scheduler``."""
    state = ServeState(answerer, config, scheduler)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.loop = asyncio.get_running_loop()
        if config.images.allow_http:
            import httpx
            state.http = httpx.AsyncClient(
                timeout=config.images.fetch_timeout_s, follow_redirects=True,
                max_redirects=3)
        try:
            yield
        finally:
            state.closing = True
            if state.http is not None:
                await state.http.aclose()

    app = Starlette(
        routes=[Route('/v1/chat/completions', chat_completions, methods=['POST']),
                Route('/v1/models', list_models, methods=['GET']),
                Route('/v1/models/{model:path}', get_model, methods=['GET']),
                Route('/health', health, methods=['GET']),
                Route('/metrics', metrics, methods=['GET'])],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        middleware=[Middleware(_StampArrival)], lifespan=lifespan)
    app.state.vlm = state
    return app

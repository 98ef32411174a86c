"""
uvicorn around the app: start, and a shutdown that tells every caller what happened.

On SIGINT or SIGTERM the running and queued answers are cancelled first; their callers get
a 503, or an error event ending their stream, and only then does uvicorn stop (it would
otherwise cut the streams without a word, or wait for answers that may take minutes). A
second signal stops at once.
"""

import asyncio
import logging
import signal

import uvicorn

from vlm_ros.serve.app import create_app
from vlm_ros.serve.scheduler import Scheduler

_LOG = logging.getLogger('vlm_ros.serve')
DRAIN_S = 5.0
"""Longest wait for the cancelled answers to end before uvicorn stops anyway."""


class Server(uvicorn.Server):
    """uvicorn's server, draining the model's work before it stops."""

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame):
        """Cancel the work in hand, then let uvicorn stop once its callers were told."""
        state = self.state
        loop = state.loop
        if state.closing or loop is None or loop.is_closed():
            super().handle_exit(sig, frame)
            return
        state.closing = True
        state.scheduler.close()
        # A signal handler must not wait: the waiting is a task on the event loop.
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(sig, frame)))

    async def _drain(self, sig, frame):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_S
        while (self.state.scheduler.depth or self.state.open_streams) and \
                loop.time() < deadline:
            await asyncio.sleep(0.02)
        uvicorn.Server.handle_exit(self, sig, frame)


def _ignore(sig, frame):
    """Take a signal uvicorn re-raises after its own shutdown: by then it is handled."""


def run(answerer, config, queue_size, host, port, log_level='info'):
    """Serve ``answerer`` until SIGINT or SIGTERM."""
    workers = getattr(answerer, 'max_concurrent', 1)
    scheduler = Scheduler(queue_size, workers)
    app = create_app(answerer, config, scheduler)
    state = app.state.vlm
    _LOG.info('API at http://%s:%d/v1 (queue of %d, %d at once, %s)', host, port, queue_size,
              workers, 'API key required' if config.api_key else 'no API key')
    # uvicorn (>= 0.29) raises the signal that stopped it again once it is done, so that
    # the default action follows; the shutdown is complete then, and the exit status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore)
    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan='on'),
           state).run()
    scheduler.close()
    scheduler.join(DRAIN_S)

"""
The one answering interface: a local ``Pipeline`` and a ``RemoteClient`` both implement it.

Callers (the ROS node, the CLI, library users) hold an ``Answerer`` and never ask which kind
it is. Subclasses implement ``generate`` and ``close``; ``__call__`` and ``stream`` are built
on ``generate`` here.
"""

import queue
import threading
from typing import Callable, Iterator, Optional

from vlm_ros.engine.datatypes import ImageOptions, Result

PHASES = ('preprocess', 'vision', 'prefill', 'decode')
"""What ``on_phase`` reports, in order (``vision`` only when there are images to encode)."""


class Answerer:
    """Answers questions about images: ``generate``, ``stream``, ``__call__``, ``close``."""

    def generate(self, images=None, prompt='', system_prompt='', *,
                 history=(),
                 on_text: Optional[Callable[[str], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None,
                 on_phase: Optional[Callable[[str], None]] = None,
                 on_token: Optional[Callable[[int], None]] = None,
                 image_options: Optional[ImageOptions] = None, **overrides) -> Result:
        """
        Answer ``prompt`` about ``images`` (None, one image or a list of them).

        An image is a numpy array, PIL image, file path or encoded bytes. ``history`` holds
        earlier turns, alternating user and assistant, oldest first: strings, or for a user
        turn that showed images ``{'text': ..., 'images': [...]}``. ``on_text``
        receives text as it is produced, never splitting a character; ``should_stop`` is
        polled while answering and ends the answer with finish_reason ``cancelled`` when it
        returns True. ``on_phase`` is told each phase as it begins (PHASES); ``on_token`` the
        count of generated tokens as it grows. Keyword arguments override generation
        settings (see GenerationConfig).
        """
        raise NotImplementedError

    def close(self):
        """Free sessions or connections; the answerer cannot be used afterwards."""
        raise NotImplementedError

    def __call__(self, inputs, **overrides) -> Result:
        """
        Answer ``(prompt, image)``, ``{'prompt': ..., 'image'/'images': ..., ...}``.

        A bare string is a text-only prompt; a dict may also carry ``system_prompt`` and
        ``history``; keyword arguments override generation settings.
        """
        history = ()
        if isinstance(inputs, str):
            prompt, images, system = inputs, None, ''
        elif isinstance(inputs, dict):
            prompt = inputs.get('prompt', inputs.get('text', ''))
            images = inputs.get('images', inputs.get('image'))
            system = inputs.get('system_prompt', '')
            history = inputs.get('history', ())
        else:
            prompt, images = inputs
            system = ''
        return self.generate(images, prompt, system_prompt=system, history=history,
                             **overrides)

    def stream(self, images=None, prompt='', system_prompt='', **kwargs) -> 'TextIterator':
        """Iterate over text deltas as they are produced; ``.result`` holds the Result."""
        return TextIterator(self, images, prompt, system_prompt, kwargs)


class TextIterator:
    """Runs one request in a thread and yields its text deltas."""

    _DONE = object()

    def __init__(self, answerer: Answerer, images, prompt, system_prompt, kwargs):
        self.result: Optional[Result] = None
        self._queue: queue.Queue = queue.Queue()
        self._error: Optional[BaseException] = None

        def run():
            try:
                self.result = answerer.generate(images, prompt, system_prompt,
                                                on_text=self._queue.put, **kwargs)
            except BaseException as exc:  # re-raised in the consumer's thread
                self._error = exc
            finally:
                self._queue.put(self._DONE)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                break
            yield item
        self._thread.join()
        if self._error is not None:
            raise self._error

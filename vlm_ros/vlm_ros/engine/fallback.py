"""
A remote server first, the local model when the server cannot be reached.

For a robot whose big model runs on a server: while the server answers, it answers; when the
connection fails (refused, no route, connect timeout -- nothing was sent, see
``remote.RemoteUnreachableError``), the robot's own model answers instead and the result
says so (``backend`` = ``local (fallback)``). Any other failure of the server (an HTTP
error, a stream cut short) is reported as it is: the server may have done the work.
"""

import threading

from vlm_ros.engine.answerer import Answerer
from vlm_ros.engine.errors import RemoteUnreachableError

FALLBACK = 'local (fallback)'


class FallbackAnswerer(Answerer):
    """Answers with ``primary`` (a RemoteClient), or ``fallback`` when it is unreachable."""

    def __init__(self, primary: Answerer, fallback: Answerer):
        self.primary = primary
        self.fallback = fallback
        self._lock = threading.Lock()
        self.last_unreachable = ''
        """Why the server was last unreachable ('' once it answered again)."""

    def generate(self, images=None, prompt='', system_prompt='', **kwargs):
        """Answer through the server, or locally when it cannot be reached."""
        try:
            result = self.primary.generate(images, prompt, system_prompt, **kwargs)
        except RemoteUnreachableError as exc:
            with self._lock:
                self.last_unreachable = str(exc)
            result = self.fallback.generate(images, prompt, system_prompt, **kwargs)
            result.backend = FALLBACK
            return result
        with self._lock:
            self.last_unreachable = ''
        return result

    def close(self):
        """Close the server's client and the local sessions."""
        self.primary.close()
        self.fallback.close()

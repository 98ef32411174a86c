"""
Exceptions the engine raises for bad input or bad model files.

Every failure a caller can cause or fix has its own type and a message that names the file,
value or limit involved; callers (the ROS node among them) turn them into error responses.
"""


class VlmError(Exception):
    """Base class of every error the engine raises on purpose."""


class ImageError(VlmError, ValueError):
    """The image cannot be used: empty, corrupt, wrong dtype, channels or size."""


class PromptTooLongError(VlmError, ValueError):
    """The prompt with its image tokens does not fit the model's context."""


class ModelFilesError(VlmError, FileNotFoundError):
    """A model file is missing, unreadable or not what its name says."""


class ModelMismatchError(VlmError, ValueError):
    """Model files do not belong together (e.g. a decoder exported from another model)."""


class UnsupportedModelError(VlmError, ValueError):
    """The files describe a model family, graph input or option this engine cannot run."""


class GenerationError(VlmError, ValueError):
    """Generation settings are invalid or unsupported by the runtime."""


class Cancelled(VlmError):
    """``should_stop`` asked to stop while a prompt was being prefilled (no answer yet)."""


class BackendError(VlmError, RuntimeError):
    """A runtime or remote server failed while answering."""


class RemoteConfigError(VlmError, ValueError):
    """The remote backend is misconfigured: URL, model name or API key variable."""


class RemoteError(BackendError):
    """A remote OpenAI-compatible server could not answer; ``url`` names the server."""

    def __init__(self, message, url=''):
        super().__init__(message)
        self.url = url


class RemoteUnreachableError(RemoteError):
    """No connection to the server (refused, no route, DNS, connect timeout), after retries."""


class RemoteTimeoutError(RemoteError):
    """The server accepted the request but sent nothing for longer than the read timeout."""


class RemoteHTTPError(RemoteError):
    """The server answered with an HTTP error status; ``server_message`` is its own reason."""

    def __init__(self, message, url='', status_code=0, server_message=''):
        super().__init__(message, url)
        self.status_code = status_code
        self.server_message = server_message


class RemoteRequestError(RemoteHTTPError):
    """HTTP 4xx: the server rejected the request (bad request, unknown model, API key)."""


class RemoteServerError(RemoteHTTPError):
    """HTTP 5xx: the server failed while handling the request."""


class RemoteStreamError(RemoteError):
    """The answer stream was malformed or cut off (connection dropped, no ``[DONE]``)."""

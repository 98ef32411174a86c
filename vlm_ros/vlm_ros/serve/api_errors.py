"""
Errors as the OpenAI API reports them, and the engine's typed errors mapped onto them.

Every failure leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with
a status that says whose fault it is: 4xx for what the caller can fix (the message names the
field, the limit or the setting to change), 5xx for the server's own failures.
"""

from typing import Dict, Optional

from vlm_ros.engine import errors

INVALID_REQUEST = 'invalid_request_error'
AUTHENTICATION = 'authentication_error'
NOT_FOUND = 'not_found_error'
RATE_LIMIT = 'rate_limit_error'
SERVER = 'server_error'


class ApiError(Exception):
    """A failure with its HTTP status and the fields of the OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str = INVALID_REQUEST,
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        """Return the JSON body: ``{"error": {...}}``."""
        return {'error': {'message': self.message, 'type': self.type, 'param': self.param,
                          'code': self.code}}


def bad_request(message, param=None, code=None) -> ApiError:
    """Return a 400 for a request the caller must change."""
    return ApiError(400, message, INVALID_REQUEST, param, code)


def from_engine(exc: errors.VlmError) -> ApiError:
    """
    Map an engine error raised while answering onto a status and an error object.

    Bad images, prompts that do not fit and settings out of range are the caller's (400);
    a remote backend's failures are a bad gateway (502) or its timeout (504); anything else
    the engine raises is the server's (500).
    """
    text = str(exc)
    if isinstance(exc, errors.ImageError):
        return bad_request(f'invalid image: {text}', 'messages', 'invalid_image')
    if isinstance(exc, errors.PromptTooLongError):
        return bad_request(f'{text}; shorten the conversation or send smaller or fewer '
                           'images', 'messages', 'context_length_exceeded')
    if isinstance(exc, errors.GenerationError):
        return bad_request(text, None, 'invalid_settings')
    if isinstance(exc, errors.RemoteTimeoutError):
        return ApiError(504, f'the upstream server timed out: {text}', SERVER, None,
                        'upstream_timeout')
    if isinstance(exc, errors.RemoteError):
        return ApiError(502, f'the upstream server failed: {text}', SERVER, None,
                        'upstream_error')
    return ApiError(500, f'the model failed while answering: {text}', SERVER, None,
                    'engine_error')

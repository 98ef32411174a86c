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


class BackendError(VlmError, RuntimeError):
    """A runtime or remote server failed while answering."""

"""Objects that hold native memory (llama.cpp models and contexts, libmtmd contexts)."""


class NativeResource:
    """Frees its native memory in ``close``, also when garbage collected."""

    def close(self):
        """Free the native memory; safe to call more than once."""
        raise NotImplementedError

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: B902 -- interpreter shutdown may have torn ctypes down
            pass

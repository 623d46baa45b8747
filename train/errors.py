"""The one exception type a user sees: a sentence they can act on, no traceback.

Every stage raises `ZeroLLMError` (or a subclass) for bad input; the `zerollm`
CLI prints it as one line (`--debug` shows the traceback).
"""


class ZeroLLMError(Exception):
    """Bad input or state a user can fix; the message names the file and field."""


class ConfigError(ZeroLLMError):
    """A run config or DeepSpeed config is missing, malformed or inconsistent."""

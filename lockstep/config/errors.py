"""The one error type for bad configuration: it names the key and the fix."""

from lockstep.errors import LockstepError


class ConfigError(LockstepError):
    """A bad config key or value; raised before any process group or tensor work starts."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")

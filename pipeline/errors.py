"""The error every layer raises for a config key or value that cannot work (entry points print it, no traceback)."""


class ConfigError(ValueError):
    """A config key or value that cannot work; the message names the key."""

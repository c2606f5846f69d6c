"""The one exception type for bad user input: the CLI prints its message as one line and exits 2."""


class UsageError(ValueError):
    """Bad input (config, data, layout): one clear line naming what is wrong and what would be right."""

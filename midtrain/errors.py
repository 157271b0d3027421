"""The one exception type for user-facing configuration and data errors."""


class MidtrainError(ValueError):
    """A misconfiguration or bad input. The message names what is wrong and what would be right."""

"""The one error type of the converters."""


class ConvertError(ValueError):
    """A conversion that cannot be done; the message names the file, key or option and what was expected."""

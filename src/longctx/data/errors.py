"""The one exception the data pipeline raises for bad user input."""


class DataError(ValueError):
    """A data path, tokenizer or dataset the user supplied cannot be used.

    The message names the offending file or value and says what to change.
    """

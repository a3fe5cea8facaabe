"""The one exception the data pipeline raises for bad input."""


class DataError(ValueError):
    """Bad training data: the message names the file, the line and what was expected."""

"""The data error every reader raises (formats.py, sources.py)."""


class DataError(ValueError):
    """Bad data with `on_bad_record: error`, or a file that cannot be read at all."""

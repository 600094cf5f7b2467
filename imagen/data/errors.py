"""The one exception type the data layer raises for problems a user can fix."""


class DataError(Exception):
    """Bad or missing data; the message is one line: what is wrong, where, and what to do."""

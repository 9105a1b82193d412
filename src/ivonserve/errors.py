"""The one exception type users see as a one-line message instead of a stack trace."""


class IvonserveError(Exception):
    """A user-facing error: bad file, bad flag, bad model. The CLI prints it as one line."""

"""The one exception type for user errors.

Library code raises :class:`StyletuneError` for anything the user can fix (a bad
flag, a missing file, a model that is not available offline).  The CLI turns it
into a single line on stderr and exit status 2; anything else is a bug and keeps
its traceback.
"""


class StyletuneError(Exception):
    """A problem with the user's input, reported as one line."""

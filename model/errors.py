"""The one exception type that means "the user gave us something wrong".

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input, bad configuration or a bad artifact, explained in the message."""

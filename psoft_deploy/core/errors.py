"""The one exception type for user errors: the CLI prints its message as one line and exits 1."""


class UserError(Exception):
    """Bad input the user can fix: the message says what is wrong and how to fix it."""

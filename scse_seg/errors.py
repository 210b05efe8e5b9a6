"""User-facing errors: the CLI prints them as one line and exits with status 2 (no traceback).

Raise these for anything the user can fix (bad file, bad config key, wrong shape); let programming
errors surface as ordinary exceptions.
"""


class UserError(Exception):
    """Bad input the user can fix. The message names the file or key and says what to do."""

    exit_code = 2


class DataError(UserError):
    """A dataset file or folder is missing, corrupt or inconsistent."""


class ConfigError(UserError):
    """A configuration key is unknown or has the wrong type or range."""

"""The one exception type the CLI turns into a plain one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input or an unusable environment that the user can fix (not a bug in this tool)."""

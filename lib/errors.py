"""The exception types the CLI turns into one plain `error:` line and a non-zero exit."""


class UserError(Exception):
    """Bad input or an unusable environment that the user can fix (not a bug in this tool).

    `setting` names the setting at fault (a RunConfig field, which is also the flag's name) when there is one;
    the CLI then shows the flag in front of the message.
    """

    exit_code = 2

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


class IllegalAllocationError(UserError, ValueError):
    """The requested sparsity / beta cannot be realised for this model (search.sh stops on its exit code)."""

    exit_code = 3

"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (path, flag, checkpoint): the message names the problem and the fix."""

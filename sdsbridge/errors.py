"""The one exception type for errors a user can cause (bad config, missing file, bad checkpoint...).

cli.py catches it and prints ``error: <message>`` on one line with exit code 2; programming errors keep
their tracebacks.
"""


class UserError(Exception):
    """An error caused by user input. The message is one line that names the key/file and the problem."""

"""The one exception type for bad user input.

A UserError carries a one-line message that says what was wrong and what to do; the CLI prints it as
`maskedlm: error: ...` and exits with status 2. Library callers can catch it like any other exception.
"""


class UserError(Exception):
    """Bad input from the user: the message is shown as is, without a traceback."""

"""The one exception type for problems the user can fix.

The CLI turns a `UserError` into a single line on stderr and exit code 2;
anything else is a bug and exits 1.
"""


class UserError(Exception):
    """Bad usage or bad input: the message says what was wrong and what to do."""

"""The exception types, in one place.

The CLI turns a `UserError` into a single line on stderr and exit code 2;
anything else is a bug and exits 1 (`InternalError` says so explicitly).
"""


class UserError(Exception):
    """Bad usage or bad input: the message says what was wrong and what to do."""


class InternalError(Exception):
    """A failure that is the tool's fault (for example an output failing validation)."""


class ValidationError(Exception):
    """The pruned model failed a check: a bug in the tool, never the user's fault."""

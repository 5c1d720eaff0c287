"""Errors a person can act on.

`UserError` is raised for bad input (an unknown model, a bad cache spec, a prompt that does not fit);
the CLI prints its message on one line and exits with status 2, never a stack trace.
"""


class UserError(Exception):
    """A mistake the user can fix; the message says what was wrong and what to do."""

"""The one error type a user sees: a mistake they can fix, printed as one line (the file, the field, the fix),
exit code 2, no traceback (common.config.run_stage). A leaf: every module may raise it."""


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2, no traceback."""

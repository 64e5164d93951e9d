"""The one error type a user sees: a mistake they can fix, printed as one line (the file, the field, the fix),
exit code 2, no traceback (common.stage.run_stage for the stages, cli for the modules' command lines). A leaf:
every module may raise it."""

import sys


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2, no traceback."""


def cli(main, argv: list[str]) -> None:
    """A module's command line (`python -m common.checks`, make's queries): a UserError is its one line on
    stderr and exit code 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

"""User-facing errors: one clear line that says what is wrong and how to fix it."""


class UserError(Exception):
    """Bad input from the user (flags, files, configs). Scripts print it as one line and exit 2
    (tinyfusion.errors.run_main)."""

"""Script-level error handling: a UserError (core.errors) becomes one line on stderr and exit 2."""
import sys

from core.errors import UserError


def run_main(main, *args, **kwargs):
    """Run a script's `main`, turning a UserError into `error: <message>` on stderr and exit 2.

    Usage at the bottom of a script: `if __name__ == "__main__": run_main(main)`.
    """
    try:
        return main(*args, **kwargs)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def one_line(error):
    """The message of a UserError, also when a DataLoader worker re-raised it with the worker's traceback."""
    text = str(error).strip()
    if "Traceback" in text:  # "Caught UserError in DataLoader worker ... Traceback ... UserError: <message>"
        text = text.splitlines()[-1].split("UserError: ", 1)[-1]
    return " ".join(text.split())

"""One exception type for every problem caused by the user's input.

The CLI prints its message as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class FedShareError(Exception):
    """Bad input: a missing or corrupt file, an unknown name, an out-of-range setting."""

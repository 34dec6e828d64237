"""User-facing errors: each names the problem and how to fix it. The CLI prints them without a traceback."""


class FlashdiffError(Exception):
    """An error caused by the user's input or environment (bad argument, missing or corrupt file)."""

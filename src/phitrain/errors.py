"""User-facing errors.

Anything a user can cause (a bad path, a malformed file, an impossible config) raises `PhitrainError`
with a one- or two-line message that names the file/field/value and how to fix it. The CLI prints the
message without a traceback and exits with status 2; library callers can catch it like any exception.
"""


class PhitrainError(Exception):
    """An error caused by user input, reported as one clear message instead of a traceback."""

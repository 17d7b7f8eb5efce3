"""UserError: bad input, reported by the command line as one line with exit code 2. It lives here,
importing nothing, so that every layer can raise it without importing the command line."""


class UserError(Exception):
    """Bad input: reported as one line, exit code 2."""

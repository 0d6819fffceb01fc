class UserError(Exception):
    """A mistake the user can fix (bad input, missing file, ...): printed as one line, exit 2."""

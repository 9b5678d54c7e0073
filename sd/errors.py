"""The errors sd raises on purpose."""


class InputError(ValueError):
    """Bad input: the message names the argument (or field, or flag) and the rule. A server
    answers it 400 and the CLI exits 2; any other exception is a bug, never the caller's fault."""

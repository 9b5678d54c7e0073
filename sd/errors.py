"""The errors sd raises on purpose."""


class InputError(ValueError):
    """Bad input: the message names the argument (or field, or flag) and the rule. A server
    answers it 400 and the CLI exits 2; any other exception is a bug, never the caller's fault."""


def lone_surrogate(text: str) -> int | None:
    """Where `text` holds a lone surrogate (its index), or None when it is valid Unicode. JSON may
    escape one ("\\ud800"), and bytes that were not UTF-8 reach Python as them (a shell's argv);
    no tokenizer takes them, so every entry point checks its prompts with this first."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None

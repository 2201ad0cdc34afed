"""The one exception hookpatch raises for bad input.

Messages name the argument, say what was expected and what came, and give the fix.
"""


class HookpatchError(ValueError):
    """Bad input to a hookpatch call; the message says what to change."""

"""critlib: find the few weights of a language model that matter most, measure them, test them causally."""

__version__ = "0.1.0"


class CritlibError(Exception):
    """A problem with the user's input: the message names it and says how to fix it."""

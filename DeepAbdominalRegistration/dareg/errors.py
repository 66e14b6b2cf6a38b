"""The one exception type for errors a user can cause.

Why one type: the CLI (and the Slicer module) catch exactly this, print its message without a
traceback and exit with code 2; anything else is a bug and keeps its traceback.
"""


class DaregError(Exception):
    """A user-caused error (bad file, wrong geometry, empty mask, bad model...).

    The message must say what is wrong and what to do about it.
    """

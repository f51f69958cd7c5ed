"""The one exception type for user errors: front ends print its message and exit with status 2."""


class CrepeError(ValueError):
    """A problem with the user's input (bad value, missing file, corrupt model, ...).

    The message is one sentence that names the bad value and says what is allowed.
    """

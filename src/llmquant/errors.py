"""The one exception type for user errors: the CLI prints its message as one line and exits non-zero."""


class LlmquantError(Exception):
    """A problem with the user's input (model, scheme, recipe, data) that says what is allowed."""

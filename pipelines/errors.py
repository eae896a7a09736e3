"""The one exception type for bad user input outside the config (URIs, files, model references)."""


class UserError(Exception):
    """Bad input from the user: the message names the thing (URI, file, key) and the problem."""

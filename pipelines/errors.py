"""The one exception type for bad user input outside the config (URIs, files, model references)."""

from pipelines.redaction import redact


class UserError(Exception):
    """Bad input from the user: the message names the thing (URI, file, key) and the problem.
    The message is redacted when the error is made (`pipelines.redaction.redact`), so no log,
    Ray error file or traceback that carries it holds a credential."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(redact(str(message)), *args)

"""Credentials out of everything the product writes: params, the config artifact, console lines,
log records and error messages.

`redact(text)` is the one filter. It blanks, inside any text,
- the user info of a URL: `https://user:pass@host/` -> `https://***@host/` (also `token@host`), with
  a password that itself holds `@`, `/`, `:` or `%` (unencoded): everything up to the last `@` of
  the word goes;
- the same without a scheme (`user:pass@host:9/bucket`, pyarrow repeats a path so);
- the value of a query parameter whose name says it is a credential (token, key, secret, password,
  signature, credential, auth, sig, ...): `?X-Amz-Signature=abc&v=1` -> `?X-Amz-Signature=***&v=1`;
- the value of every credential-named environment variable (`AWS_SECRET_ACCESS_KEY`,
  `MLFLOW_TRACKING_PASSWORD`, `RAY_AUTH_TOKEN`, ...) wherever it appears.
`redact_config(d)` runs it over every string of a nested config dict and blanks values whose key
names a credential (`SECRET_KEY_WORDS`).

The mechanism that applies it everywhere, entered once by the CLI (`redacting()`):
- `RedactingStream` wraps `sys.stdout` and `sys.stderr`, so every line printed in the process
  (the product's own, MLflow's "View run at", Tune's trial lines, worker output Ray forwards to the
  driver, a traceback) is redacted before it reaches the terminal or a log file;
- `RedactingFilter` on the root logger's handlers (log files a user attaches too);
- `redacted_error(e)` turns any exception into one of the same type name whose message is
  redacted: the CLI's top-level handler, Tune trials and Ray Train workers re-raise through it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any, TextIO

MASK = "***"
SECRET_KEY_WORDS = ("secret", "password", "passwd", "token", "credential", "access_key", "api_key")
# environment variables that hold a credential (not `AWS_ACCESS_KEY_ID`, an id, nor
# `TOKENIZERS_PARALLELISM`); values shorter than MIN_ENV_SECRET_LEN are not searched for (a "0"
# would blank every zero)
_ENV_SECRET_NAME = re.compile(
    r"SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_KEY$|(^|_)(AUTH_)?TOKEN$", re.IGNORECASE
)
MIN_ENV_SECRET_LEN = 6

# a word: the longest run without whitespace, quotes or angle brackets (a password may hold any
# other character, `@ / : %` included)
_WORD = re.compile(r"[^\s'\"<>`]+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;][^=&;\s'\"#]*?(?:token|key|secret|passw|pwd|signature|sig|credential|auth)"
    r"[^=&;\s'\"#]*=)(?P<value>[^&;\s'\"#]+)",
    re.IGNORECASE,
)


def _redact_userinfo(word: str) -> str:
    """One word with the user info of its URL (or of a scheme-less `user:pass@host`) blanked."""
    if "@" not in word:
        return word
    m = _SCHEME.search(word)
    if m is not None:
        head, rest = word[: m.end()], word[m.end() :]
        nxt = _SCHEME.search(rest)  # two URLs glued together: each on its own
        tail = ""
        if nxt is not None:
            rest, tail = rest[: nxt.start()], _redact_userinfo(rest[nxt.start() :])
        at = rest.rfind("@")
        if at < 0:
            return head + rest + tail
        info = rest[:at]
        # `user:pass@` (any password) or `token@host`; not `host/path@v2` (an '@' in a path)
        if info and (":" in info or "/" not in info):
            return f"{head}{MASK}{rest[at:]}{tail}"
        return head + rest + tail
    at = word.rfind("@")
    info = word[:at]
    colon = info.find(":")
    # scheme-less `user:pass@host` (pyarrow's message repeats an S3 path so); not
    # `models:/name@alias` (a registry reference: ':' followed by '/')
    if colon > 0 and "/" not in info[:colon] and info[colon + 1 : colon + 2] != "/":
        start = max(info.rfind("=", 0, colon), info.rfind("(", 0, colon), info.rfind(",", 0, colon)) + 1
        return f"{word[:start]}{MASK}{word[at:]}"
    return word


def env_secrets(environ: dict[str, str] | None = None) -> list[str]:
    """The values of credential-named environment variables, longest first."""
    env = os.environ if environ is None else environ
    # key by key, not env.items(): another thread may unset a variable meanwhile (MLflow's
    # telemetry thread does), and os.environ's items() then raises KeyError mid-iteration
    values = ((k, env.get(k)) for k in list(env))
    found = {v for k, v in values if v is not None and _ENV_SECRET_NAME.search(k)
             and len(v) >= MIN_ENV_SECRET_LEN}
    return sorted(found, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with URL credentials (user info, secret query values) and the values of
    credential-named environment variables replaced by `***`."""
    if not text:
        return text
    for secret in env_secrets():
        if secret in text:
            text = text.replace(secret, MASK)
    text = _WORD.sub(lambda m: _redact_userinfo(m.group(0)), text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", text)


def is_secret_key(name: str) -> bool:
    """True for config/param names that hold a credential (`aws_secret_access_key`, `token`)."""
    return any(w in name.lower() for w in SECRET_KEY_WORDS)


def redact_config(value: Any, key: str = "") -> Any:
    """A copy of a nested config (dicts, lists, tuples, scalars) with every string through
    `redact` and the values of credential-named keys replaced by `***`."""
    if key and is_secret_key(key) and value not in (None, ""):
        return MASK
    if isinstance(value, dict):
        return {k: redact_config(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_config(v) for v in value)
    if isinstance(value, str):
        return redact(value)
    return value


# -- exceptions -----------------------------------------------------------------------------------


class RedactedError(Exception):
    """An exception re-raised with its message redacted; `kind` is the original type's name
    (`str(e)` starts with it when it is not a product error)."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # pickled across Ray processes with its kind
        return (type(self), (str(self), self.kind))


def redacted_message(exc: BaseException) -> str:
    """`exc`'s message through `redact` (its type name when it has none)."""
    return redact(str(exc)) or type(exc).__name__


def redacted_error(exc: BaseException) -> BaseException:
    """`exc` itself when its message holds no credential; else an exception of the same type
    (when it takes one message) or a `RedactedError`, with the message redacted. Raise it
    `from None` so the traceback does not show the original."""
    text = str(exc)
    clean = redact(text)
    if clean == text:
        return exc
    try:
        new = type(exc)(clean)
        if str(new) == clean:
            return new
    except Exception:  # noqa: BLE001 - constructors that want other arguments
        pass
    return RedactedError(f"{type(exc).__name__}: {clean}", type(exc).__name__)


# -- every line printed or logged -----------------------------------------------------------------


class RedactingStream(io.TextIOBase):
    """A text stream that redacts what is written to `inner`, a line at a time (a credential is
    never split across two writes: text waits for its newline, or for `flush()`)."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            done, _, self._pending = self._pending.rpartition("\n")
            self.inner.write(redact(done) + "\n")
        return len(text)

    def flush(self) -> None:
        if self.inner.closed:  # a library that kept this stream past its inner one's life
            return
        if self._pending:
            self.inner.write(redact(self._pending))
            self._pending = ""
        self.inner.flush()

    @property
    def closed(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.inner, "closed", False))

    def isatty(self) -> bool:
        return not self.closed and self.inner.isatty()

    def fileno(self) -> int:
        return self.inner.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.inner, "encoding", "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.inner, "errors", None)

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:  # buffer, reconfigure, ...
        return getattr(self.inner, name)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message (its arguments merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: leave it to logging
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if redact(str(exc)) != str(exc):
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


_FILTER = RedactingFilter()


@contextlib.contextmanager
def redacting() -> Iterator[None]:
    """Inside: every line this process prints or logs is redacted (`sys.stdout` and `sys.stderr`
    wrapped, the filter on the root logger and its handlers); the streams are put back after."""
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)
    protect_logging()
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved


def protect_logging(logger: logging.Logger | None = None) -> None:
    """The redacting filter on `logger`'s handlers (the root logger's by default) and on the
    logger itself."""
    logger = logger or logging.getLogger()
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    for handler in logger.handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)

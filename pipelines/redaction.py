"""Credentials out of everything the product writes: params, the config artifact, error lines.

`redact(text)` is the one filter. It blanks, inside any text,
- the user info of a URL: `https://user:pass@host/` -> `https://***@host/` (also `token@host`);
- the value of a query parameter whose name says it is a credential (token, key, secret, password,
  signature, credential, auth, sig, ...): `?X-Amz-Signature=abc&v=1` -> `?X-Amz-Signature=***&v=1`.
`redact_config(d)` runs it over every string of a nested config dict and blanks values whose key
names a credential (`SECRET_KEY_WORDS`).
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
SECRET_KEY_WORDS = ("secret", "password", "passwd", "token", "credential", "access_key", "api_key")

# scheme://userinfo@ : userinfo is anything up to '@' without '/', whitespace or quotes
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/\s@'\"<>?#]+)@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;][^=&;\s'\"#]*?(?:token|key|secret|passw|pwd|signature|sig|credential|auth)"
    r"[^=&;\s'\"#]*=)(?P<value>[^&;\s'\"#]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with URL credentials (user info, secret query values) replaced by `***`."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
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

"""Secrets out of every message: database URLs whose password may hold any character, and HTTP error texts.

A password written raw into a URL (`postgresql://user:Tr0ub4dor/x9@db/optuna`) makes the URL ambiguous:
`urlsplit` then reads part of the password as a port or a host and puts it into its error. So credentials are
split off first, at the last ``@`` of the URL, and the password is percent-encoded (`normalise_url`) before
any parser sees it; `redact_url` and `redact_text` hide it in anything shown. An ``@`` in a URL's path or
query after the credentials would be taken for their end: percent-encode it (``%40``) there.

This module imports nothing heavy, so every layer (CLI, storage, sweep, tracking) can use it.

>>> normalise_url("postgresql://optuna:Tr0ub4dor/x9@db:5432/studies")
'postgresql://optuna:Tr0ub4dor%2Fx9@db:5432/studies'
>>> redact_url("postgresql://optuna:Hunter2@pw@db/studies")
'postgresql://optuna:***@db/studies'
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote

REDACTED = "***"
_SECRET_WORDS = ("key", "secret", "password", "passwd", "token")
# Config keys that contain a secret word but name something public (a key *inside* a checkpoint, token sequences).
_PUBLIC_KEY_NAMES = frozenset({"checkpoint_key", "tokens"})

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# Schemes whose URLs are SQLAlchemy database URLs: the only ones whose password octft rewrites.
_DATABASE_DIALECTS = frozenset({"postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle"})
# scheme://user:password@ inside free text: the password runs to the token's last '@'.
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)(\S+)(@)")
# Request headers echoed back by a server or a proxy: the value is a credential whatever its form.
_AUTH_HEADER = re.compile(
    r"""(?i)(["']?(?:proxy-)?authorization["']?\s*[:=]\s*["']?)(?:(?:basic|bearer)\s+)?[^\s"',;}]+"""
)
_BASIC_TOKEN = re.compile(r"(?i)\b(basic|bearer)\s+[A-Za-z0-9+/=._\-]{8,}")


def _split(url: str) -> tuple[str, str, str | None, str] | None:
    """(scheme, user, password or None, host and the rest) when `url` carries credentials."""
    match = _SCHEME.match(url)
    if match is None:
        return None
    rest = url[match.end() :]
    at = rest.rfind("@")
    if at < 0 or rest.startswith("/"):
        return None
    user, colon, password = rest[:at].partition(":")
    if "/" in user:  # an '@' in a path (https://host/a@b), not credentials
        return None
    return match.group(1), user, password if colon else None, rest[at + 1 :]


def normalise_url(url: str) -> str:
    """A database URL with its password percent-encoded, so every URL parser reads it as the password.

    Idempotent (an encoded password stays as it is); URLs of other schemes come back unchanged.
    """
    parts = _split(url)
    if parts is None or parts[2] is None:
        return url
    scheme, user, password, rest = parts
    if scheme.split("+", 1)[0].lower() not in _DATABASE_DIALECTS:
        return url
    return f"{scheme}://{user}:{quote(unquote(password), safe='')}@{rest}"


def redact_url(url: str) -> str:
    """`url` with its password (any characters) replaced by `***`; URLs without one unchanged."""
    parts = _split(url)
    if parts is None or parts[2] is None:
        return url
    scheme, user, _, rest = parts
    return f"{scheme}://{user}:{REDACTED}@{rest}"


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Free text (an error message, a log tail) with URL passwords, echoed credentials and `secrets` hidden.

    Each secret is hidden raw, percent-encoded and base64-encoded; pass ``"id:key"`` pairs as one secret too,
    since HTTP Basic authorisation sends them base64-encoded together.

    >>> redact_text("401: echo {'Authorization': 'Basic a2V5aWQ6c2VjcmV0'}")
    "401: echo {'Authorization': '***'}"
    """
    for secret in secrets:
        if len(secret) < 4:  # too short to hide without mangling ordinary words
            continue
        encoded = base64.b64encode(secret.encode()).decode()
        for form in {secret, quote(secret, safe=""), encoded, encoded.rstrip("=")}:
            text = text.replace(form, REDACTED)
    text = _URL_PASSWORD.sub(rf"\1{REDACTED}\3", text)
    text = _AUTH_HEADER.sub(rf"\1{REDACTED}", text)
    return _BASIC_TOKEN.sub(rf"\1 {REDACTED}", text)


def is_secret_key(key: str) -> bool:
    """Whether a dotted key names a secret: one of its parts contains "key", "secret", "password" or "token"."""
    return any(word in part and part not in _PUBLIC_KEY_NAMES for part in key.lower().split(".") for word in _SECRET_WORDS)


def redact(value: Any, key: str = "") -> Any:
    """`value` with secrets hidden: anything under a secret-looking key, and passwords in URLs and texts.

    Dicts and lists are redacted recursively (a dict's keys decide for their values).

    >>> redact("s3cr3t", key="storage.b2_application_key")
    '***'
    >>> redact({"optim": {"lr_head": 0.001}, "b2": {"key_id": "0012ab"}})
    {'optim': {'lr_head': 0.001}, 'b2': {'key_id': '***'}}
    """
    if key and is_secret_key(key):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {name: redact(item, str(name)) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [redact(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value

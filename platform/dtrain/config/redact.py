"""Secrets never reach logs, params, files or command lines: the one redaction every writer of
text goes through (the console and the log, MLflow params and tags, config.yaml, checkpoints,
error lines, a search's trial command lines).

What is masked:
- a URL's password, `scheme://user:PASSWORD@host/...`, whatever it holds (a `/`, an `@`: the
  userinfo runs to the token's last `@`);
- a query parameter that names a secret, `?password=...`, `&token=...`, ...;
- every secret dtrain has been given (`register`): a password taken from a URL or from the
  environment (`MLFLOW_TRACKING_PASSWORD`), wherever it turns up later, e.g. in a database
  driver's error message.

Credentials are better kept out of URLs altogether: `split` takes them out of a tracking URI
(MLflow reads `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`), and `portable`
overrides (`dtrain.runtime.launch`) carry the ones that hold a password in the environment of
the processes they start, never on their command line. Imports nothing heavy.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

MASK = "***"
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s'\"<>`]*)")
_MASKED_KEYS = r"password|passwd|pwd|pass|token|secret|api_?key|access_?key|auth"
_QUERY = re.compile(rf"(?P<key>[?&;](?:{_MASKED_KEYS})=)(?P<value>[^&#\s'\"]*)", re.IGNORECASE)
_SECRETS: set[str] = set()
MIN_SECRET = 4
"""Shorter registered secrets are not masked in free text (they would mask ordinary words)."""


def register(secret: str) -> None:
    """Mask `secret` wherever it appears in text from now on (this process)."""
    if len(secret) >= MIN_SECRET:
        _SECRETS.add(secret)


def _userinfo(rest: str) -> tuple[str, str, str] | None:
    """(user, password, what follows the userinfo) of a URL's part after `scheme://`, or None."""
    at = rest.rfind("@")
    if at <= 0 or ":" not in rest[:at]:
        return None
    user, _, password = rest[:at].partition(":")
    return user, password, rest[at + 1 :]


def text(s: str) -> str:
    """`s` with every password in a URL, secret query parameter and registered secret masked."""

    def url(m: re.Match[str]) -> str:
        parts = _userinfo(m["rest"])
        if parts is None or not parts[1]:
            return m[0]
        register(parts[1])
        return f"{m['scheme']}{parts[0]}:{MASK}@{parts[2]}"

    def query(m: re.Match[str]) -> str:
        register(m["value"])
        return m["key"] + MASK

    s = _QUERY.sub(query, _URL.sub(url, s))
    for secret in sorted(_SECRETS, key=len, reverse=True):
        s = s.replace(secret, MASK)
    return s


def url(s: str) -> str:
    """`text`, for a URL (kept for what reads better at a call site that holds one)."""
    return text(s)


def has_password(s: str) -> bool:
    """A URL in `s` holds a password, or a query parameter names a secret (one masked already,
    `***`, is none)."""
    return any((p := _userinfo(m["rest"])) is not None and p[1] not in ("", MASK) for m in _URL.finditer(s)) or any(
        q["value"] != MASK for q in _QUERY.finditer(s)
    )


def split(uri: str) -> tuple[str, str, str]:
    """(the URI without its userinfo, user, password); the password is registered."""
    m = _URL.match(uri)
    parts = _userinfo(m["rest"]) if m else None
    if m is None or parts is None:
        return uri, "", ""
    register(parts[1])
    return f"{m['scheme']}{parts[2]}", parts[0], parts[1]


PRIVATE_OVERRIDES = "DTRAIN_PRIVATE_OVERRIDES"
"""The environment variable that carries the overrides holding a password to the processes a
command starts (JSON list), in place of their command line, which every local user can read."""


def portable(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the overrides for a command line, the environment that carries the others)."""
    public = [o for o in overrides if not has_password(o)]
    private = [o for o in overrides if has_password(o)]
    return public, ({PRIVATE_OVERRIDES: json.dumps(private)} if private else {})


def private_overrides() -> list[str]:
    """The overrides `portable` sent through the environment (registered: masked when shown)."""
    private = json.loads(os.environ.get(PRIVATE_OVERRIDES) or "[]")
    for o in private:
        text(o)  # registers the password it holds
    return [str(o) for o in private]


class LogFilter(logging.Filter):
    """Every log record's message through `text` (its arguments formatted in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = text(record.getMessage()), None
        return True


def redact_logs() -> None:
    """Every handler of the root logger (and the ones added to `dtrain`'s) masks secrets."""
    for logger in (logging.getLogger(), logging.getLogger("dtrain")):
        for handler in logger.handlers:
            if not any(isinstance(f, LogFilter) for f in handler.filters):
                handler.addFilter(LogFilter())


def tree(obj: Any) -> Any:
    """Every string inside dicts, lists and tuples passed through `text`."""
    if isinstance(obj, str):
        return text(obj)
    if isinstance(obj, dict):
        return {k: tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree(v) for v in obj)
    return obj

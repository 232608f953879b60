"""Secrets never reach logs, params or files: a password in a URL (a `--storage` database, a
`tracking.uri` with user:password@) is masked wherever dtrain writes or shows it."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@]*):(?P<password>[^@/]*)@")


def url(text: str) -> str:
    """`scheme://user:password@host/...` -> `scheme://user:***@host/...`; anything else unchanged."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


def has_password(text: str) -> bool:
    m = _USERINFO.match(text)
    return bool(m and m["password"])


def tree(obj: Any) -> Any:
    """Every string inside dicts and lists passed through `url`."""
    if isinstance(obj, str):
        return url(obj)
    if isinstance(obj, dict):
        return {k: tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree(v) for v in obj)
    return obj

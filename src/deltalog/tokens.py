"""Bearer tokens in files: what serve-snapshot serves with and an HTTP client sends (--token-file).

Read by both ends the same way, so a file one refuses the other refuses too.
"""

from __future__ import annotations

import os

from .errors import InvalidInput

MAX_TOKEN_BYTES = 4096


def read_token_file(path: str) -> str:
    """The bearer token held in ``path`` (surrounding whitespace ignored)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read token file ({exc.strerror or exc})") from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise InvalidInput(f"{path}: token file is larger than {MAX_TOKEN_BYTES} bytes")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise InvalidInput(
            f"{path}: token file must hold one token of printable ASCII without spaces",
            hint="e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE",
        )
    return token


def token_file_warning(path: str) -> str | None:
    """A warning if other users can read the token file, else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & 0o044:
        return f"token file {path} is readable by other users (chmod 600 {path})"
    return None

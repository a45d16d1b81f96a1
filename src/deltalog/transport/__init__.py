"""Transports: where a sync's SRC and DST live, and how to reach them.

A replica spec is parsed like rsync parses its arguments:

- ``http://...`` / ``https://...``: a ``serve-snapshot`` server (pull only);
- ``[user@]host:path`` (a colon before any slash): a replica on another
  machine, reached with ``ssh HOST deltalog serve --stdio PATH``;
- ``s3://``, ``gs://``, ``az://``, ``file://``: an object-store relay
  (deltalog.relay): pulled from like a source, published to by the CLI;
- anything else: a local directory.

Each scheme is a small module registered in :data:`SCHEMES` by dotted path
and imported lazily, so ``deltalog --help`` never loads a transport. A module
registered there provides ``open_source(spec, options)`` and, if it can be
written to, ``open_sink(spec, options)``; both return objects implementing
:class:`deltalog.transport.base.Source` / ``Sink``.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field

from ..errors import InvalidInput

# scheme -> module path (imported on first use). Registration point for new transports.
SCHEMES: dict[str, str] = {
    "local": "deltalog.transport.local",
    "ssh": "deltalog.transport.ssh",
    "http": "deltalog.transport.http",
    "https": "deltalog.transport.http",
    # object-store relays (deltalog.relay): pull here, publish through deltalog.relay.publish
    "s3": "deltalog.transport.relay",
    "gs": "deltalog.transport.relay",
    "az": "deltalog.transport.relay",
    "abfs": "deltalog.transport.relay",
    "file": "deltalog.transport.relay",
}

RELAY_SCHEMES = ("s3", "gs", "az", "abfs", "file")

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_SSH = re.compile(r"^(?P<host>(?:[^@/:\s]+@)?(?:\[[^\]/]+\]|[^@/:\s]+)):(?P<path>.*)$")


@dataclass
class TransportOptions:
    """Options a transport may honour (the rest ignore them)."""

    ssh_command: str = "ssh"  # like rsync -e
    remote_deltalog: str = "deltalog"  # like rsync --rsync-path
    timeout: float | None = None  # seconds of silence before a peer counts as gone
    token: str | None = None  # http bearer token
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Spec:
    scheme: str  # a key of SCHEMES
    text: str  # as the user wrote it
    host: str | None = None  # ssh: [user@]host
    path: str | None = None  # local path, or the remote path for ssh


def parse_spec(text: str) -> Spec:
    """Classify a SRC/DST argument as a local path, an ssh location or a URL."""
    if not text:
        raise InvalidInput("empty replica location")
    m = _URL.match(text)
    if m:
        scheme = m.group(1).lower()
        if scheme not in SCHEMES or scheme in ("local", "ssh"):
            raise InvalidInput(f"{text}: unsupported scheme {scheme!r}", hint="use a path, host:path or http(s)://")
        return Spec(scheme, text)
    m = _SSH.match(text)
    if m and not text.startswith(("/", "./", "../", "~")):
        path = m.group("path") or "."
        return Spec("ssh", text, host=m.group("host"), path=path)
    return Spec("local", text, path=text)


def _module(spec: Spec):
    try:
        return importlib.import_module(SCHEMES[spec.scheme])
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("deltalog.transport"):
            raise InvalidInput(f"{spec.text}: the {spec.scheme} transport is not available in this build") from None
        raise


def open_source(text: str, options: TransportOptions | None = None):
    """A Source for a SRC argument."""
    spec = parse_spec(text)
    return _module(spec).open_source(spec, options or TransportOptions())


def open_sink(text: str, options: TransportOptions | None = None):
    """A Sink for a DST argument (InvalidInput for pull-only schemes)."""
    spec = parse_spec(text)
    module = _module(spec)
    if not hasattr(module, "open_sink"):
        raise InvalidInput(f"{text}: cannot sync into a {spec.scheme} location", hint=f"{spec.scheme} is pull only")
    return module.open_sink(spec, options or TransportOptions())

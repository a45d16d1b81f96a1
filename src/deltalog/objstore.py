"""Object storage (S3, GCS, Azure, local directories) behind one small interface.

deltalog's relay (deltalog.relay) needs six operations of a bucket: get,
ranged get, conditional get (If-None-Match: the cheap poll), create-only put
(If-None-Match: *), compare-and-swap put (If-Match) and delete. obstore
(the Rust object_store crate) provides them with real request signing,
retries and multipart uploads for every cloud, so none of that is written
here; this module only maps its errors to deltalog's (exit codes) and fills
the one gap: a local directory (file://) has no compare-and-swap in
object_store, so it is done under an flock beside the objects.

Credentials and endpoints come from the environment the way each cloud's
own tools read them (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP,
GOOGLE_SERVICE_ACCOUNT, AZURE_STORAGE_ACCOUNT_NAME, ...).
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from urllib.parse import urlparse

from .errors import DeltalogError, InvalidInput, StorageError, TransportError

SCHEMES = ("s3", "gs", "az", "abfs", "file", "memory")


class PreconditionFailed(DeltalogError):
    """A conditional put lost: the object changed (or appeared) since it was read."""

    exit_code = 9
    hint = ("another publisher advanced the relay first; nothing of this run is named. If this replica "
            "is the relay's publisher, run it again")


class Missing(TransportError):
    """The object (or the whole bucket) does not exist."""


@dataclass
class Got:
    data: bytes
    etag: str | None


def _obstore():
    try:
        import obstore  # noqa: F401
        from obstore import store
    except ImportError:  # pragma: no cover - a dependency, but say what to do
        raise InvalidInput("object storage needs the obstore package", hint="pip install obstore") from None
    return obstore, store


class ObjectStore:
    """The objects under one URL prefix (``s3://bucket/prefix``, ``file:///dir``...)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        scheme = urlparse(url).scheme.lower()
        if scheme not in SCHEMES:
            raise InvalidInput(f"{url}: not an object store URL", hint="use s3://, gs://, az:// or file://")
        self.scheme = scheme
        obstore, store = _obstore()
        self._ob = obstore
        self.local_dir: str | None = None
        try:
            if scheme == "file":
                # file:///abs/dir, and also file://rel/dir (relative to the working directory:
                # what a user typing a path means, where a URL parser would take "rel" for a host)
                path = os.path.abspath(url[len("file://"):] or ".")
                os.makedirs(path, exist_ok=True)  # object_store wants the root to exist
                self.local_dir = path
                self._store = store.LocalStore(path, mkdir=True)
            elif scheme == "memory":
                self._store = store.MemoryStore()
            else:
                self._store = store.from_url(url)
        except OSError as exc:
            raise StorageError(f"{url}: cannot open ({exc})") from None
        except Exception as exc:  # obstore's configuration errors (bad URL, missing region...)
            raise InvalidInput(f"{url}: {_first_line(exc)}", hint="check the URL and the cloud's environment "
                               "variables (AWS_*, GOOGLE_*, AZURE_*)") from None

    # -- reads ---------------------------------------------------------------

    def get(self, key: str) -> Got:
        try:
            result = self._ob.get(self._store, key)
            return Got(bytes(result.bytes()), result.meta.get("e_tag"))
        except Exception as exc:
            raise self._error(exc, key, "read") from None

    def get_if_changed(self, key: str, etag: str | None) -> Got | None:
        """The object, or None when its ETag is still ``etag`` (a 304: no body crosses the network)."""
        if etag is None:
            return self.get(key)
        try:
            result = self._ob.get(self._store, key, options={"if_none_match": etag})
            got = Got(bytes(result.bytes()), result.meta.get("e_tag"))
        except self._ob.exceptions.NotModifiedError:
            return None
        except Exception as exc:
            raise self._error(exc, key, "read") from None
        return None if got.etag == etag else got  # stores that ignore If-None-Match

    def get_range(self, key: str, start: int, length: int) -> bytes:
        try:
            return bytes(self._ob.get_range(self._store, key, start=start, length=length))
        except Exception as exc:
            raise self._error(exc, key, "read") from None

    def list(self, prefix: str = "") -> list[str]:
        try:
            return [m["path"] for batch in self._ob.list(self._store, prefix=prefix or None) for m in batch]
        except Exception as exc:
            raise self._error(exc, prefix, "list") from None

    # -- writes --------------------------------------------------------------

    def put_new(self, key: str, data: bytes) -> bool:
        """Create ``key`` (If-None-Match: *). False when it exists already (left as it is)."""
        try:
            self._ob.put(self._store, key, data, mode="create")
            return True
        except self._ob.exceptions.AlreadyExistsError:
            return False
        except Exception as exc:
            raise self._error(exc, key, "write") from None

    def put_file(self, key: str, path: str) -> None:
        """Upload a local file (multipart when large: obstore decides), replacing any object there."""
        try:
            with open(path, "rb") as f:
                self._ob.put(self._store, key, f)
        except OSError as exc:
            raise StorageError(f"{path}: cannot read ({exc.strerror})") from None
        except Exception as exc:
            raise self._error(exc, key, "write") from None

    def put_if(self, key: str, data: bytes, etag: str | None) -> str | None:
        """Write ``key`` only if it still has ``etag`` (None: only if it does not exist); its new ETag.

        PreconditionFailed when another writer got there first.
        """
        if self.local_dir is not None:
            return self._local_put_if(key, data, etag)
        mode = "create" if etag is None else {"e_tag": etag}
        try:
            return self._ob.put(self._store, key, data, mode=mode).get("e_tag")
        except (self._ob.exceptions.AlreadyExistsError, self._ob.exceptions.PreconditionError):
            raise PreconditionFailed(f"{self.url}/{key} changed while it was being advanced") from None
        except Exception as exc:
            raise self._error(exc, key, "write") from None

    def _local_put_if(self, key: str, data: bytes, etag: str | None) -> str | None:
        # object_store's LocalStore has no If-Match: the same check under an flock
        # that every deltalog publisher to this directory takes.
        lock_path = os.path.join(self.local_dir, ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = self._ob.head(self._store, key).get("e_tag")
            except FileNotFoundError:
                current = None
            except Exception as exc:
                raise self._error(exc, key, "read") from None
            if current != etag:
                raise PreconditionFailed(f"{self.url}/{key} changed while it was being advanced")
            try:
                return self._ob.put(self._store, key, data, mode="overwrite").get("e_tag")  # temp file + rename
            except Exception as exc:
                raise self._error(exc, key, "write") from None

    def delete(self, key: str) -> None:
        try:
            self._ob.delete(self._store, key)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._error(exc, key, "delete") from None

    # -- errors --------------------------------------------------------------

    def _error(self, exc: Exception, key: str, what: str) -> DeltalogError:
        text = _first_line(exc)
        where = f"{self.url}/{key}"
        if "NoSuchBucket" in str(exc):
            return Missing(f"{self.url}: the bucket does not exist", hint="create it, or check the URL")
        if isinstance(exc, FileNotFoundError):
            return Missing(f"{where}: not found")
        if any(s in str(exc) for s in ("403 Forbidden", "401 Unauthorized", "InvalidAccessKeyId",
                                       "SignatureDoesNotMatch", "AccessDenied")):
            return TransportError(f"{where}: access denied ({what})",
                                  hint="check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the "
                                       "cloud's equivalent) and the bucket policy")
        if isinstance(exc, PermissionError):
            return StorageError(f"{where}: permission denied ({what})")
        return TransportError(f"{where}: cannot {what} ({text})")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else exc.__class__.__name__

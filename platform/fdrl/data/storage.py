"""Every path a user gives, local or on an object store (``s3://bucket/prefix``, ``gs://…``).

One small API over ``pyarrow.fs`` so the rest of the code never builds a ``pathlib.Path`` from a
URI. Local paths stay plain strings (absolute after ``resolve``); ``file://`` URIs become local
paths. Object stores are reached with ``FileSystem.from_uri``, which (unlike the bare
``S3FileSystem()`` constructor) honours ``AWS_ENDPOINT_URL_S3``; credentials come from the usual
chain (environment, ``~/.aws``, the instance role).

Guarantees:
- Writes are complete or absent. Local: temp file in the same folder, fsync, ``os.replace``, fsync
  of the folder. Object store: the object appears only when its upload completes.
- Every failure is a ``StorageError`` (an ``OSError``) whose one-line message names the path and
  the cause: unknown scheme, missing bucket, wrong or missing credentials, unreachable endpoint,
  permission denied, full disk. A missing file is ``StorageNotFoundError``, also a
  ``FileNotFoundError``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fnmatch
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.fs as pafs

SCHEMES = ("s3", "gs")  # object stores; pyarrow also knows "gcs" etc., we keep one name each
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
_CHUNK = 8 << 20  # streamed copies move 8 MiB at a time
_LOCAL = pafs.LocalFileSystem()


class StorageError(OSError):
    """A storage operation failed; ``str()`` names the path and the cause in one line."""

    def __init__(self, path: str, reason: str, action: str = "use", code: int | None = None):
        super().__init__(f"cannot {action} {path}: {reason}")
        self.path, self.reason, self.action = path, reason, action
        if code is not None:
            self.errno = code  # only errno: setting filename would change str()

    def __reduce__(self):  # Ray sends exceptions between processes by pickling them
        return type(self), (self.path, self.reason, self.action, self.errno)


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The file, folder or bucket is not there."""


# ---------------------------------------------------------------------------------------------
# Paths


def is_uri(path) -> bool:
    """True for ``scheme://…`` other than ``file://`` (unknown schemes too: they must fail loudly
    in ``resolve`` rather than become a local folder named ``foo:``)."""
    m = _URI.match(os.fspath(path))
    return bool(m) and m.group(1).lower() != "file"


def resolve(path) -> str:
    """Local path → absolute, ``~`` expanded. URI → ``scheme://bucket/key`` without empty parts or
    a trailing slash. Raises ``StorageError`` for an unknown scheme or a malformed URI."""
    path = os.fspath(path)
    if not path:
        raise StorageError("''", "empty path", "resolve")
    m = _URI.match(path)
    if not m:
        return os.path.abspath(os.path.expanduser(path))
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file":
        if not rest.startswith("/"):  # file://host/x: a remote host we cannot reach
            raise StorageError(path, "file:// URIs must be absolute (file:///path)", "resolve")
        return os.path.abspath(rest)
    if scheme not in SCHEMES:
        valid = ", ".join(f"{s}://" for s in SCHEMES)
        raise StorageError(path, f"unknown storage scheme '{scheme}://' (use a local path, "
                                 f"file://, {valid})", "resolve")
    if "?" in rest or "#" in rest:  # pyarrow would read them as options; keep configuration in env
        raise StorageError(path, "query strings are not supported (set the endpoint with "
                                 "AWS_ENDPOINT_URL_S3)", "resolve")
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    if not parts:
        raise StorageError(path, "no bucket in the URI", "resolve")
    if ".." in parts:
        raise StorageError(path, "'..' is not allowed in an object-store URI", "resolve")
    return f"{scheme}://" + "/".join(parts)


def _local(path: str) -> str:
    """A local path with file:// stripped and ~ expanded, not made absolute."""
    return resolve(path) if _URI.match(path) else os.path.expanduser(path)


def join(base, *parts: str) -> str:
    """``base/part/…``. Parts are always relative: unlike ``os.path.join``, a leading ``/`` does
    not start over at the root (locally or in a bucket)."""
    base = os.fspath(base)
    if is_uri(base):
        return resolve("/".join([base, *parts]))
    return os.path.join(_local(base), *(p.lstrip("/") for p in parts))


def name(path) -> str:
    """The last component (the bucket for a bucket root)."""
    path = os.fspath(path)
    if is_uri(path):
        return resolve(path).rsplit("/", 1)[-1]
    return os.path.basename(os.path.normpath(_local(path)))


def parent(path) -> str:
    """The folder that holds ``path``; a bucket root is its own parent, like ``/``."""
    path = os.fspath(path)
    if is_uri(path):
        uri = resolve(path)
        head, _, _ = uri.partition("://")[2].rpartition("/")
        return f"{uri.partition('://')[0]}://{head}" if head else uri
    return str(Path(_local(path)).parent)


# ---------------------------------------------------------------------------------------------
# Filesystems: one per (scheme, bucket, configuring environment) and process

# Changing these variables (a test's wrong secret, another endpoint) must give a new client; the
# key holds only a digest of them, never a secret itself.
_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
        "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST")
_CACHE: dict[tuple, pafs.FileSystem] = {}
_CACHE_LOCK = threading.Lock()


def _env_digest() -> str:
    return hashlib.sha256("\0".join(os.environ.get(k, "") for k in _ENV).encode()).hexdigest()


def _drop_cache() -> None:
    """An S3FileSystem still referenced when pyarrow finalizes S3 at exit can hang the
    interpreter (apache/arrow#50188). atexit runs handlers last-in first-out, and pyarrow.fs
    registered its finalizer on import, before this module: so this runs first."""
    with _CACHE_LOCK:
        _CACHE.clear()


atexit.register(_drop_cache)


def filesystem(path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``path`` and the path inside it (``bucket/key`` on an object
    store, the absolute path locally): what Ray Train's ``RunConfig(storage_path=…,
    storage_filesystem=…)`` takes. Callers that keep the filesystem should drop it before exit."""
    path = resolve(path)
    if not is_uri(path):
        return _LOCAL, path
    scheme, inner = path.split("://", 1)
    bucket = inner.split("/", 1)[0]
    key = (scheme, bucket, os.getpid(), _env_digest())  # pid: never reuse a client across fork
    with _CACHE_LOCK:
        fs = _CACHE.get(key)
    if fs is None:
        with _errors(path, "connect to"):
            fs = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]
        with _CACHE_LOCK:
            fs = _CACHE.setdefault(key, fs)
    return fs, inner


# ---------------------------------------------------------------------------------------------
# Errors: pyarrow's texts ("AWS Error ACCESS_DENIED during HeadObject…") → one clear cause

# Substrings of the SDKs' error texts (AWS codes in both spellings; GCS status names).
_MISSING_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket")
_UNREACHABLE = ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Couldn't resolve host",
                "Connection refused", "Timeout was reached", "UNAVAILABLE")
_CREDENTIAL_CAUSES = [
    (("INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId"),
     "wrong credentials: the endpoint does not know this access key id (check "
     "AWS_ACCESS_KEY_ID, ~/.aws or the instance role)"),
    (("SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch"),
     "wrong credentials: the secret key does not match the access key id (check "
     "AWS_SECRET_ACCESS_KEY)"),
    (("EXPIRED_TOKEN", "ExpiredToken", "TokenRefreshRequired"),
     "the credentials have expired"),
    # A refused HEAD request has no body, so S3 cannot say more than this.
    (("ACCESS_DENIED", "AccessDenied", "Forbidden", "INVALID_CLIENT_TOKEN_ID",
      "PERMISSION_DENIED", "UNAUTHENTICATED"),
     "access denied: credentials missing or wrong, or not allowed on this path (check "
     "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the instance role's policy)"),
]
_LOCAL_CAUSES = {
    errno.ENOSPC: "the storage is full (no space left on device)",
    errno.EDQUOT: "the storage is full (disk quota exceeded)",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only filesystem",
    errno.ENOTDIR: "a component of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
}


def _bucket(path: str) -> str:
    return path.split("://", 1)[1].split("/", 1)[0]


def _bucket_root(path: str) -> str:
    return f"{path.split('://', 1)[0]}://{_bucket(path)}"


def _endpoint(path: str) -> str:
    if path.startswith("s3://"):
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL") or "the AWS S3 endpoint"
    return os.environ.get("STORAGE_EMULATOR_HOST") or "the Google Cloud Storage endpoint"


def _bucket_missing(path: str, action: str) -> StorageNotFoundError:
    return StorageNotFoundError(path, f"bucket '{_bucket(path)}' does not exist (create it, or "
                                      "check the name)", action, errno.ENOENT)


def _not_found(path: str, action: str) -> StorageNotFoundError:
    """A missing key on an object store is often a missing bucket: say which."""
    if is_uri(path):
        try:
            fs, _ = filesystem(path)
            if fs.get_file_info(_bucket(path)).type == pafs.FileType.NotFound:
                return _bucket_missing(path, action)
        except (OSError, pa.ArrowException):
            pass  # the first error is the one to report
    return StorageNotFoundError(path, "no such file or folder", action, errno.ENOENT)


def _classify(exc: BaseException, path: str, action: str) -> StorageError:
    text, code = str(exc), getattr(exc, "errno", None)
    if is_uri(path):
        if any(n in text for n in _MISSING_BUCKET) or re.search(r"Bucket '[^']*' not found", text):
            return _bucket_missing(path, action)  # the second: create_dir's own wording
        for needles, cause in _CREDENTIAL_CAUSES:
            if any(n in text for n in needles):
                return StorageError(path, cause, action, errno.EACCES)
        if any(n in text for n in _UNREACHABLE):  # keep the SDK's short reason
            m = re.search(r"operation: (?:curlCode: \d+, )?([^;\n]+)", text)
            detail = m.group(1).strip() if m else _first_line(text)
            return StorageError(path, f"cannot reach the storage endpoint {_endpoint(path)} "
                                      f"({detail})", action)
    if isinstance(exc, FileNotFoundError) or code == errno.ENOENT:
        return _not_found(path, action)
    if code in _LOCAL_CAUSES:
        return StorageError(path, _LOCAL_CAUSES[code], action, code)
    return StorageError(path, _first_line(text), action, code)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


@contextlib.contextmanager
def _errors(path: str, action: str) -> Iterator[None]:
    """Turn pyarrow's and the OS's errors into a StorageError that names ``path``."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise _classify(exc, path, action) from exc


def _info(path: str, action: str = "look up") -> pafs.FileInfo:
    fs, inner = filesystem(path)
    with _errors(path, action):
        return fs.get_file_info(inner)


# ---------------------------------------------------------------------------------------------
# Queries


def exists(path) -> bool:
    return _info(resolve(path)).type != pafs.FileType.NotFound


def is_file(path) -> bool:
    return _info(resolve(path)).type == pafs.FileType.File


def is_dir(path) -> bool:
    return _info(resolve(path)).type == pafs.FileType.Directory


def mtime(path) -> float:
    """Modification time in seconds since the epoch. Object-store folders have none."""
    path = resolve(path)
    info = _info(path)
    if info.type == pafs.FileType.NotFound:
        raise _not_found(path, "get the modification time of")
    if info.mtime is None:
        raise StorageError(path, "this storage keeps no modification time for it",
                           "get the modification time of")
    return info.mtime.timestamp()


def size(path) -> int:
    """The size of a file in bytes (one metadata request on an object store)."""
    path = resolve(path)
    info = _info(path)
    if info.type == pafs.FileType.NotFound:
        raise _not_found(path, "get the size of")
    if info.type != pafs.FileType.File:
        raise StorageError(path, "is a folder, not a file", "get the size of")
    return info.size


def listdir(path) -> list[str]:
    """Names of the direct children, sorted; ``[]`` for a folder that is not there (a missing
    bucket is still an error)."""
    path = resolve(path)
    fs, inner = filesystem(path)
    with _errors(path, "list"):
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
    # allow_not_found also hides a missing bucket: a typo must not look like an empty folder.
    if not infos and is_uri(path) and _info(_bucket_root(path)).type == pafs.FileType.NotFound:
        raise _bucket_missing(path, "list")
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def glob(path, pattern: str) -> list[str]:
    """Full paths of the direct children whose names match ``pattern`` (fnmatch), sorted."""
    path = resolve(path)
    return [join(path, n) for n in listdir(path) if fnmatch.fnmatchcase(n, pattern)]


def latest_folder(root, pattern: str, marker: str) -> Optional[str]:
    """The name of the folder under ``root`` matching ``pattern`` whose ``marker`` file was
    written last (a run's run-info file, for --resume), or None."""
    if not is_dir(root):
        return None
    found = [(mtime(join(folder, marker)), name(folder)) for folder in glob(root, pattern)
             if is_file(join(folder, marker))]
    return max(found)[1] if found else None


# ---------------------------------------------------------------------------------------------
# Reading and writing


def read_bytes(path) -> bytes:
    path = resolve(path)
    fs, inner = filesystem(path)
    with _errors(path, "read"), fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


def write_bytes(path, data) -> None:
    """Write ``data`` complete or not at all; parent folders are created (locally)."""
    if isinstance(data, str):
        raise TypeError("write_bytes takes bytes; use write_text for str")
    data = memoryview(data)  # a wrong type fails here, not inside an upload that would complete
    path = resolve(path)
    if not is_uri(path):
        _write_local(path, [data])
        return
    # One upload of an in-memory buffer: S3/GCS show the object only once it is complete. (Only
    # an interrupt between opening and the single write could still publish an empty object.)
    fs, inner = filesystem(path)
    with _errors(path, "write"), fs.open_output_stream(inner) as out:
        out.write(data)


def write_text(path, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def fsync_dir(folder) -> None:
    """Make a rename or a new file in ``folder`` durable (its entry, not only the file's data)."""
    folder = os.fspath(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_local(path: str, chunks: Iterable[bytes]) -> None:
    """Temp file beside ``path``, fsync, rename over it, fsync the folder: after a crash or a
    full disk, ``path`` is the old file or the complete new one, never a part."""
    folder = os.path.dirname(path)
    with _errors(path, "write"):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; others on the node read caches
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(folder)


def _chunks(fs: pafs.FileSystem, inner: str, path: str) -> Iterator[bytes]:
    """The bytes of ``path`` in chunks; read errors name the source, not the destination."""
    with _errors(path, "read"):
        stream = fs.open_input_stream(inner)
    with stream:
        while True:
            with _errors(path, "read"):
                chunk = stream.read(_CHUNK)
            if not chunk:
                return
            yield chunk


def copy_file(src, dst) -> None:
    """Copy one file between any two places, streamed; ``dst`` is complete or absent.

    To an object store the upload goes to a hidden temporary key beside ``dst`` and is then
    renamed (a server-side copy): an exception in the middle of a streamed upload would
    otherwise still complete it, publishing a partial object (pyarrow cannot abort an upload).
    S3 copies objects up to 5 GiB this way.
    """
    src, dst = resolve(src), resolve(dst)
    sfs, sinner = filesystem(src)
    _expect(src, pafs.FileType.File, "copy", "is a folder (use put_dir/get_dir)")
    if not is_uri(dst):
        _write_local(dst, _chunks(sfs, sinner, src))
        return
    dfs, dinner = filesystem(dst)
    tmp = posixpath.join(posixpath.dirname(dinner),
                         f".{posixpath.basename(dinner)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with _errors(dst, "write"):
            with dfs.open_output_stream(tmp) as out:
                for chunk in _chunks(sfs, sinner, src):
                    out.write(chunk)
            dfs.move(tmp, dinner)
    except BaseException:
        with contextlib.suppress(OSError, pa.ArrowException):
            dfs.delete_file(tmp)
        raise


def put_file(local_path, dest) -> None:
    """Upload (or copy) one file; ``dest`` is the full destination path, not a folder."""
    copy_file(local_path, dest)


def get_file(src, local_path) -> None:
    """Download (or copy) one file to ``local_path`` atomically."""
    copy_file(src, local_path)


def copy_tree(src, dst) -> None:
    """Copy the files under folder ``src`` to the same relative paths under ``dst``. Each file
    is atomic; the tree as a whole is not (files already at ``dst`` that ``src`` lacks stay)."""
    src, dst = resolve(src), resolve(dst)
    fs, inner = filesystem(src)
    _expect(src, pafs.FileType.Directory, "copy", "is a file, not a folder (use put_file/get_file)")
    with _errors(src, "list"):
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    prefix = inner.rstrip("/") + "/"
    if not is_uri(dst):
        os.makedirs(dst, exist_ok=True)
    for i in sorted(infos, key=lambda i: i.path):
        rel = i.path[len(prefix):]
        if i.type == pafs.FileType.File:
            copy_file(join(src, rel), join(dst, rel))
        elif not is_uri(dst):  # keep empty folders locally; object stores have no folders
            os.makedirs(join(dst, rel), exist_ok=True)


def put_dir(local_dir, dest) -> None:
    copy_tree(local_dir, dest)


def get_dir(src, local_dir) -> None:
    copy_tree(src, local_dir)


# ---------------------------------------------------------------------------------------------
# Folders and removal


def makedirs(path) -> None:
    """Create the folder and its parents (on an object store: empty ``folder/`` markers)."""
    path = resolve(path)
    fs, inner = filesystem(path)
    if is_uri(path) and "/" not in inner:  # a bucket root: we never create buckets
        if _info(path).type == pafs.FileType.NotFound:
            raise _bucket_missing(path, "create")
        return
    with _errors(path, "create"):
        fs.create_dir(inner, recursive=True)


def remove(path, missing_ok: bool = False) -> None:
    """Delete one file."""
    path = resolve(path)
    fs, inner = filesystem(path)
    if _removable(path, missing_ok, pafs.FileType.File, "is a folder (use remove_tree)"):
        with _errors(path, "remove"):
            fs.delete_file(inner)


def remove_tree(path, missing_ok: bool = False) -> None:
    """Delete a folder and everything under it. Refuses a bucket root: pyarrow would empty the
    bucket before refusing to delete it."""
    path = resolve(path)
    fs, inner = filesystem(path)
    if is_uri(path) and "/" not in inner:
        raise StorageError(path, "refusing to delete a whole bucket", "remove")
    if _removable(path, missing_ok, pafs.FileType.Directory, "is a file (use remove)"):
        with _errors(path, "remove"):
            fs.delete_dir(inner)


def _removable(path: str, missing_ok: bool, want, why: str) -> bool:
    """Whether ``path`` is there to delete: False for a missing path when ``missing_ok``, an
    error when it is missing otherwise or not of type ``want``."""
    info = _info(path)
    if info.type == pafs.FileType.NotFound and missing_ok:
        return False
    _expect(path, want, "remove", why, info)
    return True


def _expect(path: str, want, action: str, why: str, info=None) -> None:
    """Raise, naming ``path``, unless it is there and of type ``want``."""
    info = info or _info(path)
    if info.type == pafs.FileType.NotFound:
        raise _not_found(path, action)
    if info.type != want:
        raise StorageError(path, why, action)


# ---------------------------------------------------------------------------------------------
# Checks before a long job starts, and the per-node cache


def check_writable(path) -> None:
    """Create the folder, write and delete a small probe: a job that will write there fails now,
    with one message naming the cause, instead of after an hour of training."""
    path = resolve(path)
    try:
        makedirs(path)
        probe = join(path, f".fdrl-write-probe-{uuid.uuid4().hex[:12]}")
        write_bytes(probe, b"probe")
        remove(probe)
    except StorageError as e:
        raise type(e)(path, e.reason, "write to", e.errno) from e


def check_readable(path) -> None:
    """The file (first byte) or folder (its listing) can be read; else one clear StorageError."""
    path = resolve(path)
    info = _info(path, "read")
    if info.type == pafs.FileType.NotFound:
        raise _not_found(path, "read")
    fs, inner = filesystem(path)
    if info.type == pafs.FileType.File:
        with _errors(path, "read"), fs.open_input_stream(inner) as f:
            f.read(1)
    else:
        with _errors(path, "read"):
            fs.get_file_info(pafs.FileSelector(inner, recursive=False))


def local_copy(path, cache_dir, key: str) -> Path:
    """A local path for ``path``: itself if local (made absolute), else a copy downloaded once to
    ``cache_dir/key/<name>`` (a file or a folder). ``key`` must identify the content (a hash, a
    run id): a cached copy is never compared with the remote again. Downloads go to a temporary
    name and are renamed into place, so concurrent processes on a node are safe."""
    path = os.fspath(path)
    if not is_uri(path):
        return Path(resolve(path))
    if not key or os.path.isabs(key) or ".." in Path(key).parts:
        raise ValueError(f"local_copy key must be a relative name without '..', got {key!r}")
    path = resolve(path)
    dest = os.path.join(resolve(cache_dir), key, name(path))
    if os.path.exists(dest):
        return Path(dest)
    if is_dir(path):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(dest), prefix=f".{name(path)}.", suffix=".tmp")
        try:
            copy_tree(path, tmp)
            os.rename(tmp, dest)  # fails if another process put its complete copy there first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(dest):
                raise
    else:
        copy_file(path, dest)
    return Path(dest)


def node_copy(path) -> Path:
    """A local path for ``path``: itself if local, else a copy downloaded once per node into the
    node's cache (``fdrl.env.cache_dir``), keyed by the URI. For files named by what determines
    them (fitted priors, FID reference statistics, classifier weights), which never change."""
    from fdrl.env import cache_dir

    if not is_uri(path):
        return Path(resolve(path))
    return local_copy(path, cache_dir(), hashlib.sha256(resolve(path).encode()).hexdigest()[:16])


@contextlib.contextmanager
def staged_dir(dest) -> Iterator[Path]:
    """A local folder to write a job's outputs into: ``dest`` itself when it is local, else a
    temporary folder whose files are uploaded to ``dest`` when the block succeeds."""
    if not is_uri(dest):
        path = Path(resolve(dest))
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="fdrl-out-") as tmp:
        yield Path(tmp)
        put_dir(tmp, dest)

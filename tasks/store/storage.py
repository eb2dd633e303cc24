"""The object store: the one module that knows URIs, paths and boto3.

Two backends behind one interface: a local directory (the embedded default)
and S3 (any S3-compatible endpoint). Which key holds what is the lake index's
business (``tasks/store/lake.py``); this module only moves bytes under keys.

Writes are atomic. Locally a temp file in the same directory is renamed over
the target; on S3 an object only appears after a single PUT or a completed
multipart upload. A reader never sees half an object.

A local directory may hold what is not an object: named pipes, devices, sockets,
symbolic links to nothing or to folders. Listings leave them out (a drop's listing
names them, ``irregular=True``, so they are rejected with a reason), reads refuse them
before opening anything that could block, and entries that vanish while a folder is
listed are left out instead of failing the listing. Local ETags are size, mtime,
inode and ctime, so a same-size rewrite that keeps the mtime (``cp -p``, ``rsync -a``)
is a new version. S3 requests have connect and read timeouts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.settings import Settings, load_settings

TMP_PREFIX = ".tmp-"


# --- keys ---------------------------------------------------------------------


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ValueError."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid key {key!r}: empty")
    if "\x00" in key or "\\" in key:
        raise ValueError(f"invalid key {key!r}: NUL or backslash")
    if key.startswith("/"):
        raise ValueError(f"invalid key {key!r}: absolute path")
    for part in key.split("/"):
        if part == "":
            raise ValueError(f"invalid key {key!r}: empty path segment")
        if part in (".", ".."):
            raise ValueError(f"invalid key {key!r}: '{part}' segment")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key that may end with '/'."""
    if prefix:
        validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


class ObjectNotFound(FileNotFoundError):
    """The key has no object in the store."""


class StoreUnavailable(ValueError):
    """The store cannot be used at all (no credentials, endpoint, bucket or permission)."""


class PreconditionFailed(Exception):
    """A conditional write lost: the object already exists, or changed since it was read."""


class NotRegularFile(ValueError):
    """A local key names a named pipe, device, socket or a symbolic link to nothing:
    never opened for reading. ``what`` says which."""

    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}, not a regular file — remove it or replace it")
        self.what = what


class TooLarge(ValueError):
    """The object is larger than the reader's limit; nothing of it was read."""

    def __init__(self, where: str, size: int, limit: int):
        super().__init__(f"{where}: {size} bytes, over the limit of {limit}")
        self.size, self.limit = size, limit


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    irregular: str = ""  # local only: why this entry is not a file to read ("" for objects)
    mtime: float = 0.0  # when it was last written (seconds since the epoch): S3's LastModified


def _irregular(st: os.stat_result, linked: bool) -> str:
    """What a non-regular directory entry is, in words."""
    mode = st.st_mode
    if stat.S_ISFIFO(mode):
        what = "a named pipe (FIFO)"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        what = "a device"
    elif stat.S_ISSOCK(mode):
        what = "a socket"
    elif stat.S_ISLNK(mode):
        return "a symbolic link to nothing"
    elif stat.S_ISDIR(mode):
        return "a symbolic link to a folder (not followed)"
    else:
        what = f"a special file (mode {stat.filemode(mode)})"
    return f"{what} behind a symbolic link" if linked else what


def local_etag(st: os.stat_result) -> str:
    """A local file's version: size, mtime, inode and ctime. Every write of the store
    makes a new inode (a temp file renamed into place); a rewrite in place that keeps
    size and mtime (``cp -p``, ``rsync -a``) still changes the ctime."""
    return f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}-{st.st_ctime_ns:x}"


# --- the interface ------------------------------------------------------------


class Store(ABC):
    """put/get/list/delete by key; subclasses own one backend each."""

    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write only if no object exists at ``key``; True if this call wrote it."""

    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """(body, version token) of an object, for a later ``put_if_match``."""

    @abstractmethod
    def put_if_match(self, key: str, data: bytes, token: str | None) -> bool:
        """Replace the object only if it is still the version ``token`` names (``None``:
        only if there is none); True if this call wrote it. A lost response can make a
        retried write report False although it was applied: callers that must know
        put their own id in the object and read it back."""

    @abstractmethod
    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; with ``max_bytes``, TooLarge before reading anything when
        the object is larger."""

    def sha256(self, key: str) -> str:
        """The SHA-256 of an object's bytes."""
        return hashlib.sha256(self.get_bytes(key)).hexdigest()

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> None: ...

    @abstractmethod
    def get_file(self, key: str, path: str | os.PathLike) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "", irregular: bool = False) -> Iterator[ObjectInfo]:
        """Every object under ``prefix``, in key order, however many pages. Locally,
        ``irregular`` also yields entries that are not files to read (named pipes,
        devices, sockets, links to nothing or to folders), with ``ObjectInfo.irregular``
        saying what they are; objects that vanish while listing are left out."""

    @abstractmethod
    def list_folders(self, prefix: str) -> list[str]:
        """The names of the folders right under ``prefix`` (which ends with '/'), sorted:
        one delimiter listing on S3 (its common prefixes), one directory read locally
        (real folders only: links are not followed)."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def uri_for(self, key: str) -> str: ...

    def link_for(self, key: str, expires_s: int = 7 * 24 * 3600) -> str:
        """Something a person can open: a path locally, a presigned URL on S3."""
        return self.uri_for(key)

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json_bytes(obj))

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def keys(self, prefix: str = "") -> list[str]:
        return [o.key for o in self.list(prefix)]

    def delete_prefix(self, prefix: str) -> int:
        n = 0
        for info in list(self.list(prefix)):
            self.delete(info.key)
            n += 1
        return n

    def temp_files(self) -> Iterator[ObjectInfo]:
        """Hidden files that writes leave behind (LocalStore); S3 writes leave none."""
        return iter(())

    def remove_temp(self, key: str) -> bool:
        raise NotImplementedError(f"{self.uri}: holds no temp files")

    def check(self, existing: bool = False) -> None:  # noqa: B027 - see LocalStore
        """Fail fast, with one line saying what to do, when the store cannot be used
        (``existing``: for a command that only reads, also when it holds nothing yet)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


# --- local directory ----------------------------------------------------------


class LocalStore(Store):
    """A directory on disk; temp file + rename makes every write atomic."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def check(self, existing: bool = False) -> None:
        """A directory is made on the first write; a command that only reads says when
        it is not there (a mistyped --store), instead of finding nothing in it."""
        if existing and not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise StoreUnavailable(f"{self.root}: the store directory {what} — check --store "
                                   "or VGGPRICE_STORE (vggprice run creates a store)")  # fmt: skip

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if self.root not in path.parents:
            raise ValueError(f"invalid key {key!r}: resolves outside the store")
        return path

    def _write_tmp(self, path: Path, data: bytes | None, src: Path | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                if src is not None:
                    with open(src, "rb") as s:
                        while chunk := s.read(1 << 20):
                            f.write(chunk)
                else:
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        os.replace(self._write_tmp(path, bytes(data)), path)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._write_tmp(path, bytes(data))
        try:
            os.link(tmp, path)  # atomic, and fails if the target exists
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        body = self.get_bytes(key)
        return body, hashlib.sha256(body).hexdigest()

    def put_if_match(self, key: str, data: bytes, token: str | None) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # One writer at a time per key: an exclusive lock on a hidden sibling file
        # (hidden like temp files, so listings never show it).
        with _locked(path.parent / f"{TMP_PREFIX}lock-{path.name}"):
            try:
                current = self.sha256(key)
            except ObjectNotFound:
                current = None
            if current != token:
                return False
            self.put_bytes(key, data)
            return True

    def temp_files(self) -> Iterator[ObjectInfo]:
        """The hidden files the store's own writes leave behind when a process dies: temp
        files (renamed into place once whole) and lock files (``put_if_match``); their
        keys, relative to the root, are only for ``remove_temp``."""
        for folder, _, files in os.walk(self.root):
            for name in sorted(n for n in files if n.startswith(TMP_PREFIX)):
                path = Path(folder) / name
                try:
                    st = path.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    key = path.relative_to(self.root).as_posix()
                    yield ObjectInfo(key, st.st_size, local_etag(st), mtime=st.st_mtime)

    def remove_temp(self, key: str) -> bool:
        """Remove a hidden file of ``temp_files``; a lock file only while no writer holds
        it (``_locked`` then opens a new one). False when it was kept."""
        path = self._path(key)
        if not path.name.startswith(TMP_PREFIX):
            raise ValueError(f"{path}: not a temp file of the store")
        if not path.name.startswith(f"{TMP_PREFIX}lock-"):
            path.unlink(missing_ok=True)
            return True
        try:
            with open(path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink(missing_ok=True)  # while locked: a waiter sees it gone, reopens
                return True
        except (BlockingIOError, FileNotFoundError):
            return False

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        target = self._path(key)
        os.replace(self._write_tmp(target, None, src=Path(path)), target)

    def _open(self, key: str, max_bytes: int | None = None):
        """A binary file object of a regular file (a symbolic link to one is followed).
        Checked from a stat first, so a named pipe, device or socket is never opened,
        and checked again on the open descriptor (non-blocking), so one swapped in
        between cannot block either; TooLarge, from the size, before any read."""
        where = str(self.root / validate_key(key))
        if os.path.islink(where) and not os.path.exists(where):
            raise NotRegularFile(where, "a symbolic link to nothing")
        path = self._path(key)  # (a link that leads out of the store is refused here)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ObjectNotFound(f"{where}: no such object") from None
        except NotADirectoryError:
            raise ObjectNotFound(f"{where}: no such object") from None
        if stat.S_ISDIR(st.st_mode):
            raise ObjectNotFound(f"{where}: no such object (a folder)")
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(where, _irregular(st, os.path.islink(where)))
        if max_bytes is not None and st.st_size > max_bytes:
            raise TooLarge(where, st.st_size, max_bytes)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectNotFound(f"{where}: no such object") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise NotRegularFile(where, _irregular(st, False))
        if max_bytes is not None and st.st_size > max_bytes:
            os.close(fd)
            raise TooLarge(where, st.st_size, max_bytes)
        return os.fdopen(fd, "rb")

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        with self._open(key, max_bytes) as f:
            if max_bytes is None:
                return f.read()
            body = f.read(max_bytes + 1)  # it may have grown since the stat
        if len(body) > max_bytes:
            raise TooLarge(self.uri_for(key), len(body), max_bytes)
        return body

    def sha256(self, key: str) -> str:
        h = hashlib.sha256()
        with self._open(key) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        dest = Path(path)
        with self._open(key) as s:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkstemp(dir=dest.parent, prefix=TMP_PREFIX)[1])
            try:
                with open(tmp, "wb") as f:
                    while chunk := s.read(1 << 20):
                        f.write(chunk)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "", irregular: bool = False) -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        # Walk only the deepest directory the prefix names, and below it only the
        # folders the prefix can reach. Symbolic links to folders are not followed.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        found: dict[str, ObjectInfo] = {}
        folders = [base]
        while folders:
            rel = folders.pop()
            try:
                with os.scandir(self.root / rel if rel else self.root) as it:
                    entries = [*it]
            except OSError:  # gone, not a folder, or unreadable: nothing listed there
                continue
            for entry in entries:
                if entry.name.startswith(TMP_PREFIX):
                    continue
                key = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                            folders.append(key)
                        continue
                    if not key.startswith(prefix):
                        continue
                    info = self._info(key, entry)
                except FileNotFoundError:  # deleted while listing: not there any more
                    continue
                if info is not None and (irregular or not info.irregular):
                    found[key] = info
        for key in sorted(found):
            yield found[key]

    def list_folders(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        try:
            with os.scandir(self.root / prefix if prefix else self.root) as it:
                return sorted(e.name for e in it if not e.name.startswith(TMP_PREFIX)
                              and e.is_dir(follow_symlinks=False))  # fmt: skip
        except OSError:  # not there (yet), or not a folder: no folders
            return []

    @staticmethod
    def _info(key: str, entry: os.DirEntry) -> ObjectInfo | None:
        """One directory entry: a regular file (or a link to one) as an object, anything
        else with what it is. FileNotFoundError when it vanished."""
        linked = entry.is_symlink()
        try:
            st = entry.stat(follow_symlinks=True)
        except FileNotFoundError:
            if not linked:
                raise
            st = entry.stat(follow_symlinks=False)  # a link to nothing (raises if gone)
            return ObjectInfo(
                key, 0, f"link-{st.st_ino:x}-{st.st_ctime_ns:x}", _irregular(st, True)
            )
        if stat.S_ISREG(st.st_mode):
            return ObjectInfo(key, st.st_size, local_etag(st), mtime=st.st_mtime)
        kind = _irregular(st, linked)
        return ObjectInfo(key, 0, f"special-{st.st_ino:x}-{st.st_ctime_ns:x}", kind)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri_for(self, key: str) -> str:
        return str(self._path(key))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created when missing). Locked again when the file
    was removed (``remove_temp``) or replaced while waiting: the lock held is always on
    the file that is at ``path``."""
    while True:
        with open(path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield
                return


# --- S3 -------------------------------------------------------------------------


class S3Store(Store):
    """A bucket (and optional prefix) on any S3-compatible endpoint."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        multipart_threshold: int = 64 * 1024 * 1024,
        max_attempts: int = 8,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.endpoint_url, self.region = bucket, endpoint_url, region
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            # Timeouts per connection attempt and per socket read (a stalled endpoint
            # fails the try and is retried, it never hangs a scorer); a large body that
            # keeps flowing is not cut.
            config=Config(
                retries={"mode": "standard", "total_max_attempts": max_attempts},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=max(5 * 1024 * 1024, multipart_threshold // 4),
        )

    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def check(self, existing: bool = False) -> None:
        """One listing of at most one key under the store's prefix (ListObjectsV2: the
        s3:ListBucket right that an IAM policy may limit to the prefix, which HeadBucket
        cannot use), without retries and with short timeouts: missing credentials, an
        unreachable endpoint, a missing bucket or a refusal do not heal by waiting, so
        they fail at once with one line that says what to do."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        quick = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=10),
        )
        where = self.endpoint_url or "AWS S3"
        try:
            quick.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (NoCredentialsError, PartialCredentialsError):
            raise StoreUnavailable(
                f"{self.uri}: no AWS credentials — set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile (AWS_PROFILE), or use an instance role"
            ) from None
        except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError):
            raise StoreUnavailable(
                f"{self.uri}: cannot reach {where} — check VGGPRICE_S3_ENDPOINT_URL "
                "(or AWS_ENDPOINT_URL) and the network"
            ) from None
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code"))
            if code in ("404", "NoSuchBucket", "NotFound"):
                why = f"bucket {self.bucket!r} does not exist at {where} — create it or fix --store"
            elif code in ("403", "AccessDenied"):
                why = (f"access denied — the credentials lack access to the prefix "
                       f"{self.prefix or '(the whole bucket)'!r}: allow s3:ListBucket on it "
                       "and s3:GetObject/PutObject/DeleteObject under it")  # fmt: skip
            elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
                why = f"the credentials were refused ({code}) — check them"
            else:
                why = f"{where} answered {code}"
            raise StoreUnavailable(f"{self.uri}: {why}") from None

    def _missing(self, err: Exception) -> bool:
        code = getattr(err, "response", {}).get("Error", {}).get("Code")
        return code in ("404", "NoSuchKey", "NotFound")

    def put_bytes(self, key: str, data: bytes) -> None:
        import io

        self.client.upload_fileobj(
            io.BytesIO(data), self.bucket, self._key(key), Config=self.transfer
        )

    def put_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"
            )
            return True
        except ClientError as err:
            if self._lost_condition(err):
                return False
            raise

    def _get_object(self, key: str) -> dict:
        """The GetObject answer (body not read yet); ObjectNotFound for a missing key."""
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as err:
            if self._missing(err):
                raise ObjectNotFound(f"{self.uri_for(key)}: no such object") from None
            raise

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        resp = self._get_object(key)
        return resp["Body"].read(), resp["ETag"]

    def put_if_match(self, key: str, data: bytes, token: str | None) -> bool:
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
            return True
        except ClientError as err:
            if self._lost_condition(err):
                return False
            if token is not None and self._missing(err):
                return False  # deleted since it was read
            raise

    def _lost_condition(self, err: Exception) -> bool:
        code = getattr(err, "response", {}).get("Error", {}).get("Code")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        resp = self._get_object(key)
        size = resp.get("ContentLength", 0)
        if max_bytes is not None and size > max_bytes:
            resp["Body"].close()  # the answer's size, from its headers: the body is not read
            raise TooLarge(self.uri_for(key), size, max_bytes)
        return resp["Body"].read()

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        from botocore.exceptions import ClientError

        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkstemp(dir=dest.parent, prefix=TMP_PREFIX)[1])
        try:
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self.transfer)
            os.replace(tmp, dest)
        except ClientError as err:
            if self._missing(err):
                raise ObjectNotFound(f"{self.uri_for(key)}: no such object") from None
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as err:
            if self._missing(err):
                return False
            raise

    def list(self, prefix: str = "", irregular: bool = False) -> Iterator[ObjectInfo]:
        validate_prefix(prefix)  # (a bucket holds objects only: nothing is irregular)
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix) :]
                yield ObjectInfo(key, obj["Size"], obj["ETag"].strip('"'),
                                 mtime=obj["LastModified"].timestamp())  # fmt: skip

    def list_folders(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        full = self.prefix + prefix
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full, Delimiter="/"
        )
        found = {
            p["Prefix"][len(full) : -1] for page in pages for p in page.get("CommonPrefixes", [])
        }
        return sorted(found)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def key_in_store(self, bucket: str, key: str) -> str | None:
        """A bucket object's key relative to this store, or None when the object is not
        in it (another bucket, or outside the prefix): for S3 event notifications."""
        if bucket != self.bucket or not key.startswith(self.prefix):
            return None
        return key[len(self.prefix) :] or None

    def link_for(self, key: str, expires_s: int = 7 * 24 * 3600) -> str:
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=expires_s,
        )


def open_object(uri: str, settings: Settings | None = None) -> tuple[Store, str]:
    """(store, key) for the URI of one object: ``s3://bucket/key`` or a file path."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        return open_store(f"s3://{bucket}", settings), key
    path = Path(uri.removeprefix("file://")).expanduser().resolve()
    return LocalStore(path.parent), path.name


def open_store(uri: str | None = None, settings: Settings | None = None) -> Store:
    """The store named by ``uri`` (or the settings' default)."""
    settings = settings or load_settings()
    uri = uri or settings.store
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"invalid store URI {uri!r}: no bucket")
        return S3Store(
            bucket,
            prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            max_attempts=settings.s3_max_attempts,
        )
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported store URI {uri!r}: use s3://bucket/prefix or a directory")
    return LocalStore(uri.removeprefix("file://"))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()

"""Where files live: a local path, or a URI in object storage (``s3://bucket/prefix``, ``gs://...``).

Remote locations go through pyarrow's file systems, the layer Ray Train and Ray Data use, and they
configure themselves the usual way: credentials and region from the standard ``AWS_*`` variables
(or a profile, or the node's instance role), an S3-compatible store (MinIO, Ceph, a cloud's own)
from ``AWS_ENDPOINT_URL``. Every process resolves a location itself, so every node of a cluster
needs that configuration in its environment (what an ``sbatch`` script exports, what
``allinone submit --env`` sets, or an instance role).

:class:`ObjectPath` speaks the part of :class:`pathlib.Path` that shard code uses, so a folder is
a ``Path`` or an ``ObjectPath`` and one code path reads both. Object stores have no renames and
no half-written objects: an object appears whole when its upload completes. So a file is written
in full locally, then uploaded under its final name; a process killed mid-upload leaves nothing.
"""

from __future__ import annotations

import fnmatch
import functools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pyarrow
import pyarrow.fs

from allinone.base import files
from allinone.base.errors import first_line

COPY_BLOCK = 8 << 20  # bytes per read of a remote object: each read of S3 is one HTTP request
BUCKET_SCHEMES = ("s3", "gs", "gcs")  # pyarrow names their paths "bucket/key"


class StorageError(ValueError):
    """A location that cannot be used or reached; the message names it."""


@dataclass(frozen=True, order=True)
class ObjectPath:
    """A file or folder in object storage, named by its URI (no trailing slash)."""

    uri: str

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str | PurePosixPath) -> ObjectPath:
        return ObjectPath(f"{self.uri}/{str(name).strip('/')}")

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> ObjectPath:
        root, key = _split(self.uri)
        return ObjectPath(_uri(root, key.rsplit("/", 1)[0])) if "/" in key.strip("/") else self

    def resolve(self) -> ObjectPath:
        return self

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store's folders are the prefixes of its keys."""

    # ------------------------------------------------------------------ reading
    def _kind(self) -> pyarrow.fs.FileType:
        filesystem, key = resolve(self.uri)
        with _reported(self):
            return filesystem.get_file_info(key).type

    def is_file(self) -> bool:
        return self._kind() == pyarrow.fs.FileType.File

    def is_dir(self) -> bool:
        return self._kind() == pyarrow.fs.FileType.Directory

    def exists(self) -> bool:
        return self._kind() != pyarrow.fs.FileType.NotFound

    def open(self, mode: str = "rb") -> pyarrow.NativeFile:
        """A buffered binary stream of the object (reading only: objects are written whole)."""
        if mode != "rb":
            raise ValueError(f"{self}: objects open for reading only ('rb'), not {mode!r}")
        filesystem, key = resolve(self.uri)
        with _reported(self):
            return filesystem.open_input_stream(key, buffer_size=COPY_BLOCK)

    def read_bytes(self) -> bytes:
        with self.open() as stream:
            return stream.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def glob(self, pattern: str) -> list[ObjectPath]:
        """Objects directly under this folder whose names match ``pattern``."""
        return self._listing(pattern, recursive=False)

    def rglob(self, pattern: str) -> list[ObjectPath]:
        """Objects anywhere under this folder whose names match ``pattern``."""
        return self._listing(pattern, recursive=True)

    def _listing(self, pattern: str, recursive: bool) -> list[ObjectPath]:
        filesystem, key = resolve(self.uri)
        selector = pyarrow.fs.FileSelector(key, recursive=recursive, allow_not_found=True)
        with _reported(self):
            infos = filesystem.get_file_info(selector)
        root = _split(self.uri)[0]
        return sorted(
            ObjectPath(_uri(root, info.path))
            for info in infos
            if info.type == pyarrow.fs.FileType.File
            and fnmatch.fnmatchcase(info.base_name, pattern)
        )

    def download(self, target: Path) -> None:
        with self.open() as stream, Path(target).open("wb") as out:
            shutil.copyfileobj(stream, out, COPY_BLOCK)

    # ------------------------------------------------------------------ writing
    def write_bytes(self, data: bytes) -> None:
        """The whole object in one upload: readers see the old object or this one."""
        filesystem, key = resolve(self.uri)
        with _reported(self), filesystem.open_output_stream(key) as out:
            out.write(data)

    def upload(self, source: Path) -> None:
        """A finished local file as this object, streamed (shards can be large)."""
        filesystem, key = resolve(self.uri)
        with (
            _reported(self),
            Path(source).open("rb") as src,
            filesystem.open_output_stream(key) as out,
        ):
            shutil.copyfileobj(src, out, COPY_BLOCK)

    def unlink(self, missing_ok: bool = False) -> None:
        filesystem, key = resolve(self.uri)
        try:
            with _reported(self):
                filesystem.delete_file(key)
        except FileNotFoundError:
            if not missing_ok:
                raise


StoragePath = Path | ObjectPath  # a folder or file on local disk or in object storage


def path(where: str | Path | ObjectPath) -> StoragePath:
    """A location as given by a user or a config: a URI becomes an ObjectPath, anything else a
    local Path (``file://`` URIs too)."""
    if isinstance(where, Path | ObjectPath):
        return where
    text = str(where)
    if text.startswith("file://"):
        return Path(urlsplit(text).path)
    if is_remote(text):
        _split(text)  # refuses a URI without a bucket now, not at the first read
        return ObjectPath(text.rstrip("/"))
    return Path(text)


def is_remote(where: str | Path | ObjectPath | None) -> bool:
    text = str(where or "")
    return isinstance(where, ObjectPath) or ("://" in text and not text.startswith("file://"))


def resolve(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """pyarrow's file system for a URI, configured from this process's environment, and the path
    on it. The file system is made once per bucket and process (for S3 that asks for the
    bucket's region)."""
    root, key = _split(uri)
    return _filesystem(root), key


def check(where: StoragePath) -> None:
    """Fail now, naming the location, when its store cannot be configured or reached, or its
    bucket does not exist (an upload would fail only once the first shard was built)."""
    if not isinstance(where, ObjectPath):
        return
    root, key = _split(where.uri)
    if root.split("://")[0] not in BUCKET_SCHEMES:
        where.exists()
        return
    bucket = key.split("/")[0]
    if not ObjectPath(_uri(root, bucket)).exists():
        raise StorageError(f"{where}: bucket {bucket} does not exist (or is hidden from you)")


def write_atomic(target: StoragePath, data: str | bytes) -> None:
    """``target`` holds the old content or all of ``data``, never part of it."""
    if isinstance(target, Path):
        files.write_atomic(target, data)
    else:
        target.write_bytes(data.encode() if isinstance(data, str) else data)


def write_atomic_with(target: StoragePath, write: Callable[[Path], object]) -> None:
    """Let ``write`` fill a local file, then publish it whole as ``target`` (a rename beside it
    on disk, one upload to object storage)."""
    if isinstance(target, Path):
        files.write_atomic_with(target, write)
        return
    with tempfile.TemporaryDirectory(prefix="allinone-upload-") as folder:
        local = Path(folder) / target.name
        write(local)
        target.upload(local)


# --------------------------------------------------------------------------- resolution
def _split(uri: str) -> tuple[str, str]:
    """``scheme://netloc`` and the path pyarrow's file system names the object by."""
    parts = urlsplit(uri)
    if not parts.netloc:
        raise StorageError(f"{uri}: a storage URI names its bucket, e.g. s3://bucket/prefix")
    root = f"{parts.scheme}://{parts.netloc}"
    path_part = parts.path.strip("/")
    if parts.scheme in BUCKET_SCHEMES:
        return root, f"{parts.netloc}/{path_part}".rstrip("/")
    return root, f"/{path_part}"


def _uri(root: str, key: str) -> str:
    """The URI of a path on ``root``'s file system: the inverse of :func:`_split`."""
    scheme = root.split("://", 1)[0]
    return f"{scheme}://{key}" if scheme in BUCKET_SCHEMES else f"{root}{key}"


@functools.cache
def _filesystem(root: str) -> pyarrow.fs.FileSystem:
    try:
        filesystem, _ = pyarrow.fs.FileSystem.from_uri(root)
    except (ValueError, OSError) as err:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise StorageError(f"{root}: {first_line(err)}") from None
    return filesystem


@contextmanager
def _reported(where: ObjectPath) -> Iterator[None]:
    """A store's errors as one line naming the object (a missing one stays FileNotFoundError)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as err:
        raise StorageError(f"{where}: {first_line(err)}") from None

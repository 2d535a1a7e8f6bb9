"""Checkpoint storage on local disk or an object store, through `pyarrow.fs` (the filesystem layer Ray Train
uses to persist checkpoints, so both sides see the same objects).

A `Store` is one directory: a local path, or an object-store prefix such as `s3://bucket/run` or
`gs://bucket/run`. Object stores have no directories, only keys; a "directory" is a key prefix and is created
implicitly by writing under it. Credentials and endpoints come from the environment as usual (`AWS_*`, with
`AWS_ENDPOINT_URL` for S3-compatible stores; Google application-default credentials for GCS), or from query
parameters of the URI (`s3://bucket/run?endpoint_override=...`).

A `Store` pickles with its filesystem, so the driver can resolve it once and hand it to Ray Train's
controller and workers (which may not share the driver's environment: an already running cluster).
For S3 with static keys in the driver's environment (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`), the
keys are therefore embedded in the filesystem object; with instance roles or web identity nothing is
embedded and each process resolves its own credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

READ_BLOCK = 1 << 23
"""Bytes per read while streaming a checksum (8 MiB)."""


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (an object store, or `file://`), False for a plain local path."""
    return "://" in str(path)


@dataclass(frozen=True)
class Store:
    """A directory on a `pyarrow.fs` filesystem. Relative names below it use `/`."""

    fs: pafs.FileSystem
    """The filesystem (LocalFileSystem, S3FileSystem, GcsFileSystem, ...)."""
    path: str
    """The directory's path on `fs` (for object stores: `bucket/prefix`, without the scheme)."""
    uri: str
    """How to show it to a user: the local path or the `scheme://bucket/prefix` it was opened from."""

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def __truediv__(self, name: str) -> Store:
        return Store(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.uri.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.uri

    def _info(self, rel: str = "") -> pafs.FileInfo:
        return self.fs.get_file_info(self._key(rel))

    def _key(self, rel: str) -> str:
        return f"{self.path.rstrip('/')}/{rel}" if rel else self.path

    def is_file(self, rel: str = "") -> bool:
        return self._info(rel).type == pafs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        return self._info(rel).type == pafs.FileType.Directory

    def size(self, rel: str) -> int | None:
        """Bytes of file `rel`, or None when there is no such file."""
        info = self._info(rel)
        return info.size if info.type == pafs.FileType.File else None

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the sub-directories whose name starts with `prefix`, sorted."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        return sorted(
            info.base_name
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.Directory and info.base_name.startswith(prefix)
        )

    def file_sizes(self) -> dict[str, int]:
        """Every file below this directory (relative name -> bytes), from one recursive listing (on an
        object store: LIST requests, not one HEAD per object)."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=True)
        root = self.path.rstrip("/") + "/"
        return {
            info.path[len(root) :]: info.size
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File
        }

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._key(rel)) as fh:
            return fh.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def sha256(self, rel: str) -> str:
        """Hex sha256 of file `rel`, streamed in `READ_BLOCK` reads."""
        h = hashlib.sha256()
        with self.fs.open_input_stream(self._key(rel)) as fh:
            while block := fh.read(READ_BLOCK):
                h.update(block)
        return h.hexdigest()

    def delete(self) -> None:
        """Remove this directory and everything below it (no error when it is already gone)."""
        try:
            self.fs.delete_dir(self.path)
        except FileNotFoundError:
            pass

    def download(self, dest: str | os.PathLike) -> Path:
        """Copy every file below this directory into the local directory `dest` (created)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for rel in sorted(self.file_sizes()):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(
                self._key(rel),
                str(target),
                source_filesystem=self.fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        return dest


def upload_dir(
    src: str | os.PathLike,
    dest: Store,
    last: tuple[str, ...] = (),
    retries: int = 4,
    backoff_s: float = 1.0,
) -> None:
    """Copy every file below the local directory `src` to `dest`, the names in `last` after all others
    (completion markers: a reader that sees them sees every other file). Each file is one object on an
    object store (a single PUT when small), so a reader never sees a partial file.

    A failed copy (the store unreachable, throttling, a dropped connection) is retried `retries` times
    with exponential backoff (`backoff_s`, 2x, 4x, ...), then raises OSError naming the file and the
    store. A failure leaves the completion markers unwritten, so nothing reads the directory as complete.
    """
    src = Path(src)
    # Every other file first (rank 0), then the names in `last`, in their order.
    order = {name: i + 1 for i, name in enumerate(last)}
    files = sorted(
        (p for p in src.rglob("*") if p.is_file()), key=lambda p: (order.get(p.name, 0), p)
    )
    _retry(lambda: dest.fs.create_dir(dest.path, recursive=True), dest, "", retries, backoff_s)
    for path in files:
        rel = path.relative_to(src).as_posix()
        _retry(lambda path=path, rel=rel: _put_file(path, dest, rel), dest, rel, retries, backoff_s)


def _put_file(path: Path, dest: Store, rel: str) -> None:
    """Write one local file to `dest/rel` and check that the store has all of it.

    The stream is closed explicitly: an object store uploads on close, and `pyarrow.fs.copy_files` leaves
    that to the stream's destructor, which logs a failed upload and carries on (seen with the S3 store
    unreachable: the file was reported copied and was not there)."""
    if "/" in rel:
        dest.fs.create_dir(dest._key(rel.rsplit("/", 1)[0]), recursive=True)
    with open(path, "rb") as src, dest.fs.open_output_stream(dest._key(rel)) as out:
        while chunk := src.read(READ_BLOCK):
            out.write(chunk)
    size, expected = dest.size(rel), path.stat().st_size
    if size != expected:
        raise OSError(f"{dest / rel} has {size} bytes after the upload, not {expected}")


def _retry(fn, dest: Store, rel: str, retries: int, backoff_s: float) -> None:
    """Run `fn` (a write to `dest`), retrying OSErrors with exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except OSError as exc:
            if attempt == retries:
                raise OSError(
                    f"could not write {rel or '(directory)'} to {dest} after {retries + 1} attempts "
                    f"over {backoff_s * (2**retries - 1):.0f} s: {exc}. Check that the object store "
                    "is reachable and writable (credentials, endpoint, bucket)"
                ) from exc
            delay = backoff_s * 2**attempt
            log.warning(
                "writing %s to %s failed (%s); retry %d/%d in %.1f s",
                rel or "(directory)", dest, exc, attempt + 1, retries, delay,
            )  # fmt: skip
            time.sleep(delay)


def resolve(location: str | os.PathLike | Store) -> Store:
    """Open a local path or an object-store URI as a `Store` (a `Store` is returned as is).

    Raises ValueError naming the URI when its scheme is unknown or the filesystem cannot be set up.
    """
    if isinstance(location, Store):
        return location
    text = str(location)
    if not is_uri(text):
        return Store(pafs.LocalFileSystem(), os.path.abspath(text), str(Path(text)))
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as err:  # pyarrow.ArrowInvalid is a ValueError
        raise ValueError(
            f"cannot open storage {text!r} ({err}); use a local path or an object-store URI such as "
            "s3://bucket/prefix or gs://bucket/prefix, with credentials in the environment"
        ) from err
    if isinstance(fs, pafs.LocalFileSystem):  # file:///abs/path
        return Store(fs, path, path)
    return Store(_portable(fs), path.rstrip("/"), text.split("?", 1)[0].rstrip("/"))


def _portable(fs: pafs.FileSystem) -> pafs.FileSystem:
    """An S3 filesystem that works in processes without the driver's environment, and that writes small
    objects with one PUT.

    `from_uri` reads endpoint, region and keys from the environment, but the pickled filesystem keeps only
    what was set explicitly (the endpoint), so Ray's controller and workers on an already running cluster
    would look for credentials of their own. Static keys and the region from the environment are therefore
    made explicit. `allow_delayed_open` lets objects smaller than one upload part (manifests, meta,
    config, vocab, small shards) go up as a single PutObject instead of a three-request multipart upload.
    """
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    rebuild, (options,) = fs.__reduce__()
    options = dict(options)
    options["allow_delayed_open"] = True
    env = os.environ
    if (
        not options.get("access_key")
        and env.get("AWS_ACCESS_KEY_ID")
        and env.get("AWS_SECRET_ACCESS_KEY")
    ):
        options["access_key"] = env["AWS_ACCESS_KEY_ID"]
        options["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
        options["session_token"] = env.get("AWS_SESSION_TOKEN")
    if not options.get("region"):
        options["region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or ""
    return rebuild(options)


@contextlib.contextmanager
def local_copy(store: Store) -> Iterator[Path]:
    """A local directory with the contents of `store`: the directory itself when it is on local disk,
    otherwise a download into a temporary directory that is removed when the block exits (also when the
    download fails half-way)."""
    if store.is_local:
        yield Path(store.path)
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"scgpt-{store.name}-"))
    try:
        yield store.download(tmp / store.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

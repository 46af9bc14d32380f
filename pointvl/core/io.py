"""Atomic, fsspec-backed file output shared by every stage.

Finished means the final file exists: every writer here writes to a temporary name beside the
target and renames it into place, so a killed process never leaves a half-written final file.
Paths may be local folders or any fsspec URL (``s3://bucket/run``).
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from fsspec.implementations.local import LocalFileSystem

from pointvl.core import fence
from pointvl.core.errors import InputError


def join(root: str, *parts: str) -> str:
    """Join path parts with ``/``, for local paths and URLs alike."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``path`` and the path as that filesystem spells it."""
    # no listings cache: worker processes write the same run folder, so a cached listing (and an
    # object store's cached ETag) in this process goes stale
    fs, _, paths = fsspec.get_fs_token_paths(path, storage_options={"use_listings_cache": False})
    return fs, paths[0]


def file_key(info: dict) -> str:
    """What identifies a file's content without reading it (an fsspec ``info``): size and ETag (object
    storage) or mtime."""
    return f"{info.get('size')}:{info.get('ETag') or info.get('mtime')}"


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def _atomic(path: str, write: Callable[[Any], None]) -> None:
    fs, p = filesystem(path)
    parent = p.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{p.rsplit('/', 1)[-1]}"
    try:
        with fs.open(tmp, "wb") as f:
            write(f)
            if isinstance(fs, LocalFileSystem):  # make the bytes durable before the rename
                f.flush()
                os.fsync(f.fileno())
        fence.check(fs, p)  # a build whose lock was taken over writes nothing more
        fs.mv(tmp, p)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    _atomic(path, lambda f: f.write(data))


def check_fence(path: str) -> None:
    """Raise :class:`~pointvl.core.fence.LockLost` if ``path`` lies in a run folder whose lock this build lost
    (for moves and deletions; every write here checks it itself)."""
    fs, p = filesystem(path)
    fence.check(fs, p)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return f.read()


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically (stable bytes for stable input)."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str) -> Any:
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return json.load(f)


def table_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes (zstd; the same table gives the same bytes)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_table(path: str, table: pa.Table) -> None:
    """Write a Parquet table atomically."""
    write_bytes(path, table_bytes(table))


def read_table(path: str) -> pa.Table:
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f)


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading ``1e-5`` as a float, as YAML 1.2 and JSON do (YAML 1.1 wants ``1.0e-5``)."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str | bytes) -> Any:
    """YAML (or JSON) text as plain data: no arbitrary objects (a SafeLoader), ``1e-5`` a float."""
    return yaml.load(text, Loader=_YAMLLoader)


def read_yaml(path: str, what: str = "config file") -> Any:
    """A YAML (or JSON) file's content; anything unreadable raises :class:`InputError` in one line.

    A binary file, another encoding or a YAML syntax error all name the file and what to fix.
    """
    try:
        text = read_bytes(path).decode("utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {err.start}): give a YAML or JSON file") from None
    if "\x00" in text:
        raise InputError(f"{what} {path} is binary, not YAML or JSON text")
    try:
        return parse_yaml(text)  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise InputError(f"{what} {path} is not valid YAML/JSON{at}: {getattr(err, 'problem', None) or err}") from None


@contextmanager
def local_copy(path: str, levels: int = 1) -> Iterator[str]:
    """``path`` as a local file for libraries that only open local files.

    A local path is yielded as it is. A remote one has the folder ``levels`` above it (1: its own
    folder) copied to a temporary local folder first, so files it refers to by relative path come
    along; the copy is removed afterwards. A missing remote file yields a local path that does not exist.
    """
    fs, p = filesystem(path)
    if isinstance(fs, LocalFileSystem):
        yield p
        return
    folder = p.rsplit("/", levels)[0]
    with tempfile.TemporaryDirectory(prefix="pointvl-") as tmp:
        remote = fs.find(folder)
        fs.get(remote, [os.path.join(tmp, r.removeprefix(folder + "/")) for r in remote])
        yield os.path.join(tmp, p.removeprefix(folder + "/"))

"""Atomic, fsspec-backed file output shared by every stage.

Finished means the final file exists: every writer here writes to a temporary name beside the
target and renames it into place, so a killed process never leaves a half-written final file.
Paths may be local folders or any fsspec URL (``s3://bucket/run``).
"""

from __future__ import annotations

import fnmatch
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
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from fsspec.implementations.local import LocalFileSystem

from pointvl.core import fence
from pointvl.core.errors import InputError


def join(root: str, *parts: str) -> str:
    """Join path parts with ``/``, for local paths and URLs alike."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://...``, ``memory://...``, ``simplecache::s3://...``) rather
    than a local path, in which ``://`` or ``::`` may be part of a folder's name."""
    path = os.fspath(path)
    if _URL.match(path):
        return True
    head, chained, _ = path.partition("::")
    return bool(chained) and head in fsspec.available_protocols()


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``path`` and the path as that filesystem spells it.

    A local path is only ever a path: ``::`` is not URL chaining and ``*``, ``?``, ``[`` are not glob
    patterns there (list a folder with :func:`ls_matching`, never ``fs.glob`` of a path built from it).
    """
    path = os.fspath(path)  # a RunFolder or Path too
    if not is_url(path):
        fs = fsspec.filesystem("file")
        return fs, os.path.abspath(path).rstrip("/") or "/"
    # no listings cache: worker processes write the same run folder, so a cached listing (and an
    # object store's cached ETag) in this process goes stale
    return fsspec.core.url_to_fs(path, use_listings_cache=False)


def ls_matching(fs: fsspec.AbstractFileSystem, folder: str, pattern: str) -> list[str]:
    """The entries of ``folder`` (as ``fs`` spells it) whose names match the glob ``pattern``, sorted; none
    when it does not exist. The folder's own path is taken literally (a ``[`` in it is a character)."""
    try:
        paths = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    return sorted(p for p in paths if fnmatch.fnmatchcase(p.rstrip("/").rsplit("/", 1)[-1], pattern))


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


MAX_DEPTH = 64
"""The deepest nesting of lists and mappings read from a JSON or YAML file (the project's own nest < 10)."""
MAX_JSON_BYTES = 1 << 30
"""The largest JSON file read whole (a plan of 52k models is ~20 MB)."""
MAX_YAML_BYTES = 16 << 20
"""The largest YAML (config) file read."""
MAX_NODES = 1_000_000
"""The most lists, mappings and values a YAML file may expand to (its aliases repeat nodes)."""

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


def json_depth(data: bytes) -> int:
    """How deep lists and objects nest in JSON ``data`` (brackets inside strings do not count), without
    parsing it: ``json`` recurses, and 2,000 nested brackets raise ``RecursionError``."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    step = ((bare == ord("[")) | (bare == ord("{"))).astype(np.int32) - ((bare == ord("]")) | (bare == ord("}")))
    return int(np.cumsum(step).max()) if step.size else 0


def read_json(path: str, what: str = "", max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """A JSON file's content; a file larger than ``max_bytes``, nested deeper than ``max_depth`` or not
    JSON raises :class:`InputError` (a ``ValueError``) in one line naming it (``what``: what it is)."""
    name = f"{what} {path}" if what else path
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"{name} is larger than {max_bytes:,} bytes: not a file pointvl reads whole")
    depth = json_depth(data)
    if depth > max_depth:
        raise InputError(f"{name} nests {depth} levels deep (at most {max_depth} are read): not a file pointvl wrote")
    try:
        return json.loads(data)
    except ValueError as err:  # bad JSON, not UTF-8, an integer of more than 4,300 digits
        raise InputError(f"{name} is not valid JSON: {str(err)[:200]}") from None


def check_nesting(obj: Any, name: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
    """Raise :class:`InputError` if parsed data nests deeper than ``max_depth`` or holds more than
    ``max_nodes`` nodes (counting a node each time an alias repeats it)."""
    stack, nodes = [(obj, 1)], 0
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        if not children:
            continue
        if depth > max_depth:
            raise InputError(f"{name} nests more than {max_depth} levels deep: not a file pointvl reads")
        nodes += len(children)
        if nodes > max_nodes:
            raise InputError(f"{name} expands to more than {max_nodes:,} values (aliases?): not a file pointvl reads")
        stack.extend((child, depth + 1) for child in children)


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
        fs, p = filesystem(path)
        with fs.open(p, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
        text = data.decode("utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {err.start}): give a YAML or JSON file") from None
    if len(data) > MAX_YAML_BYTES:
        raise InputError(f"{what} {path} is larger than {MAX_YAML_BYTES:,} bytes: not a config file")
    if "\x00" in text:
        raise InputError(f"{what} {path} is binary, not YAML or JSON text")
    try:
        doc = parse_yaml(text)  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise InputError(f"{what} {path} is not valid YAML/JSON{at}: {getattr(err, 'problem', None) or err}") from None
    except (RecursionError, ValueError) as err:  # nesting past the parser's stack; an integer of 4,300+ digits
        why = "nests too deep" if isinstance(err, RecursionError) else str(err)[:200]
        raise InputError(f"{what} {path} is not a usable YAML/JSON file: {why}") from None
    check_nesting(doc, f"{what} {path}")
    return doc


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

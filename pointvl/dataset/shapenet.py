"""Reading a ShapeNetCore v2 folder: ``taxonomy.json`` (bounded), the synset and model folders (broken links
included), each model's OBJ path and file info, and the names a folder may hold (too long, not UTF-8)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from pointvl.core import io
from pointvl.core.errors import InputError

OBJ_RELPATH = "models/model_normalized.obj"


def read_taxonomy(shapenet_dir: str) -> dict[str, dict]:
    """``taxonomy.json`` as ``{synset_id: entry}``; raises :class:`InputError` when unusable.

    ``shapenet_dir`` is a local folder or an fsspec URL (``s3://bucket/ShapeNetCore.v2``)."""
    fs, root = io.filesystem(shapenet_dir)
    if not fs.isdir(root):
        raise InputError(f"ShapeNet folder not found: {shapenet_dir}")
    path = io.join(shapenet_dir, "taxonomy.json")
    if not io.exists(path):
        raise InputError(
            f"{shapenet_dir} has no taxonomy.json: point --shapenet at the ShapeNetCore.v2 folder "
            "(the one holding taxonomy.json and the <synset_id>/ folders)"
        )
    entries = io.read_json(path, "taxonomy", max_bytes=MAX_TAXONOMY_BYTES)  # InputError naming it if unusable
    usable = isinstance(entries, list) and all(
        isinstance(e, dict) and isinstance(e.get("synsetId"), str) and isinstance(e.get("name"), str) for e in entries
    )
    if not usable:
        raise InputError(f"{path} is not a ShapeNet taxonomy: expected a JSON list of {{synsetId, name, ...}} objects")
    if not entries:
        raise InputError(f"{path} lists no synsets: add a {{synsetId, name}} entry per category folder")
    taxonomy: dict[str, dict] = {}
    for e in entries:
        first = taxonomy.setdefault(e["synsetId"], e)
        if category_name(first) != category_name(e):
            raise InputError(
                f"{path} lists synset {e['synsetId']} twice, as {first['name']!r} and {e['name']!r}: "
                "keep one entry per synsetId"
            )
    return taxonomy


MAX_TAXONOMY_BYTES = 256 << 20
"""The largest taxonomy.json read (ShapeNet's is 0.3 MB)."""


MAX_NAME_CHARS = 200
"""The longest synset id, model id or category name built (ShapeNet's are under 80 characters)."""


def bad_name(name: str) -> str:
    """The drop reason for a synset id, model id or category name the outputs cannot carry ('' when fine):
    ``name_too_long`` past :data:`MAX_NAME_CHARS`, ``name_not_utf8`` for a folder name of other bytes."""
    if len(name) > MAX_NAME_CHARS:
        return "name_too_long"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name_not_utf8"
    return ""


def printable(name: str) -> str:
    """A name as the report can hold it: cut to the limit, other bytes escaped."""
    cut = name if len(name) <= MAX_NAME_CHARS else f"{name[:MAX_NAME_CHARS]}..."
    return cut.encode("utf-8", "backslashreplace").decode()


def category_name(entry: dict) -> str:
    """ShapeNet names are comma-separated synonyms ("car,auto,automobile"): the first one."""
    return entry["name"].split(",")[0].strip()


def _folders(folder: Path) -> list[tuple[str, bool]]:
    """The sub-folders of ``folder``, sorted, each with whether it is a link that leads nowhere.

    Plain files are not models and are left out; a symbolic link to itself or to nothing is kept,
    so it gets a report row instead of vanishing.
    """
    out = []
    for entry in os.scandir(folder):
        if entry.is_symlink() and not os.path.exists(entry.path):
            out.append((entry.name, True))
        elif entry.is_dir():
            out.append((entry.name, False))
    return sorted(out)


def list_models(shapenet_dir: str) -> Iterator[tuple[str, bool, list[ModelListing]]]:
    """Per synset folder (sorted): whether it is a broken link, and its model folders (sorted), each with
    whether it is a broken link and its OBJ's fsspec info (size, mtime or ETag; ``None``: no OBJ).

    Listing only, no file is read. On object storage one recursive listing per synset folder (a few
    paged LIST calls, not a request per model); object stores have no links.
    """
    fs, root = io.filesystem(shapenet_dir)
    if isinstance(fs, LocalFileSystem):
        for synset, broken in _folders(Path(root)):
            models = [] if broken else [
                (model, gone, None if gone else _local_info(os.path.join(root, synset, model, OBJ_RELPATH)))
                for model, gone in _folders(Path(root) / synset)
            ]
            yield synset, broken, models
        return
    for synset in sorted(e["name"].rsplit("/", 1)[-1] for e in fs.ls(root, detail=True) if e["type"] == "directory"):
        base = f"{root}/{synset}/"
        found: dict[str, dict | None] = {}
        for path, info in fs.find(base, withdirs=True, detail=True).items():
            rel = path.removeprefix(base)
            if "/" not in rel and info["type"] == "directory":
                found.setdefault(rel, None)
            elif rel.count("/") == OBJ_RELPATH.count("/") + 1 and rel.endswith("/" + OBJ_RELPATH):
                found[rel.split("/", 1)[0]] = info
        yield synset, False, [(model, False, info) for model, info in sorted(found.items())]


def _local_info(path: str) -> dict | None:
    """Size and mtime of a local file (None: no such file)."""
    if not os.path.isfile(path):
        return None
    st = os.stat(path)
    return {"size": st.st_size, "mtime": st.st_mtime}


def model_path(shapenet_dir: str, synset: str, model: str) -> str:
    """The OBJ of a model: an absolute local path, or a URL on the input's filesystem."""
    path = io.join(shapenet_dir, synset, model, OBJ_RELPATH)
    return path if io.is_url(path) else os.path.abspath(path)


ModelListing = tuple[str, bool, dict | None]  # model folder, broken link, its OBJ's info (None: no OBJ)

"""A mini ShapeNetCore v2, built procedurally, for tests and the demo.

``write_fixture`` writes ``taxonomy.json`` and ``<synset>/<model>/models/model_normalized.obj|.mtl|.json``
for nine real ShapeNet categories, each model a few trimesh primitives in ShapeNet's frame (+Y up,
front −Z, bbox centred, bbox diagonal 1), one named material per part. It also plants the faults real
ShapeNet has, so the cleaning stage can be tested against a known answer: ``FixtureManifest.faults``
lists each faulty model folder with the reason ``pointvl.dataset.stages.clean`` writes in its report.

- ``model_in_two_categories``: one model id under chair and table (different meshes; the label is
  ambiguous, so both entries are faulty);
- ``missing_obj``: a mug model folder with no files;
- ``no_faces``: an airplane OBJ with vertices but no faces;
- ``unreadable``: a lamp OBJ cut off mid-file, with binary junk and a face past the last vertex;
- ``duplicate_geometry``: a car whose OBJ and MTL are byte-identical to another car's; the copy's id
  sorts after the original's, so keeping the first in (synset, model) order keeps the original;
- cellphone (02992529) is a hyponym of telephone (04401088), as in the real taxonomy: both hold good
  models, to be merged rather than dropped (``FixtureManifest.hyponyms``).

One bottle is textured (``map_Kd ../images/texture0.png`` and ``vt`` per vertex, ShapeNet's layout).

``write_fixture(..., catalogue=True)`` adds the fault catalogue: real-world OBJ files as other tools
write them, which must build (``FixtureManifest.quirks``: arbitrary units, vertex colours, a texture
whose image is missing, UTF-16 and UTF-8-BOM/CRLF files, quads and polygons, negative indices), and
models that must be dropped with a reason (``FixtureManifest.faults``: a stray triangle 200 units
away, a vertex at 1e300, a NaN vertex, a line-only file, a synset folder missing from the taxonomy,
a model folder that is a symbolic link to itself, two model ids equal but for case, a good model's
copy in inches, a lone triangle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io as _io
import logging
from collections.abc import Callable

import numpy as np
import trimesh
from PIL import Image

from pointvl.core import io
from pointvl.core.errors import InputError

logger = logging.getLogger(__name__)

Part = tuple[str, trimesh.Trimesh]  # (material name, mesh in the builder's raw frame)

MODELS_PER_SYNSET = 4
HYPONYMS = {"02992529": "04401088"}  # child synset -> parent, as in ShapeNet's taxonomy.json


@dataclasses.dataclass(frozen=True)
class Fault:
    """A model folder the cleaning stage must drop, with the reason its report gives."""

    synset_id: str
    model_id: str
    reason: str  # a reason of the cleaning report (pointvl.dataset.stages.clean)
    related: str = ""  # "<synset>/<model>" of the other entry involved (two categories, duplicate geometry)


@dataclasses.dataclass(frozen=True)
class FixtureManifest:
    """What ``write_fixture`` wrote."""

    root: str
    seed: int
    models: dict[str, tuple[str, ...]]  # synset id -> every model folder under it, sorted
    faults: tuple[Fault, ...]
    hyponyms: dict[str, str] = dataclasses.field(default_factory=lambda: dict(HYPONYMS))
    textured: tuple[str, ...] = ()  # "<synset>/<model>" of models with a texture image
    quirks: dict[str, str] = dataclasses.field(default_factory=dict)  # "<synset>/<model>" -> quirk (kept)

    @property
    def good(self) -> dict[str, tuple[str, ...]]:
        """Per synset, the model ids that carry no fault."""
        bad = {(f.synset_id, f.model_id) for f in self.faults}
        return {s: tuple(m for m in ids if (s, m) not in bad) for s, ids in self.models.items()}


# 1. geometry helpers, in a raw frame: +Y up, front -Z, sizes in arbitrary units (metres-ish)


def _rot(axis: str) -> np.ndarray:
    """Rotation taking trimesh's primitive axis (+Z) to ``axis``."""
    if axis == "y":
        return trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0])
    if axis == "x":
        return trimesh.transformations.rotation_matrix(np.pi / 2, [0, 1, 0])
    if axis == "-z":
        return trimesh.transformations.rotation_matrix(np.pi, [0, 1, 0])
    return np.eye(4)


def _place(mesh: trimesh.Trimesh, center: tuple[float, float, float], axis: str = "z") -> trimesh.Trimesh:
    mesh.apply_transform(_rot(axis))
    mesh.apply_translation(center)
    return mesh


def _box(extents: tuple[float, float, float], center: tuple[float, float, float]) -> trimesh.Trimesh:
    # subdivided once: 48 faces instead of 12, so box-built models are not unrealistically coarse
    return _place(trimesh.creation.box(extents=extents).subdivide(), center)


def _cyl(r: float, h: float, center: tuple[float, float, float], axis: str = "y", n: int = 24) -> trimesh.Trimesh:
    return _place(trimesh.creation.cylinder(radius=r, height=h, sections=n), center, axis)


def _cone(r: float, h: float, base: tuple[float, float, float], axis: str = "y") -> trimesh.Trimesh:
    """A cone with its base centre at ``base`` and its apex ``h`` along ``axis``."""
    return _place(trimesh.creation.cone(radius=r, height=h, sections=24), base, axis)


# 2. one builder per category; each returns named parts and varies proportions with ``rng``


def _airplane(rng: np.random.Generator) -> list[Part]:
    rf, lf = rng.uniform(0.12, 0.18), rng.uniform(2.0, 2.6)
    span, chord = rng.uniform(2.0, 2.8), rng.uniform(0.4, 0.6)
    fin_h = rng.uniform(0.35, 0.5)
    fuselage = trimesh.util.concatenate(
        [_cyl(rf, lf, (0, 0, 0), "z"), _cone(rf, rng.uniform(0.3, 0.5), (0, 0, -lf / 2), "-z")]
    )
    wings = trimesh.util.concatenate(
        [
            _box((span, 0.05, chord), (0, -rf * 0.3, -lf * 0.05)),
            _box((span * 0.35, 0.04, 0.3), (0, 0, lf / 2 - 0.15)),
        ]
    )
    tail = _box((0.04, fin_h, 0.35), (0, rf + fin_h / 2, lf / 2 - 0.2))
    return [("fuselage", fuselage), ("wing", wings), ("tail", tail)]


def _car(rng: np.random.Generator) -> list[Part]:
    length, width = rng.uniform(1.8, 2.4), rng.uniform(0.8, 1.0)
    body_h, r = rng.uniform(0.3, 0.4), rng.uniform(0.16, 0.22)
    cabin_h, cabin_l = rng.uniform(0.25, 0.35), length * rng.uniform(0.4, 0.55)
    body_y = r * 0.8 + body_h / 2
    body = _box((width, body_h, length), (0, body_y, 0))
    cabin = _box((width * 0.85, cabin_h, cabin_l), (0, body_y + body_h / 2 + cabin_h / 2, length * 0.08))
    wheels = trimesh.util.concatenate(
        [_cyl(r, 0.14, (sx * width / 2, r, sz * length * 0.32), "x") for sx in (-1, 1) for sz in (-1, 1)]
    )
    # headlights mark the front (-Z) so a render shows which way the car faces
    lights = trimesh.util.concatenate(
        [_box((0.16, 0.08, 0.02), (sx * width * 0.3, body_y, -length / 2 - 0.01)) for sx in (-1, 1)]
    )
    return [("body", body), ("window", cabin), ("wheel", wheels), ("headlight", lights)]


def _chair(rng: np.random.Generator) -> list[Part]:
    w, d, hs = rng.uniform(0.45, 0.6), rng.uniform(0.45, 0.6), rng.uniform(0.42, 0.5)
    t, leg, back_h = 0.06, 0.05, rng.uniform(0.4, 0.6)
    seat = _box((w, t, d), (0, hs + t / 2, 0))
    legs = [_box((leg, hs, leg), (sx * (w - leg) / 2, hs / 2, sz * (d - leg) / 2)) for sx in (-1, 1) for sz in (-1, 1)]
    if rng.random() < 0.5:  # armrests on some chairs
        legs += [_box((0.05, 0.04, d * 0.8), (sx * (w - 0.05) / 2, hs + t + 0.2, 0)) for sx in (-1, 1)]
        legs += [_box((0.04, 0.2, 0.04), (sx * (w - 0.05) / 2, hs + t + 0.1, -d * 0.3)) for sx in (-1, 1)]
    back = _box((w, back_h, 0.05), (0, hs + t + back_h / 2, d / 2 - 0.025))  # back at +Z: the seat faces -Z
    return [("seat", seat), ("frame", trimesh.util.concatenate(legs)), ("back", back)]


def _table(rng: np.random.Generator) -> list[Part]:
    h = rng.uniform(0.7, 0.8)
    if rng.random() < 0.4:  # round pedestal table
        r = rng.uniform(0.4, 0.6)
        top = _cyl(r, 0.05, (0, h - 0.025, 0), n=32)
        base = trimesh.util.concatenate(
            [_cyl(0.05, h - 0.05, (0, (h - 0.05) / 2, 0)), _cyl(r * 0.5, 0.04, (0, 0.02, 0))]
        )
        return [("top", top), ("leg", base)]
    w, d, leg = rng.uniform(1.0, 1.6), rng.uniform(0.6, 1.0), 0.06
    top = _box((w, 0.05, d), (0, h - 0.025, 0))
    legs = [
        _box((leg, h - 0.05, leg), (sx * (w / 2 - leg), (h - 0.05) / 2, sz * (d / 2 - leg)))
        for sx in (-1, 1)
        for sz in (-1, 1)
    ]
    return [("top", top), ("leg", trimesh.util.concatenate(legs))]


def _mug(rng: np.random.Generator) -> list[Part]:
    r, h, wall = rng.uniform(0.35, 0.45), rng.uniform(0.8, 1.1), 0.04
    walls = _place(trimesh.creation.annulus(r_min=r - wall, r_max=r, height=h, sections=32), (0, h / 2, 0), "y")
    bottom = _cyl(r - wall / 2, wall, (0, wall / 2, 0), n=32)
    big, small = h * rng.uniform(0.24, 0.3), 0.05
    # the ring lies in the XY plane on the +X side; its inner edge sits inside the wall, not the cavity
    handle = trimesh.creation.torus(major_radius=big, minor_radius=small, major_sections=24, minor_sections=10)
    handle.apply_translation((r + big + small - wall / 2, h / 2, 0))
    return [("body", trimesh.util.concatenate([walls, bottom])), ("handle", handle)]


def _lamp(rng: np.random.Generator) -> list[Part]:
    base_r, pole_h = rng.uniform(0.15, 0.25), rng.uniform(0.8, 1.2)
    shade_r, shade_h = rng.uniform(0.25, 0.35), rng.uniform(0.3, 0.4)
    base = _cyl(base_r, 0.05, (0, 0.025, 0), n=32)
    pole = _cyl(0.02, pole_h, (0, 0.05 + pole_h / 2, 0), n=12)
    shade = _cone(shade_r, shade_h, (0, 0.05 + pole_h - shade_h * 0.6, 0), "y")
    return [("base", base), ("pole", pole), ("shade", shade)]


def _bottle(rng: np.random.Generator) -> list[Part]:
    r, h = rng.uniform(0.12, 0.18), rng.uniform(0.5, 0.7)
    neck_r, neck_h, shoulder = rng.uniform(0.035, 0.05), rng.uniform(0.15, 0.25), rng.uniform(0.1, 0.2)
    body = _cyl(r, h, (0, h / 2, 0), n=32)
    shoulder_m = _cone(r, shoulder / (1 - neck_r / r), (0, h, 0), "y")
    neck = _cyl(neck_r, neck_h, (0, h + shoulder + neck_h / 2 - 0.01, 0), n=24)
    cap = _cyl(neck_r * 1.15, 0.05, (0, h + shoulder + neck_h + 0.015, 0), n=24)
    return [("body", trimesh.util.concatenate([body, shoulder_m])), ("neck", neck), ("cap", cap)]


def _telephone(rng: np.random.Generator) -> list[Part]:
    w, bh, d = rng.uniform(0.45, 0.6), rng.uniform(0.12, 0.18), rng.uniform(0.4, 0.55)
    base = _box((w, bh, d), (0, bh / 2, 0))
    handset = _place(
        trimesh.creation.capsule(height=w * 0.8, radius=0.05, count=[12, 12]), (0, bh + 0.05, d * 0.2), "x"
    )
    keypad = _box((w * 0.5, 0.02, d * 0.35), (0, bh + 0.01, -d * 0.22))  # keys face the front (-Z)
    return [("base", base), ("handset", handset), ("keypad", keypad)]


def _cellphone(rng: np.random.Generator) -> list[Part]:
    w, h, t = rng.uniform(0.35, 0.45), rng.uniform(0.75, 0.9), rng.uniform(0.04, 0.06)
    body = _box((w, h, t), (0, h / 2, 0))
    screen = _box((w * 0.9, h * 0.85, 0.006), (0, h / 2, -t / 2 - 0.003))  # the screen faces the front (-Z)
    camera = _cyl(0.03, 0.01, (w * 0.3, h * 0.88, t / 2 + 0.005), "z", n=16)
    return [("body", body), ("screen", screen), ("camera", camera)]


Builder = Callable[[np.random.Generator], list[Part]]

# synset id -> (taxonomy name as ShapeNet spells it, builder, base colour per part)
CATEGORIES: dict[str, tuple[str, Builder, dict[str, tuple[float, float, float]]]] = {
    "02691156": (
        "airplane,aeroplane,plane",
        _airplane,
        {"fuselage": (0.8, 0.8, 0.85), "wing": (0.6, 0.6, 0.7), "tail": (0.8, 0.2, 0.2)},
    ),
    "02876657": (
        "bottle",
        _bottle,
        {"body": (0.2, 0.6, 0.3), "neck": (0.2, 0.55, 0.3), "cap": (0.9, 0.85, 0.2)},
    ),
    "02958343": (
        "car,auto,automobile,machine,motorcar",
        _car,
        {
            "body": (0.7, 0.1, 0.1),
            "window": (0.2, 0.3, 0.4),
            "wheel": (0.05, 0.05, 0.05),
            "headlight": (0.95, 0.95, 0.8),
        },
    ),
    "02992529": (
        "cellular telephone,cellular phone,cellphone,cell,mobile phone",
        _cellphone,
        {"body": (0.15, 0.15, 0.18), "screen": (0.05, 0.1, 0.2), "camera": (0.3, 0.3, 0.3)},
    ),
    "03001627": (
        "chair",
        _chair,
        {"seat": (0.6, 0.4, 0.2), "frame": (0.35, 0.2, 0.1), "back": (0.6, 0.4, 0.2)},
    ),
    "03636649": (
        "lamp",
        _lamp,
        {"base": (0.2, 0.2, 0.2), "pole": (0.7, 0.7, 0.7), "shade": (0.95, 0.9, 0.7)},
    ),
    "03797390": ("mug", _mug, {"body": (0.9, 0.9, 0.85), "handle": (0.2, 0.4, 0.8)}),
    "04379243": ("table", _table, {"top": (0.55, 0.35, 0.2), "leg": (0.3, 0.2, 0.1)}),
    "04401088": (
        "telephone,phone,telephone set",
        _telephone,
        {"base": (0.1, 0.1, 0.1), "handset": (0.15, 0.15, 0.15), "keypad": (0.8, 0.8, 0.8)},
    ),
}

AIRPLANE, BOTTLE, CAR, CHAIR, LAMP, MUG, TABLE = (
    "02691156",
    "02876657",
    "02958343",
    "03001627",
    "03636649",
    "03797390",
    "04379243",
)


# 3. ShapeNet-style files


@dataclasses.dataclass(frozen=True)
class _Model:
    obj: bytes
    mtl: bytes
    info: dict[str, object]
    texture: bytes | None = None


def _model_id(seed: int, synset: str, key: str) -> str:
    """A 32-hex-digit id like ShapeNet's, fixed by the seed."""
    return hashlib.md5(f"pointvl-fixture/{seed}/{synset}/{key}".encode()).hexdigest()


def _texture(rng: np.random.Generator) -> bytes:
    """A 64x64 label of horizontal stripes."""
    colours = (rng.uniform(0, 255, size=(4, 3))).astype(np.uint8)
    img = np.repeat(colours, 16, axis=0)[:, None, :].repeat(64, axis=1)
    buf = _io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _build(synset: str, model_id: str, rng: np.random.Generator, textured: bool = False) -> _Model:
    name, builder, palette = CATEGORIES[synset]
    parts = builder(rng)
    raw = np.concatenate([m.vertices for _, m in parts])
    lo, hi = raw.min(0), raw.max(0)
    center, scale = (lo + hi) / 2, 1.0 / np.linalg.norm(hi - lo)  # ShapeNet v2: bbox centred, diagonal 1

    lines = [f"# pointvl fixture: {name.split(',')[0]}", "mtllib model_normalized.mtl", "o model"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in (raw - center) * scale]
    if textured:  # cylindrical projection around +Y, one vt per vertex
        u = np.arctan2(raw[:, 0], raw[:, 2]) / (2 * np.pi) + 0.5
        v = (raw[:, 1] - lo[1]) / (hi[1] - lo[1])
        lines += [f"vt {a:.6f} {b:.6f}" for a, b in zip(u, v, strict=True)]
    offset = 1
    mtl = []
    for material, mesh in parts:
        lines += [f"g {material}", f"usemtl {material}"]
        faces = mesh.faces + offset
        fmt = "f {0}/{0} {1}/{1} {2}/{2}" if textured else "f {0} {1} {2}"
        lines += [fmt.format(*f) for f in faces.tolist()]
        offset += len(mesh.vertices)
        kd = np.clip(np.array(palette[material]) + rng.uniform(-0.08, 0.08, 3), 0, 1)
        mtl += [
            f"newmtl {material}",
            "Ka 0.100000 0.100000 0.100000",
            "Kd {:.6f} {:.6f} {:.6f}".format(*kd),
            "Ks 0.200000 0.200000 0.200000",
            "Ns 10.000000",
            "d 1.000000",
            "illum 2",
        ]
        if textured and material == "body":
            mtl.append("map_Kd ../images/texture0.png")
        mtl.append("")
    # like real ShapeNet, the json's bounds are in the source frame, not the OBJ's (+ 0.0 drops -0.0)
    info = {
        "id": model_id,
        "numVertices": len(raw),
        "min": (lo.round(6) + 0.0).tolist(),
        "max": (hi.round(6) + 0.0).tolist(),
        "centroid": (raw.mean(0).round(6) + 0.0).tolist(),
    }
    return _Model(
        obj=("\n".join(lines) + "\n").encode(),
        mtl=("\n".join(mtl)).encode(),
        info=info,
        texture=_texture(rng) if textured else None,
    )


def _write(root: str, synset: str, model_id: str, model: _Model) -> None:
    folder = io.join(root, synset, model_id)
    io.write_bytes(io.join(folder, "models", "model_normalized.obj"), model.obj)
    io.write_bytes(io.join(folder, "models", "model_normalized.mtl"), model.mtl)
    io.write_json(io.join(folder, "models", "model_normalized.json"), model.info)
    if model.texture is not None:
        io.write_bytes(io.join(folder, "images", "texture0.png"), model.texture)


def _strip_faces(obj: bytes) -> bytes:
    return b"\n".join(line for line in obj.split(b"\n") if not line.startswith(b"f "))


def _corrupt(obj: bytes) -> bytes:
    """Cut the OBJ mid-file, add binary junk and a face that points past the last vertex."""
    head = obj[: len(obj) // 3]
    return head[: head.rfind(b"\n")] + b"\nv 0.12 \x00\xff\xfe nan\nf 1 2 999999\n\x89PNG\x00\x00garbage"


def _map_vertices(obj: bytes, fn: Callable[[np.ndarray], np.ndarray], suffix: str = "") -> bytes:
    """``obj`` with every ``v x y z`` line replaced by ``fn(xyz)`` (plus ``suffix``)."""
    out = []
    for line in obj.decode().split("\n"):
        if line.startswith("v "):
            xyz = fn(np.array([float(t) for t in line.split()[1:4]]))
            line = "v " + " ".join(repr(float(c)) for c in xyz) + suffix
        out.append(line)
    return "\n".join(out).encode()


def _millimetres(obj: bytes) -> bytes:
    """Arbitrary units: millimetres, the origin at a corner (as CAD exports are)."""
    return _map_vertices(obj, lambda v: v * 1000.0 + np.array([500.0, 320.0, -75.0]))


def _vertex_colours(obj: bytes) -> bytes:
    """``v x y z r g b`` and no material library (photogrammetry and MeshLab exports)."""
    lines = [ln for ln in _map_vertices(obj, lambda v: v, " 0.8 0.3 0.1").split(b"\n")
             if not ln.startswith((b"mtllib", b"usemtl"))]
    return b"\n".join(lines)


def _negative_indices(obj: bytes) -> bytes:
    """Faces that count back from the last vertex (``f -3 -2 -1``), legal OBJ."""
    n = sum(line.startswith(b"v ") for line in obj.split(b"\n"))
    return b"\n".join(
        b"f " + b" ".join(str(int(i) - n - 1).encode() for i in line.split()[1:]) if line.startswith(b"f ") else line
        for line in obj.split(b"\n")
    )


def _stray_triangle(obj: bytes) -> bytes:
    n = sum(line.startswith(b"v ") for line in obj.split(b"\n"))
    return obj + f"v 200 200 200\nv 200.1 200 200\nv 200 200.1 200\nf {n + 1} {n + 2} {n + 3}\n".encode()


def _first_vertex(value: str) -> Callable[[bytes], bytes]:
    def damage(obj: bytes) -> bytes:
        head, tail = obj.split(b"\nv ", 1)
        return head + f"\nv {value} ".encode() + tail.split(b" ", 1)[1]

    return damage


def _quad_table() -> bytes:
    """A table of boxes written with quad faces, and a hexagonal top face (polygons, as SketchUp writes)."""
    lines = ["# quads and polygons", "o table"]
    n = 0
    boxes = [((0, 0.72, 0), (1.2, 0.04, 0.7))] + [((x, 0.35, z), (0.05, 0.7, 0.05)) for x in (-0.55, 0.55)
                                                   for z in (-0.3, 0.3)]
    for (cx, cy, cz), (sx, sy, sz) in boxes:
        signs = [(a, b, c) for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)]
        corners = [(cx + a * sx / 2, cy + b * sy / 2, cz + c * sz / 2) for a, b, c in signs]
        lines += [f"v {x:.4f} {y:.4f} {z:.4f}" for x, y, z in corners]
        quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
        lines += ["f " + " ".join(str(n + i + 1) for i in q) for q in quads]
        n += 8
    ring = [(0.3 * np.cos(a), 0.76, 0.2 * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 6, endpoint=False)]
    lines += [f"v {x:.4f} {y:.4f} {z:.4f}" for x, y, z in ring]
    lines.append("f " + " ".join(str(n + i + 1) for i in range(6)))
    return ("\n".join(lines) + "\n").encode()


# 4. the whole tree


def write_fixture(out_dir: str, seed: int = 0, catalogue: bool = False) -> FixtureManifest:
    """Write the mini ShapeNetCore v2 to ``out_dir`` (local path or fsspec URL) and describe it.

    Every random choice follows ``seed``: the same seed gives byte-identical files. ``catalogue``
    adds the fault catalogue of real-world OBJ files (module docstring; local folders only: it
    plants a symbolic link).
    Raises ``InputError`` if ``out_dir`` already holds files (stale models would mix in).
    """
    fs, path = io.filesystem(out_dir)
    if fs.exists(path) and fs.ls(path):
        raise InputError(f"{out_dir} is not empty: give write_fixture a new or empty folder")
    models: dict[str, list[str]] = {s: [] for s in CATEGORIES}
    faults: list[Fault] = []
    textured: list[str] = []
    good: dict[tuple[str, str], _Model] = {}

    def add(
        synset: str,
        key: str,
        model_id: str | None = None,
        textured: bool = False,
        damage: Callable[[bytes], bytes] | None = None,
    ) -> tuple[str, _Model]:
        model_id = model_id or _model_id(seed, synset, key)
        rng = np.random.default_rng(int(_model_id(seed, synset, key), 16))
        model = _build(synset, model_id, rng, textured)
        if damage is not None:
            model = dataclasses.replace(model, obj=damage(model.obj))
        _write(out_dir, synset, model_id, model)
        models[synset].append(model_id)
        return model_id, model

    # 1. the good models: MODELS_PER_SYNSET per category, one bottle textured
    for synset in CATEGORIES:
        for i in range(MODELS_PER_SYNSET):
            is_textured = synset == BOTTLE and i == 0
            model_id, model = add(synset, str(i), textured=is_textured)
            good[synset, model_id] = model
            if is_textured:
                textured.append(f"{synset}/{model_id}")

    # 2. one model id under chair and table, each a mesh of its own category
    shared = _model_id(seed, CHAIR, "multi")
    add(CHAIR, "multi", shared)
    add(TABLE, "multi", shared)
    faults += [
        Fault(CHAIR, shared, "model_in_two_categories", f"{TABLE}/{shared}"),
        Fault(TABLE, shared, "model_in_two_categories", f"{CHAIR}/{shared}"),
    ]

    # 3. an empty model folder
    empty = _model_id(seed, MUG, "empty")
    fs.makedirs(io.filesystem(io.join(out_dir, MUG, empty))[1], exist_ok=True)
    models[MUG].append(empty)
    faults.append(Fault(MUG, empty, "missing_obj"))

    # 4. vertices but no faces
    bare_id, _ = add(AIRPLANE, "no_faces", damage=_strip_faces)
    faults.append(Fault(AIRPLANE, bare_id, "no_faces"))

    # 5. a corrupt OBJ
    bad_id, _ = add(LAMP, "corrupt", damage=_corrupt)
    faults.append(Fault(LAMP, bad_id, "unreadable"))

    # 6. an exact copy of the first car, under an id that sorts after it
    original = min(models[CAR])
    k = 0
    while (copy_id := _model_id(seed, CAR, f"copy{k}")) <= original:
        k += 1
    src = good[CAR, original]
    _write(out_dir, CAR, copy_id, _Model(src.obj, src.mtl, {**src.info, "id": copy_id}))
    models[CAR].append(copy_id)
    faults.append(Fault(CAR, copy_id, "duplicate_geometry", f"{CAR}/{original}"))

    quirks: dict[str, str] = {}
    if catalogue:
        quirks = _catalogue(out_dir, seed, add, models, faults)

    # 7. the taxonomy, with telephone listing cellphone as its child
    taxonomy = [
        {
            "synsetId": synset,
            "name": name,
            "children": sorted(c for c, p in HYPONYMS.items() if p == synset),
            "numInstances": len(models[synset]),
        }
        for synset, (name, _, _) in sorted(CATEGORIES.items())
    ]
    io.write_json(io.join(out_dir, "taxonomy.json"), taxonomy)

    manifest = FixtureManifest(
        root=out_dir,
        seed=seed,
        models={s: tuple(sorted(ids)) for s, ids in models.items()},
        faults=tuple(faults),
        textured=tuple(textured),
        quirks=quirks,
    )
    logger.info(
        "wrote %d models in %d synsets to %s (%d faulty)",
        sum(map(len, models.values())),
        len(models),
        out_dir,
        len(faults),
    )
    return manifest


NOT_IN_TAXONOMY = "99999999"


def _catalogue(out_dir: str, seed: int, add: Callable[..., tuple[str, _Model]], models: dict[str, list[str]],
               faults: list[Fault]) -> dict[str, str]:
    """Plant the fault catalogue (module docstring); returns the kept quirks, appends the faults."""
    import os

    quirks: dict[str, str] = {}
    for synset, key, damage in [
        (CHAIR, "millimetres", _millimetres),
        (TABLE, "vertex_colours", _vertex_colours),
        (MUG, "utf16", lambda obj: b"\xff\xfe" + obj.decode().encode("utf-16-le")),
        (LAMP, "bom_crlf", lambda obj: b"\xef\xbb\xbf" + obj.replace(b"\n", b"\r\n")),
        (AIRPLANE, "negative_indices", _negative_indices),
        (TABLE, "quads", lambda obj: _quad_table()),
    ]:
        model_id, _ = add(synset, key, damage=damage)
        quirks[f"{synset}/{model_id}"] = key
    model_id, _ = add(BOTTLE, "missing_texture", textured=True)
    io.filesystem(io.join(out_dir, BOTTLE, model_id, "images", "texture0.png"))[0].rm(
        io.filesystem(io.join(out_dir, BOTTLE, model_id, "images", "texture0.png"))[1])
    quirks[f"{BOTTLE}/{model_id}"] = "missing_texture"

    for synset, key, damage, reason in [
        (CHAIR, "stray_triangle", _stray_triangle, "stray_geometry"),
        (CAR, "huge_vertex", _first_vertex("1e300"), "out_of_range"),
        (MUG, "nan_vertex", _first_vertex("nan"), "non_finite"),
        (LAMP, "line_only", lambda obj: obj.replace(b"\nf ", b"\nl "), "no_faces"),
    ]:
        model_id, _ = add(synset, key, damage=damage)
        faults.append(Fault(synset, model_id, reason))

    original_id, original = add(CHAIR, "converted_original")  # kept; its copy in inches is the same shape
    copy = f"{original_id}-inches"
    _write(out_dir, CHAIR, copy, dataclasses.replace(original, obj=_map_vertices(original.obj, lambda v: v / 0.0254)))
    models[CHAIR].append(copy)
    faults.append(Fault(CHAIR, copy, "duplicate_geometry", f"{CHAIR}/{original_id}"))
    lone, _ = add(LAMP, "one_triangle", damage=lambda obj: b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    faults.append(Fault(LAMP, lone, "too_few_faces"))

    twins = ("Case-Twin", "case-twin")  # ids equal but for case: one file name where case is ignored
    for key, other in zip(twins, twins[::-1], strict=True):
        model_id, _ = add(LAMP, key, key)
        faults.append(Fault(LAMP, model_id, "id_collision", f"{LAMP}/{other}"))

    stray = _model_id(seed, NOT_IN_TAXONOMY, "0")
    _write(out_dir, NOT_IN_TAXONOMY, stray, _build(CHAIR, stray, np.random.default_rng(seed)))
    models[NOT_IN_TAXONOMY] = [stray]
    faults.append(Fault(NOT_IN_TAXONOMY, stray, "synset_not_in_taxonomy"))

    loop = _model_id(seed, CAR, "link_loop")
    link = io.filesystem(io.join(out_dir, CAR, loop))[1]
    os.symlink(link, link)  # a link to itself: is_dir() is False, so it would vanish unreported
    models[CAR].append(loop)
    faults.append(Fault(CAR, loop, "broken_link"))
    return quirks

"""Catch and false-flag rates of refine's alignment gate. ``python -m benchmarks.bench_alignment`` prints JSON.

Renders: the mini ShapeNet fixture's good models (:mod:`pointvl.testing.fixture`), every view of
``views`` per model, by the project's Open3D renderer at ``side``². Each render goes through an
edit-like change (:data:`EDITS`: what a refine that keeps the geometry does to the pixels), and then
is left in place (false flags are counted) or misaligned as a refine can misalign it: a shift of
2-8 px in a random direction (sub-pixel, bilinear) or a zoom by 1.1 or 1/1.1 about the image centre
(catches are counted). The gate (:func:`pointvl.dataset.stages.alignment.alignment`) runs with
:class:`~pointvl.dataset.stages.refine.RefineConfig`'s default thresholds.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

from pointvl.dataset.stages.alignment import alignment
from pointvl.dataset.stages.refine import RefineConfig
from pointvl.testing.fixture import FixtureManifest

Rgb = NDArray[np.uint8]


def _recolour(rgb: Rgb, mask: NDArray[np.bool_], rng: np.random.Generator) -> NDArray[np.float64]:
    x = rgb.astype(np.float64)
    return np.where(mask[..., None], x[..., rng.permutation(3)] * rng.uniform(0.7, 1.2), x)


def _texture(rgb: Rgb, mask: NDArray[np.bool_], rng: np.random.Generator) -> NDArray[np.float64]:
    field = ndimage.gaussian_filter(rng.normal(size=mask.shape), 6.0)
    field /= field.std() + 1e-9
    return np.where(mask[..., None], rgb * (1.0 + 0.2 * field[..., None]), rgb)


def _noise(rgb: Rgb, mask: NDArray[np.bool_], rng: np.random.Generator) -> NDArray[np.float64]:
    return rgb + rng.normal(0.0, 4.0, rgb.shape)


def _smooth(rgb: Rgb, mask: NDArray[np.bool_], rng: np.random.Generator) -> NDArray[np.float64]:
    return ndimage.gaussian_filter(rgb.astype(np.float64), (1.0, 1.0, 0.0))  # anti-aliased edges


def _background(rgb: Rgb, mask: NDArray[np.bool_], rng: np.random.Generator) -> NDArray[np.float64]:
    ramp = np.linspace(0.0, 12.0, rgb.shape[0])[:, None, None]  # off-white, with a soft gradient
    return np.where(mask[..., None], rgb, np.array([245.0, 242.0, 236.0]) - ramp)


def _resample(rgb: Rgb, mask: NDArray[np.bool_], rng: np.random.Generator) -> NDArray[np.float64]:
    h, w = mask.shape  # the refine round trip: up to ~1 MP and back
    big = Image.fromarray(rgb).resize((2 * w, 2 * h), Image.Resampling.LANCZOS)
    return np.asarray(big.resize((w, h), Image.Resampling.LANCZOS), dtype=np.float64)


def _pale(rgb: Rgb, mask: NDArray[np.bool_], rng: np.random.Generator) -> NDArray[np.float64]:
    return np.where(mask[..., None], rgb + 0.5 * (255.0 - rgb), rgb)  # halfway to the background colour


def _all(rgb: Rgb, mask: NDArray[np.bool_], rng: np.random.Generator) -> NDArray[np.float64]:
    out = rgb
    for edit in (_recolour, _texture, _background, _smooth, _noise):
        out = np.clip(edit(out, mask, rng), 0, 255).astype(np.uint8)
    return out.astype(np.float64)


EDITS: dict[str, Callable[[Rgb, NDArray[np.bool_], np.random.Generator], NDArray[np.float64]]] = {
    "none": lambda rgb, mask, rng: rgb.astype(np.float64),
    "recolour": _recolour, "texture": _texture, "noise": _noise, "smooth": _smooth,
    "background": _background, "resample": _resample, "all": _all, "pale": _pale,
}
"""Edit-like changes; ``all`` chains recolour, texture, background, smooth and noise; ``pale`` (the
object halfway to the background colour) is the hard case, reported apart."""


def shift(rgb: Rgb, dx: float, dy: float) -> Rgb:
    """``rgb`` moved by ``(dx, dy)`` px (bilinear), the uncovered border in the background colour."""
    fill = np.median(np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]), axis=0)
    out = [ndimage.shift(rgb[..., c].astype(np.float64), (dy, dx), order=1, mode="constant", cval=fill[c])
           for c in range(3)]
    return np.clip(np.rint(np.stack(out, axis=-1)), 0, 255).astype(np.uint8)


def zoom(rgb: Rgb, scale: float) -> Rgb:
    """``rgb`` scaled by ``scale`` about the image centre (bicubic), as a grid mismatch does."""
    h, w = rgb.shape[:2]
    fill = tuple(int(v) for v in np.median(np.concatenate([rgb[0], rgb[-1]]), axis=0))
    a = 1.0 / scale  # output (x, y) samples the input at centre + (x - centre) / scale
    coeffs = (a, 0.0, w / 2 * (1 - a), 0.0, a, h / 2 * (1 - a))
    return np.asarray(Image.fromarray(rgb).transform((w, h), Image.Transform.AFFINE, coeffs,
                                                     Image.Resampling.BICUBIC, fillcolor=fill))


def fixture_renders(side: int = 512, views: int = 3, every: int = 1,
                    manifest: FixtureManifest | None = None) -> list[tuple[str, Rgb, NDArray[np.bool_]]]:
    """``(instance_id, rgb, mask)`` of the fixture's good models (``manifest``, else a fresh fixture),
    ``views`` views each, every ``every``-th."""
    from pointvl.core import images
    from pointvl.dataset.mesh import load_model
    from pointvl.dataset.stages.render import Render, RenderConfig
    from pointvl.testing.fixture import write_fixture

    if manifest is None:
        with tempfile.TemporaryDirectory() as root:
            return fixture_renders(side, views, every, write_fixture(root, seed=0))
    render = Render(RenderConfig(width=side, height=side, views_per_model=views, backend="open3d"))
    out = []
    for synset, ids in manifest.good.items():
        for model_id in ids:
            mesh = load_model(f"{manifest.root}/{synset}/{model_id}/models/model_normalized.obj")
            for row in render.run_model(mesh, synset, model_id):
                out.append((row["instance_id"], images.decode_rgb(row["render"]), images.decode_mask(row["mask"])))
    return out[::every]


def rates(renders: list[tuple[str, Rgb, NDArray[np.bool_]]], edits: tuple[str, ...] = tuple(EDITS),
          config: RefineConfig | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per edit: ``false_flag`` (unmoved items flagged), ``caught_shift`` (2-8 px), ``caught_zoom``
    (x1.1 or /1.1), and the worst scores of the unmoved items."""
    cfg = config or RefineConfig()
    rng = np.random.default_rng(seed)
    result = {}
    for name in edits:
        flags: dict[str, list[bool]] = {"false_flag": [], "caught_shift": [], "caught_zoom": []}
        unmoved = []
        for _, rgb, mask in renders:
            edited = np.clip(EDITS[name](rgb, mask, rng), 0, 255).astype(np.uint8)
            d, angle = rng.uniform(2.0, 8.0), rng.uniform(0.0, 2 * np.pi)
            cases = {"false_flag": edited, "caught_shift": shift(edited, d * np.cos(angle), d * np.sin(angle)),
                     "caught_zoom": zoom(edited, 1.1 if rng.random() < 0.5 else 1 / 1.1)}
            for key, image in cases.items():
                iou, moved, scale = alignment(image, mask, cfg.align_tolerance)
                flags[key].append(cfg.misaligned(iou, moved, scale))
                if key == "false_flag":
                    unmoved.append((iou, moved, max(scale, 1 / scale)))
        scores = np.array(unmoved)
        result[name] = {k: round(float(np.mean(v)), 4) for k, v in flags.items()} | {
            "n": len(renders), "unmoved_iou_min": round(float(scores[:, 0].min()), 4),
            "unmoved_shift_px_max": round(float(scores[:, 1].max()), 3),
            "unmoved_scale_max": round(float(scores[:, 2].max()), 3)}
    return result


def run(side: int = 512, views: int = 3, every: int = 3, seed: int = 1) -> dict:
    """The README's figures: 36 of the fixture's 108 views at 512², seed 1 (~8 min on 2 loaded cores)."""
    renders = fixture_renders(side, views, every)
    cfg = RefineConfig()
    return {"side": side, "renders": len(renders), "align_iou_min": cfg.align_iou_min,
            "align_shift_max_px": cfg.align_shift_max_px, "align_scale_max": cfg.align_scale_max,
            "align_tolerance": cfg.align_tolerance,
            "rates": rates(renders, config=cfg, seed=seed)}


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))

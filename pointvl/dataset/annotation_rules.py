"""What the annotate stage knows without a model, and how it reads a model's answer (pure functions).

- the facts given to the LLM: dominant named colours under the mask, the category choices;
- the offline annotator: template QA and a description from those facts (deterministic);
- checks of the LLM's structured output beyond its JSON Schema (the category answer is the known
  category, every answer is among its choices);
- grounding: a VLM box in its family's convention (Qwen2.5-VL: absolute pixels of its resized input,
  sides multiples of 28; Qwen3-VL: 0-1000 relative) back to pixels of the image, clamped to it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from pointvl.core.chat_client import InvalidReply, parse_json_reply
from pointvl.core.images import smart_resize

# Named colours for the dominant-colour facts (nearest in RGB).
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
    "red": (200, 30, 30),
    "orange": (240, 140, 20),
    "yellow": (235, 215, 40),
    "green": (40, 150, 60),
    "blue": (40, 80, 200),
    "purple": (130, 50, 170),
    "pink": (240, 150, 190),
    "brown": (120, 75, 40),
}
AXES = ("left-right (width)", "up-down (height)", "front-back (depth)")


def vlm_box_to_pixels(
    box: list[float],
    convention: str,
    width: int,
    height: int,
    min_pixels: int = 3136,
    max_pixels: int = 12845056,
) -> list[float]:
    """A VLM box in its family's convention -> ``[x1, y1, x2, y2]`` pixels of a ``width x height``
    image, clamped to ``[0, W] x [0, H]``. Raises :class:`InvalidReply` if nothing is left."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if convention == "qwen2.5-vl":
        rh, rw = smart_resize(height, width, 28, min_pixels, max_pixels)
        sx, sy = width / rw, height / rh
    elif convention in ("qwen3-vl", "relative1000"):
        sx, sy = width / 1000.0, height / 1000.0
    else:
        sx = sy = 1.0
    out = [
        min(max(x1 * sx, 0.0), width),
        min(max(y1 * sy, 0.0), height),
        min(max(x2 * sx, 0.0), width),
        min(max(y2 * sy, 0.0), height),
    ]
    if not (out[2] > out[0] and out[3] > out[1]):
        raise InvalidReply(f"the box {box} is empty inside the {width}x{height} image (need x1 < x2, y1 < y2)")
    return out


def dominant_colours(rgb: np.ndarray, mask: np.ndarray, top: int = 3, min_share: float = 0.1) -> list[dict]:
    """Named colours covering at least ``min_share`` of the masked pixels, largest first."""
    pixels = rgb[mask].reshape(-1, 3).astype(np.float32)
    if len(pixels) == 0:
        return []
    names = list(PALETTE)
    ref = np.asarray([PALETTE[n] for n in names], dtype=np.float32)
    nearest = np.argmin(((pixels[:, None, :] - ref[None]) ** 2).sum(-1), axis=1)
    share = np.bincount(nearest, minlength=len(names)) / len(pixels)
    order = np.argsort(-share, kind="stable")
    return [{"name": names[i], "share": round(float(share[i]), 3)} for i in order[:top] if share[i] >= min_share]


def _rng(instance_id: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(instance_id.encode()).digest()[:8], "little"))


def category_choices(category: str, categories: list[str], n: int, instance_id: str) -> list[str]:
    """The true category plus ``n - 1`` distractors from ``categories``, in a per-instance order."""
    rng = _rng(instance_id)
    others = sorted(c for c in set(categories) if c != category)
    picked = [others[i] for i in rng.permutation(len(others))[: n - 1]]
    choices = [category, *picked]
    return [choices[i] for i in rng.permutation(len(choices))]


def template_annotation(facts: dict[str, Any], choices: list[str], instance_id: str) -> dict[str, Any]:
    """The offline annotator: QA and a description from the measured facts only (deterministic)."""
    rng = _rng(instance_id + "/template")
    category, size = facts["category"], facts["size"]
    dims = [size["width_x"], size["height_y"], size["depth_z"]]
    colours = [c["name"] for c in facts["dominant_colours"]] or ["grey"]
    others = [c for c in PALETTE if c != colours[0]]
    colour_choices = [colours[0], *[others[i] for i in rng.permutation(len(others))[:3]]]
    colour_choices = [colour_choices[i] for i in rng.permutation(4)]
    longest = AXES[int(np.argmax(dims))]
    qa = [
        {
            "question": "Which category does the object in the image belong to?",
            "choices": choices,
            "answer": category,
        },
        {
            "question": "What is the dominant colour of the object?",
            "choices": colour_choices,
            "answer": colours[0],
        },
        {"question": "Along which axis is the object longest?", "choices": list(AXES), "answer": longest},
        {
            "question": "Is the object taller than it is wide?",
            "choices": ["yes", "no"],
            "answer": "yes" if dims[1] > dims[0] else "no",
        },
        {
            "question": "Is the object deeper from front to back than it is wide?",
            "choices": ["yes", "no"],
            "answer": "yes" if dims[2] > dims[0] else "no",
        },
    ]
    colour_text = colours[0] if len(colours) == 1 else f"{', '.join(colours[:-1])} and {colours[-1]}"
    description = (
        f"{'An' if category[:1].lower() in 'aeiou' else 'A'} {category}, mostly {colour_text}. "
        f"Its axis-aligned bounding box measures {dims[0]:.2f} wide, "
        f"{dims[1]:.2f} tall and {dims[2]:.2f} deep in normalized model units, so it is longest "
        f"{longest.split(' ')[0]}."
    )
    return {"qa": qa, "description": description}


def check_annotation(obj: Any, schema: dict, category: str, categories: list[str]) -> dict[str, Any]:
    """Validate the LLM's object against ``schema`` and the facts; -> ``{"qa": [...], "description"}``."""
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        raise InvalidReply(f"schema violation at /{'/'.join(map(str, e.path))}: {e.message}")
    cq = obj["category_question"]
    if cq["answer"] != category:
        raise InvalidReply(f"the category question's answer must be {category!r}, got {cq['answer']!r}")
    unknown = [c for c in cq["choices"] if c not in categories]
    if unknown:
        raise InvalidReply(f"category choices {unknown} are not categories of the benchmark")
    qa = [cq, *obj["attribute_qa"]]
    for i, q in enumerate(qa):
        if q["answer"] not in q["choices"]:
            raise InvalidReply(f"question {i}: the answer {q['answer']!r} is not among its choices {q['choices']}")
        if len(set(q["choices"])) != len(q["choices"]):
            raise InvalidReply(f"question {i}: repeated choices {q['choices']}")
    return {"qa": qa, "description": obj["description"]}


def parse_grounding(
    content: str, convention: str, width: int, height: int, min_pixels: int = 3136, max_pixels: int = 12845056
) -> list[float]:
    """A grounding reply (``{"bbox_2d": [...]}`` or a list of them, fenced or not) -> pixel box."""
    obj = parse_json_reply(content)
    if isinstance(obj, list):
        if not obj:
            raise InvalidReply("the reply is an empty list: no box")
        obj = obj[0]
    box = obj.get("bbox_2d", obj.get("bbox")) if isinstance(obj, dict) else None
    if not (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, int | float) for v in box)
        and all(math.isfinite(v) for v in box)
    ):
        raise InvalidReply('expected {"bbox_2d": [x1, y1, x2, y2]} with 4 numbers')
    return vlm_box_to_pixels(box, convention, width, height, min_pixels, max_pixels)


def strict_schema(schema: dict) -> dict:
    """The schema as sent for OpenAI strict structured outputs (keywords it does not accept removed;
    the full schema is still checked locally)."""
    if isinstance(schema, dict):
        return {
            k: strict_schema(v) for k, v in schema.items() if k not in ("$schema", "$id", "minLength", "maxLength")
        }
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    return schema

"""Stage `review`: a person (or a timeout policy) approves or rejects items before they reach the shards.

For each work shard this module draws a **contact sheet** (``RUN/previews/review-shard-{i:05d}.png``):
one triptych per instance, render | refined | photoreal, captioned with the instance id, the drift
score and the VLM/mask box agreement, with the mask box (green) and the VLM's box (red) drawn on the
photoreal panel; flagged items have a red frame and are listed first.

A decision covers every instance of a shard and is written as the stage table
``RUN/stages/review/shard-{i:05d}.parquet`` (``instance_id, decision, reason, reviewer, decided_at,
flagged, source``), which :mod:`pointvl.dataset.stages.write_shards` reads: rejected instances never reach
the shards, every other column lands in the record's provenance. Each decision is also appended to
``RUN/reports/review_log.jsonl`` (who, when, what, from which source) before the table is written,
so the log holds every decision the shards reflect.

When nobody answers in time, or when the gate is off, :func:`policy_decisions` applies
``ReviewConfig.timeout_policy`` (``accept_unflagged``: flagged items are held out of the shards;
``accept_all``: everything is approved).
"""

from __future__ import annotations

import io as _io
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from pointvl.core import io
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.base import Drops, ShardOutput, Stage
from pointvl.dataset.tables import finished, ran, read_stage_table

logger = logging.getLogger(__name__)

STAGE = "review"
GATES = ("auto", "on", "off")
POLICIES = ("accept_unflagged", "accept_all")
DECISIONS = ("approved", "rejected", "held")
HELD_REASON = "held: flagged (pose drift or VLM/mask box disagreement) and not reviewed before the timeout"
SCHEMA = pa.schema([
    ("instance_id", pa.string()),
    ("decision", pa.string()),
    ("reason", pa.string()),
    ("reviewer", pa.string()),
    ("decided_at", pa.string()),
    ("flagged", pa.bool_()),
    ("source", pa.string()),
])
MASK_BOX = (40, 200, 60)
VLM_BOX = (230, 40, 40)


@dataclass
class ReviewConfig:
    """The human review gate between annotation and the final shards (``docs/design.md#the-dag``).

    Args:
        gate: ``auto`` pauses for review only in runs started from a deployment (scheduled or
            deployed builds); ``on`` always pauses; ``off`` never pauses and applies
            ``timeout_policy`` at once (the default for ``pointvl build`` / ``make demo``).
        timeout_s: how long a paused build waits for an answer before the policy applies.
        timeout_policy: ``accept_unflagged`` approves unflagged items and holds flagged ones out of
            the shards; ``accept_all`` approves everything.
        poll_s: how often a paused build checks whether it was answered.
        preview_host, preview_port: where the build serves ``RUN/previews/`` over HTTP while it waits
            (port 0 picks a free one). Bind ``0.0.0.0`` only on a trusted network.
        preview_base_url: the URL reviewers' browsers use for that server (default
            ``http://{preview_host}:{port}``); set it when they reach the machine by another name.
        thumb_px: side of each panel of a triptych in the contact sheet.
        sheet_columns: triptychs per row of a contact sheet. One column keeps a page's sheet 504 px
            wide, within the resume form's description at 1400x1000, so its 16 px ids show at >= 12 px
            (``tests/ops/test_review_pages.py`` measures it in Chromium); two columns shrink them to ~7 px.
        page_size: items per review page: a page is one form, with its own sheet and every id of the
            page as a choice. A shard is split into pages of at most this many items (its flagged
            items first), so a page never spans two shards and a shard's review table is written as
            soon as its last page is answered.
    """

    gate: str = "auto"
    timeout_s: int = 86400
    timeout_policy: str = "accept_unflagged"
    poll_s: int = 10
    preview_host: str = "127.0.0.1"
    preview_port: int = 8765
    preview_base_url: str = ""
    thumb_px: int = 160
    sheet_columns: int = 1
    page_size: int = 24

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise ValueError(f"review.gate must be one of {GATES}, got {self.gate!r}")
        if self.timeout_policy not in POLICIES:
            raise ValueError(f"review.timeout_policy must be one of {POLICIES}, got {self.timeout_policy!r}")
        if self.timeout_s < 1 or self.poll_s < 1:
            raise ValueError("review.timeout_s and review.poll_s must be >= 1 second")
        if not 0 <= self.preview_port <= 65535:
            raise ValueError(f"review.preview_port must be in [0, 65535] (0 = any free port), got {self.preview_port}")
        if self.thumb_px < 32 or self.sheet_columns < 1:
            raise ValueError("review.thumb_px must be >= 32 and review.sheet_columns >= 1")
        if not 1 <= self.page_size <= 1000:
            raise ValueError(f"review.page_size must be in [1, 1000] items per form, got {self.page_size}")


@dataclass(frozen=True)
class Item:
    """What a reviewer sees of one instance."""

    instance_id: str
    flagged: bool
    drift: float | None
    vlm_agreement: float | None


def sheet_name(shard_index: int) -> str:
    return f"review-shard-{shard_index:05d}.png"


def unreviewed(run_dir: str, shard_indices: list[int]) -> list[int]:
    return [i for i in shard_indices if not finished(run_dir, STAGE, i)]


def _optional_rows(run_dir: str, stage: str, shard_index: int) -> dict[str, dict]:
    if not ran(run_dir, stage, shard_index):
        return {}
    return {r["instance_id"]: r for r in read_stage_table(run_dir, stage, shard_index).to_pylist()}


def _inputs(run_dir: str, shard_index: int) -> tuple[dict[str, dict], dict[str, dict[str, dict]]]:
    for stage in ("render", "kpts2d"):
        if not finished(run_dir, stage, shard_index):
            raise RuntimeError(f"review shard {shard_index:05d}: stage {stage} has not finished; run it first")
    render = {r["instance_id"]: r for r in read_stage_table(run_dir, "render", shard_index).to_pylist()}
    others = {s: _optional_rows(run_dir, s, shard_index) for s in ("kpts2d", "refine", "synthesize", "annotate")}
    return render, others


def _item(iid: str, others: dict[str, dict[str, dict]]) -> Item:
    synth = others["synthesize"].get(iid) or {}
    annotate = others["annotate"].get(iid) or {}
    refine = others["refine"].get(iid) or {}  # align_flagged: refine's alignment gate (absent in older runs)
    return Item(
        instance_id=iid,
        flagged=bool(synth.get("drift_flagged") or annotate.get("annotate_flagged") or refine.get("align_flagged")),
        drift=synth.get("drift"),
        vlm_agreement=annotate.get("vlm_agreement"),
    )


def items(run_dir: str, shard_index: int) -> list[Item]:
    """The shard's instances in render order, with their flags and scores."""
    render, others = _inputs(run_dir, shard_index)
    return [_item(iid, others) for iid in render]


def contact_sheet(run_dir: str, shard_index: int, config: ReviewConfig) -> bytes:
    """The shard's contact sheet as PNG bytes (flagged items first, then render order)."""
    render, others = _inputs(run_dir, shard_index)
    rows = sorted((_item(iid, others) for iid in render), key=lambda it: not it.flagged)
    return _draw(rows, render, others, f"shard {shard_index:05d}", config)


def shard_pages(run_dir: str, shard_index: int, page_size: int) -> list[list[Item]]:
    """The shard's review pages: its items, flagged first (then render order), in runs of ``page_size``.
    A function of the shard's tables only, so a page means the same items in every process and day."""
    rows = sorted(items(run_dir, shard_index), key=lambda it: not it.flagged)
    return [rows[k:k + page_size] for k in range(0, len(rows), page_size)]


def page_sheet_name(shard_index: int, page: int) -> str:
    return f"review-shard-{shard_index:05d}-page-{page:03d}.png"


def page_sheet(run_dir: str, shard_index: int, page: int, config: ReviewConfig) -> bytes:
    """The contact sheet of one review page as PNG bytes."""
    render, others = _inputs(run_dir, shard_index)
    pages = shard_pages(run_dir, shard_index, config.page_size)
    return _draw(pages[page], render, others, f"shard {shard_index:05d} page {page + 1}/{len(pages)}", config)


def write_page_sheet(run_dir: str, shard_index: int, page: int, config: ReviewConfig) -> tuple[str, int]:
    """Write ``RUN/previews/review-shard-{i:05d}-page-{j:03d}.png``; returns its path and size in bytes."""
    path = io.join(RunFolder.of(run_dir).previews, page_sheet_name(shard_index, page))
    data = page_sheet(run_dir, shard_index, page, config)
    io.write_bytes(path, data)
    return path, len(data)


def _draw(rows: list[Item], render: dict[str, dict], others: dict[str, dict[str, dict]], title: str,
          config: ReviewConfig) -> bytes:
    # Text at 16 px (the default bitmap font is ~7 px): ids stay readable where the UI scales the sheet down.
    font = ImageFont.load_default(size=16)
    t, pad, caption = config.thumb_px, 6, 44
    cell_w, cell_h = 3 * t + 2 * pad, t + caption + pad
    cols = min(config.sheet_columns, max(1, len(rows)))
    header = 50
    n_rows = max(1, -(-len(rows) // cols))
    sheet = Image.new("RGB", (cols * (cell_w + pad) + pad, header + n_rows * (cell_h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    n_flagged = sum(it.flagged for it in rows)
    draw.text((pad, 4), f"{title}: {len(rows)} items, {n_flagged} flagged (first)",
              fill=(0, 0, 0), font=font)
    draw.text((pad, 26), "render | refined | photoreal; green = mask, red = VLM", fill=(0, 0, 0), font=font)
    for n, item in enumerate(rows):
        x0 = pad + (n % cols) * (cell_w + pad)
        y0 = header + (n // cols) * (cell_h + pad)
        r = render[item.instance_id]
        refined = (others["refine"].get(item.instance_id) or {}).get("refined", r["render"])
        image = (others["synthesize"].get(item.instance_id) or {}).get("image", refined)
        for k, png in enumerate((r["render"], refined, image)):
            panel = Image.open(_io.BytesIO(png)).convert("RGB").resize((t, t))
            sheet.paste(panel, (x0 + k * (t + pad), y0))
        sx, sy = t / r["width"], t / r["height"]
        px = x0 + 2 * (t + pad)
        boxes = [(others["kpts2d"][item.instance_id]["bbox2d"], MASK_BOX)]
        vlm = (others["annotate"].get(item.instance_id) or {}).get("bbox2d_vlm")
        if vlm is not None:
            boxes.append((vlm, VLM_BOX))
        for box, colour in boxes:
            x1, y1, x2, y2 = box
            draw.rectangle([px + x1 * sx, y0 + y1 * sy, px + x2 * sx - 1, y0 + y2 * sy - 1], outline=colour, width=2)
        if item.flagged:
            draw.rectangle([x0 - 3, y0 - 3, x0 + cell_w + 2, y0 + t + 2], outline=VLM_BOX, width=3)
        drift = "n/a" if item.drift is None else f"{item.drift:.2f}"
        iou = "n/a" if item.vlm_agreement is None else f"{item.vlm_agreement:.2f}"
        draw.text((x0, y0 + t + 3), item.instance_id, fill=(0, 0, 0), font=font)
        draw.text((x0, y0 + t + 23), f"drift {drift}  VLM/mask IoU {iou}" + ("  FLAGGED" if item.flagged else ""),
                  fill=VLM_BOX if item.flagged else (60, 60, 60), font=font)
    buf = _io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def write_contact_sheets(run_dir: str, shard_indices: list[int], config: ReviewConfig) -> list[str]:
    """Write ``RUN/previews/review-shard-{i:05d}.png`` for each shard; return their paths."""
    folder = RunFolder.of(run_dir)
    paths = []
    for i in shard_indices:
        path = io.join(folder.previews, sheet_name(i))
        io.write_bytes(path, contact_sheet(run_dir, i, config))
        paths.append(path)
    logger.info("review: wrote %d contact sheets under %s", len(paths), folder.previews)
    return paths


def _page_answer_path(run_dir: str, shard_index: int, page: int) -> str:
    return RunFolder.of(run_dir).path("reports", "review_pages", f"shard-{shard_index:05d}-page-{page:03d}.json")


def save_page_answer(run_dir: str, shard_index: int, page: int, ids: list[str], rejected: dict[str, str],
                     reviewer: str, decided_at: str, source: str) -> None:
    """Keep a page's answer in ``RUN/reports/review_pages/`` (written whole or not at all): it outlives the
    flow run, server restarts and days, until the shard's review table is written from it."""
    if not reviewer.strip():
        raise ValueError("a review needs the reviewer's name")
    unknown = sorted(set(rejected) - set(ids))
    if unknown:
        raise ValueError(f"rejected ids {unknown} are not on this page (shard {shard_index:05d}, page {page + 1}); "
                         "pick ids from the page's sheet")
    io.write_json(_page_answer_path(run_dir, shard_index, page), {
        "shard_index": shard_index, "page": page, "ids": ids, "rejected": rejected, "reviewer": reviewer,
        "decided_at": decided_at, "source": source})


def page_answers(run_dir: str, shard_index: int, pages: list[list[Item]]) -> dict[int, dict]:
    """The answered pages of a shard (page → answer); an answer kept for other items (the shard was
    recomputed since) does not count."""
    out = {}
    for j, page in enumerate(pages):
        path = _page_answer_path(run_dir, shard_index, j)
        if io.exists(path):
            answer = io.read_json(path, "review page answer")
            if answer["ids"] == [it.instance_id for it in page]:
                out[j] = answer
    return out


def paged_decisions(run_dir: str, shard_index: int, page_size: int, rest: dict | None) -> list[dict] | None:
    """The shard's decisions from its answered pages; the items of unanswered pages take ``rest``
    (``decision, reason, reviewer, decided_at, source``) when given, else the shard is not decided
    yet (``None``)."""
    pages = shard_pages(run_dir, shard_index, page_size)
    answers = page_answers(run_dir, shard_index, pages)
    if rest is None and len(answers) < len(pages):
        return None
    rows = []
    for j, page in enumerate(pages):
        answer = answers.get(j)
        for item in page:
            if answer is None:
                row = dict(rest)  # type: ignore[arg-type]
                if row.pop("hold_flagged", False) and item.flagged:
                    row.update(decision="held", reason=HELD_REASON)
            else:
                reason = answer["rejected"].get(item.instance_id)
                row = {"decision": "rejected" if reason is not None else "approved", "reason": reason or "",
                       "reviewer": answer["reviewer"], "decided_at": answer["decided_at"], "source": answer["source"]}
            rows.append({"instance_id": item.instance_id, "flagged": item.flagged, **row})
    return rows


def policy_rest(policy: str, why: str) -> dict:
    """``rest`` for :func:`paged_decisions` from the timeout policy (``why``: ``timeout`` or ``gate off``)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown review policy {policy!r}; use one of {POLICIES}")
    return {"decision": "approved", "reason": "", "reviewer": f"policy:{policy}", "decided_at": now_iso(),
            "source": why, "hold_flagged": policy == "accept_unflagged"}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def form_decisions(
    run_dir: str,
    shard_indices: list[int],
    approve_all: bool,
    rejected: dict[str, str],
    reviewer: str,
    source: str,
) -> dict[int, list[dict]]:
    """Decisions per shard from a reviewer's answer: ``rejected`` (instance id → reason) are rejected,
    everything else approved. ``approve_all`` with rejections, or an id outside these shards, is an error."""
    if approve_all and rejected:
        raise ValueError("answer either approve_all or a list of rejected items, not both")
    if not reviewer.strip():
        raise ValueError("a review needs the reviewer's name")
    at = now_iso()
    out: dict[int, list[dict]] = {}
    seen: set[str] = set()
    for i in shard_indices:
        rows = []
        for item in items(run_dir, i):
            reason = rejected.get(item.instance_id)
            seen.add(item.instance_id)
            rows.append({
                "instance_id": item.instance_id, "decision": "rejected" if reason is not None else "approved",
                "reason": reason or "", "reviewer": reviewer, "decided_at": at, "flagged": item.flagged,
                "source": source,
            })
        out[i] = rows
    unknown = sorted(set(rejected) - seen)
    if unknown:
        raise ValueError(f"rejected ids {unknown} are not in the shards under review {shard_indices}; "
                         "copy ids from the contact sheets")
    return out


def policy_decisions(run_dir: str, shard_indices: list[int], policy: str, why: str) -> dict[int, list[dict]]:
    """Decisions per shard from the timeout policy (``why``: ``timeout`` or ``gate off``)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown review policy {policy!r}; use one of {POLICIES}")
    at = now_iso()
    out: dict[int, list[dict]] = {}
    for i in shard_indices:
        out[i] = [{
            "instance_id": item.instance_id,
            "decision": "held" if policy == "accept_unflagged" and item.flagged else "approved",
            "reason": HELD_REASON if policy == "accept_unflagged" and item.flagged else "",
            "reviewer": f"policy:{policy}", "decided_at": at, "flagged": item.flagged, "source": why,
        } for item in items(run_dir, i)]
    return out


def apply_decisions(run_dir: str, shard_index: int, decisions: list[dict]) -> dict:
    """Log ``decisions`` for one shard, then write its review table (the shard's finished marker)."""
    t0 = time.perf_counter()
    expected = [it.instance_id for it in items(run_dir, shard_index)]
    got = [d["instance_id"] for d in decisions]
    if sorted(got) != sorted(expected):
        raise ValueError(f"review shard {shard_index:05d}: decisions must cover exactly its {len(expected)} items")
    bad = {d["decision"] for d in decisions} - set(DECISIONS)
    if bad:
        raise ValueError(f"review decisions must be one of {DECISIONS}, got {sorted(bad)}")
    _append_log(run_dir, shard_index, decisions)
    stats = _write_review_table(run_dir, shard_index, decisions, t0)
    logger.info("review shard %05d: %d approved, %d rejected, %d held", shard_index, stats["approved"],
                stats["rejected"], stats["held"])
    return stats


def _append_log(run_dir: str, shard_index: int, decisions: list[dict]) -> None:
    lines = "".join(json.dumps({"shard_index": shard_index, **d}, sort_keys=True) + "\n" for d in decisions)
    path = RunFolder.of(run_dir).review_log
    io.write_bytes(path, (io.read_bytes(path) if io.exists(path) else b"") + lines.encode())


def _write_review_table(run_dir: str, shard_index: int, decisions: list[dict], t0: float) -> dict:
    review = Review()
    return review.write(run_dir, shard_index, review.output(decisions), Drops(STAGE), time.perf_counter() - t0)


class Review(Stage):
    """Stage ``review``: one decision per item of the shard. A person's answer (the Prefect form, the
    CLI) is written by :func:`apply_decisions`; run as a stage, where there is no one to ask, the
    ``timeout_policy`` decides (a build with the gate off)."""

    name = STAGE
    inputs = ("annotate", "synthesize")
    schema = SCHEMA
    config_class = ReviewConfig

    def process_shard(self, run: RunFolder, shard_index: int, drops: Drops) -> ShardOutput:
        decisions = policy_decisions(str(run), [shard_index], self.config.timeout_policy, "gate off")[shard_index]
        _append_log(str(run), shard_index, decisions)
        return self.output(decisions)

    @staticmethod
    def output(decisions: list[dict]) -> ShardOutput:
        """The table of ``decisions`` with their counts. Made from no table: a person's decisions stay
        valid when an input is recomputed under the same key."""
        return ShardOutput(decisions, {d: sum(row["decision"] == d for row in decisions) for d in DECISIONS},
                           made_from=())


def held_items(run_dir: str, shard_indices: list[int]) -> dict[int, list[str]]:
    """Per reviewed shard, the ids the timeout policy held back (they wait for a person)."""
    out = {}
    for i in shard_indices:
        if finished(run_dir, STAGE, i):
            rows = read_stage_table(run_dir, STAGE, i).to_pylist()
            held = [r["instance_id"] for r in rows if r["decision"] == "held"]
            if held:
                out[i] = held
    return out


def decide_held(run_dir: str, shard_indices: list[int], approve_all: bool, rejected: dict[str, str],
                reviewer: str) -> dict[str, int]:
    """Answer for held items after the build: approve all of them, or reject the listed ids (the rest are
    approved). Rewrites the shards' review tables and logs the new decisions; the next build or
    ``pointvl resume`` rewrites the affected final shards (their review table is newer)."""
    held = held_items(run_dir, shard_indices)
    unknown = sorted(set(rejected) - {iid for ids in held.values() for iid in ids})
    if unknown:
        raise ValueError(f"ids {unknown} are not held for review; held: {sorted(i for v in held.values() for i in v)}")
    at, counts = now_iso(), {"approved": 0, "rejected": 0}
    for i, ids in held.items():
        t0 = time.perf_counter()
        rows = read_stage_table(run_dir, STAGE, i).to_pylist()
        changed = []
        for row in rows:
            if row["instance_id"] in ids:
                reason = rejected.get(row["instance_id"])
                row.update(decision="rejected" if reason is not None else "approved", reason=reason or "",
                           reviewer=reviewer, decided_at=at, source="cli (held)")
                counts[row["decision"]] += 1
                changed.append(row)
        _append_log(run_dir, i, changed)
        _write_review_table(run_dir, i, rows, t0)
    return counts


def read_log(run_dir: str) -> list[dict]:
    path = RunFolder.of(run_dir).review_log
    if not io.exists(path):
        return []
    return [json.loads(line) for line in io.read_bytes(path).decode().splitlines() if line.strip()]


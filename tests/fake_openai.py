"""A small OpenAI-compatible HTTP server on 127.0.0.1 for tests, with fault injection.

Speaks ``POST /v1/chat/completions``, ``POST /v1/files`` (multipart), ``GET /v1/files/{id}/content``,
``POST /v1/batches`` and ``GET /v1/batches/{id}``. Replies come from a "brain" that plays both models:

- a request with a ``json_schema`` response format named ``annotation`` gets an annotation built
  from the schema's enums (the category choices and answer the client narrowed it to);
- any other request is grounding: the image's object (pixels that differ from the corner colour) is
  boxed in the coordinate convention ``vlm_convention`` (``qwen2.5-vl``: pixels of the processor's
  resized image; ``qwen3-vl``: 0-1000 relative; ``absolute``), inside a Markdown fence as Qwen writes;
- a request whose text asks for ``kpts3d`` is a benchmark prediction (``pointvl predict --endpoint``):
  the six-field object plus ``attribute_answers``, the object's box and two points inside it as keypoints in
  ``vlm_convention`` (``bins``: the benchmark's 0-999 bins), the first choice as every answer.

``GET /v1/models`` lists ``models``.

Faults (:meth:`FakeOpenAI.inject`): ``429`` (with ``retry-after-ms``), ``500``, ``timeout`` (the reply
comes after ``timeout_sleep_s``), ``disconnect`` (socket closed, no reply), ``401``, ``bad_json``
(content that is not JSON), ``schema`` (JSON that breaks the schema), ``no_json`` (prose only),
``text_plain`` (HTTP 200 with a ``text/plain`` body), ``null_message`` (HTTP 200,
``choices[0].message: null``), ``echo_key`` (a valid answer holding the key), each ``times`` times,
optionally only for requests ``match`` accepts.
Every request is recorded (never the key itself: only whether the Authorization header carried the
expected one). Bounded: request bodies over 64 MB get 413, sockets time out after 30 s, handler
threads are daemons and the server stops with the test.
"""

from __future__ import annotations

import base64
import email.parser
import hashlib
import io
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

MAX_BODY = 64 * 1024 * 1024


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 12845056
) -> tuple[int, int]:
    """Qwen2.5-VL's processor resize (transformers ``smart_resize``), restated for the fake model."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def first_image(body: dict[str, Any]) -> bytes | None:
    for m in body.get("messages", []):
        if isinstance(m.get("content"), list):
            for part in m["content"]:
                if part.get("type") == "image_url":
                    return base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
    return None


def image_sha(body: dict[str, Any]) -> str | None:
    png = first_image(body)
    return hashlib.sha256(png).hexdigest() if png is not None else None


def prompt_text(body: dict[str, Any]) -> str:
    return "".join(
        part.get("text", "") if isinstance(part, dict) else str(part)
        for m in body.get("messages", [])
        for part in (m["content"] if isinstance(m.get("content"), list) else [m.get("content") or ""])
    )


def request_kind(body: dict[str, Any]) -> str:
    if "response_format" in body:
        return "qa"
    return "predict" if "kpts3d" in prompt_text(body) else "ground"


@dataclass
class Fault:
    kind: str
    times: int
    match: Callable[[dict[str, Any]], bool] | None = None


@dataclass
class Record:
    path: str
    method: str
    kind: str | None
    image_sha: str | None
    status: int
    authorized: bool
    body: dict[str, Any] | None = field(repr=False, default=None)


class FakeOpenAI:
    """Start with ``with FakeOpenAI(api_key="sk-test") as srv:``; ``srv.base_url`` is the ``/v1`` URL."""

    def __init__(
        self,
        api_key: str = "sk-test-key",
        vlm_convention: str = "qwen2.5-vl",
        timeout_sleep_s: float = 1.0,
        batch_polls_to_complete: int = 1,
        models: tuple[str, ...] = ("fake-vlm",),
    ) -> None:
        self.models = models
        self.api_key = api_key
        self.vlm_convention = vlm_convention
        self.timeout_sleep_s = timeout_sleep_s
        self.batch_polls_to_complete = batch_polls_to_complete
        self.faults: list[Fault] = []
        self.records: list[Record] = []
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._polls: dict[str, int] = {}
        self._lock = threading.Lock()
        self._ids = 0
        self._server: ThreadingHTTPServer | None = None

    # -- control -----------------------------------------------------------------------------
    def inject(self, kind: str, times: int = 1, match: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.faults.append(Fault(kind, times, match))

    def chat_records(self) -> list[Record]:
        return [r for r in self.records if r.path.endswith("/chat/completions")]

    def paid(self) -> list[Record]:
        """Chat requests the server answered (status 200), batch lines included."""
        return [r for r in self.records if r.kind is not None and r.status == 200]

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    # -- models ------------------------------------------------------------------------------
    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}-{self._ids:06d}"

    def _take_fault(self, body: dict[str, Any]) -> str | None:
        with self._lock:
            for f in self.faults:
                if f.times > 0 and (f.match is None or f.match(body)):
                    f.times -= 1
                    return f.kind
        return None

    def brain(self, body: dict[str, Any]) -> str:
        rf = body.get("response_format") or {}
        if rf.get("type") == "json_schema":
            props = rf["json_schema"]["schema"]["properties"]["category_question"]["properties"]
            choices, answer = props["choices"]["items"]["enum"], props["answer"]["enum"][0]
            return json.dumps(
                {
                    "category_question": {
                        "question": "Which category does this object belong to?",
                        "choices": choices,
                        "answer": answer,
                    },
                    "attribute_qa": [
                        {"question": "Does the object have visible legs?", "choices": ["yes", "no"], "answer": "no"},
                        {
                            "question": "What is the overall shape?",
                            "choices": ["boxy", "round", "thin"],
                            "answer": "boxy",
                        },
                        {
                            "question": "Is the surface glossy or matte?",
                            "choices": ["glossy", "matte"],
                            "answer": "matte",
                        },
                    ],
                    "description": f"A compact {answer} with a blocky silhouette and flat faces.",
                }
            )
        png = first_image(body)
        assert png is not None, "a grounding request must carry an image"
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        h, w = rgb.shape[:2]
        fg = np.any(rgb != rgb[0, 0], axis=2)
        ys, xs = np.nonzero(fg)
        x1, y1, x2, y2 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        if self.vlm_convention == "qwen2.5-vl":
            rh, rw = smart_resize(h, w)
            box = [x1 * rw / w, y1 * rh / h, x2 * rw / w, y2 * rh / h]
        elif self.vlm_convention in ("qwen3-vl", "relative1000", "norm1000"):
            box = [x1 / w * 1000, y1 / h * 1000, x2 / w * 1000, y2 / h * 1000]
        elif self.vlm_convention == "bins":
            box = [x1 / w * 999, y1 / h * 999, x2 / w * 999, y2 / h * 999]
        else:
            box = [x1, y1, x2, y2]
        box = [round(v) for v in box]
        if request_kind(body) == "predict":
            return self.prediction(body, box)
        return "```json\n" + json.dumps([{"bbox_2d": box, "label": "object"}]) + "\n```"

    def prediction(self, body: dict[str, Any], box: list[int]) -> str:
        """The six-field answer of a benchmark prediction request (module docstring)."""
        text = prompt_text(body)
        first = [line.split(": ", 1)[1].split(", ")[0] for line in text.splitlines() if line.startswith("Choices: ")]
        attributes = [line.split("(choices: ", 1)[1].split(", ")[0].rstrip(")") for line in text.splitlines()
                      if "(choices: " in line]
        top = 999 if self.vlm_convention == "bins" else 1000
        x1, y1, x2, y2 = box
        obj = {
            "answer": first[0] if first else "",
            "description": "A small object with a plain box shape.",
            "bbox2d": box,
            "bbox3d": [top // 4, top // 4, top // 4, 3 * top // 4, 3 * top // 4, 3 * top // 4],
            "kpts2d": [[(3 * x1 + x2) // 4, (3 * y1 + y2) // 4], [(x1 + 3 * x2) // 4, (y1 + 3 * y2) // 4]],
            "kpts3d": [[top // 2, top // 2, top // 2]],
            "attribute_answers": attributes,
        }
        return "```json\n" + json.dumps(obj) + "\n```"

    def completion(self, body: dict[str, Any], content: str) -> dict[str, Any]:
        return {
            "id": self._next_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content, "refusal": None},
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
        }

    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any] | str | None, dict[str, str]]:
        """(status, JSON reply or None for 'close the socket', extra headers) for one chat request."""
        fault = self._take_fault(body)
        if fault == "429":
            return 429, {"error": {"message": "Rate limit reached", "type": "requests"}}, {"retry-after-ms": "5"}
        if fault == "500":
            return 500, {"error": {"message": "The server had an error", "type": "server_error"}}, {}
        if fault == "401":
            return 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}, {}
        if fault == "disconnect":
            return 0, None, {}
        if fault == "timeout":
            time.sleep(self.timeout_sleep_s)
        if fault == "bad_json":
            return 200, self.completion(body, '{"category_question": {"question": "trunc'), {}
        if fault == "schema":
            return 200, self.completion(body, json.dumps({"description": "missing everything else"})), {}
        if fault == "no_json":
            return 200, self.completion(body, "I see a small object, but I will not write JSON."), {}
        if fault == "text_plain":
            return 200, "upstream proxy: service temporarily unavailable", {"Content-Type": "text/plain"}
        if fault == "echo_key":  # a proxy that copies the Authorization header into a valid answer
            echoed = self.brain(body).replace('"description": "', f'"description": "Bearer {self.api_key} ')
            return 200, self.completion(body, echoed.replace('"label": "object"', f'"label": "{self.api_key}"')), {}
        if fault == "null_message":
            reply = self.completion(body, "")
            reply["choices"][0]["message"] = None
            return 200, reply, {}
        return 200, self.completion(body, self.brain(body)), {}

    def run_batch(self, batch: dict[str, Any]) -> None:
        out, err = [], []
        for line in self.files[batch["input_file_id"]]["data"].decode().splitlines():
            if not line.strip():
                continue
            req = json.loads(line)
            status, reply, _ = self.answer(req["body"])
            with self._lock:
                self.records.append(
                    Record(
                        "batch-line",
                        "POST",
                        request_kind(req["body"]),
                        image_sha(req["body"]),
                        status or 599,
                        True,
                        req["body"],
                    )
                )
            rid = self._next_id("batch_req")
            if status == 200:
                out.append(
                    {
                        "id": rid,
                        "custom_id": req["custom_id"],
                        "error": None,
                        "response": {"status_code": 200, "request_id": rid, "body": reply},
                    }
                )
            else:
                err.append(
                    {
                        "id": rid,
                        "custom_id": req["custom_id"],
                        "response": {"status_code": status or 500, "request_id": rid, "body": reply or {}},
                        "error": {"code": "server_error", "message": f"status {status}"},
                    }
                )
        for key, lines in (("output_file_id", out), ("error_file_id", err)):
            if lines:
                fid = self._next_id("file")
                data = ("\n".join(json.dumps(x) for x in lines) + "\n").encode()
                self.files[fid] = {"data": data, "filename": f"{key}.jsonl", "purpose": "batch_output"}
                batch[key] = fid
        batch.update(
            status="completed",
            completed_at=int(time.time()),
            request_counts={"total": len(out) + len(err), "completed": len(out), "failed": len(err)},
        )


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAI
    protocol_version = "HTTP/1.1"
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, obj: Any, headers: dict[str, str] | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(obj).encode()
        headers = dict(headers or {})
        self.send_response(status)
        kind = headers.pop("Content-Type", "application/json" if raw is None else "application/octet-stream")
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (an injected timeout)
            self.close_connection = True

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.fake.api_key}"

    def _body(self) -> bytes | None:
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            self._send(413, {"error": {"message": "request too large"}})
            return None
        return self.rfile.read(n)

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        fake, path = self.fake, self.path.split("?")[0]
        raw = self._body()
        if raw is None:
            return
        auth = self._authorized()
        if path == "/v1/chat/completions":
            body = json.loads(raw)
            record = Record(path, "POST", request_kind(body), image_sha(body), 0, auth, body)
            with fake._lock:  # recorded on arrival, so a request still being answered is counted
                fake.records.append(record)
            if not auth:
                status, reply, headers = 401, {"error": {"message": "bad key"}}, {}
            else:
                status, reply, headers = fake.answer(body)
            record.status = status
            if reply is None:  # disconnect: close without a reply
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if isinstance(reply, str):  # a body that is not JSON
                self._send(status, None, headers, raw=reply.encode())
            else:
                self._send(status, reply, headers)
        elif path == "/v1/files":
            msg = email.parser.BytesParser().parsebytes(
                b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw
            )
            parts = {p.get_param("name", header="content-disposition"): p for p in msg.get_payload()}
            fid = fake._next_id("file")
            data = parts["file"].get_payload(decode=True)
            fake.files[fid] = {
                "data": data,
                "filename": parts["file"].get_filename(),
                "purpose": parts["purpose"].get_payload(),
            }
            fake.records.append(Record(path, "POST", None, None, 200, auth))
            self._send(
                200,
                {
                    "id": fid,
                    "object": "file",
                    "bytes": len(data),
                    "created_at": int(time.time()),
                    "filename": fake.files[fid]["filename"],
                    "purpose": "batch",
                    "status": "processed",
                },
            )
        elif path == "/v1/batches":
            req = json.loads(raw)
            bid = fake._next_id("batch")
            fake.batches[bid] = {
                "id": bid,
                "object": "batch",
                "endpoint": req["endpoint"],
                "input_file_id": req["input_file_id"],
                "completion_window": req["completion_window"],
                "status": "validating",
                "created_at": int(time.time()),
            }
            fake._polls[bid] = 0
            fake.records.append(Record(path, "POST", None, None, 200, auth))
            self._send(200, fake.batches[bid])
        else:
            self._send(404, {"error": {"message": f"no route {path}"}})

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        fake, path = self.fake, self.path.split("?")[0]
        auth = self._authorized()
        fake.records.append(Record(path, "GET", None, None, 200, auth))
        parts = path.strip("/").split("/")
        if parts == ["v1", "models"]:
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in fake.models]
            if auth:
                self._send(200, {"object": "list", "data": data})
            else:
                self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
        elif parts[:2] == ["v1", "batches"] and len(parts) == 3 and parts[2] in fake.batches:
            batch = fake.batches[parts[2]]
            with fake._lock:
                fake._polls[batch["id"]] += 1
                polls = fake._polls[batch["id"]]
            if batch["status"] != "completed":
                if polls >= fake.batch_polls_to_complete:
                    fake.run_batch(batch)
                else:
                    batch["status"] = "in_progress"
            self._send(200, batch)
        elif parts[:2] == ["v1", "files"] and len(parts) == 4 and parts[3] == "content" and parts[2] in fake.files:
            self._send(200, None, raw=fake.files[parts[2]]["data"])
        else:
            self._send(404, {"error": {"message": f"no route {path}"}})

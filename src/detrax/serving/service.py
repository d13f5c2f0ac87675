"""`detrax serve`: a detector behind HTTP (Starlette under uvicorn), loaded once.

    POST /detect   the image as the raw body (Content-Type image/*) or as the multipart form field `image`;
                   query `threshold` (a score in [0, 1]) and `task` (detection, segm, panoptic: a mask model's);
                   answers JSON: the image's size and its detections (box x0, y0, x1, y1 in pixels, score, label,
                   name; segm adds each one's mask, panoptic gives segments, as COCO RLE)
    GET  /health   {"status": "ok", "waiting": requests queued, "batches": run so far}
    GET  /info     the model, its classes, its val transform, the runtime, the batching settings
    GET  /         a page: pick or drop an image, see the boxes drawn, a threshold slider (page.html)

Concurrent requests are gathered into batches (`batcher.Batcher`); a full queue answers 503, a bad upload 4xx
with what is wrong, and the service goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources

from detrax.serving import panoptic, postprocess
from detrax.serving.batcher import Batcher, Busy
from detrax.serving.images import decode_image

TASKS = ("detection", "segm", "panoptic")


@dataclasses.dataclass(frozen=True)
class Settings:
    max_batch: int = 8  # requests per batch
    window_ms: float = 10.0  # how long a request waits for others to join its batch
    queue: int = 64  # requests waiting at most; one more is answered 503
    max_bytes: int = 20 * 2**20  # an upload's size at most (413 above)


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def app(detector, settings: Settings = Settings(), warmup: bool = True):
    """The ASGI application serving `detector` (a `detrax.Detector`). `warmup`: compile for the model's val size
    before the first request is accepted."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    batcher = Batcher(lambda task, items: run(detector, str(task), items, settings.max_batch),
                      key=lambda it: it["task"], max_batch=settings.max_batch, window=settings.window_ms / 1000,
                      queue=settings.queue)
    page = importlib.resources.files("detrax.serving").joinpath("page.html").read_text()

    async def detect(request):
        try:
            item = _parse_query(request.query_params, detector)
            data = await _upload(request, settings.max_bytes)
            item["image"] = await run_in_threadpool(decode_image, data, "the upload")
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, e.status)
        except ValueError as e:  # not an image, truncated, too many pixels
            return JSONResponse({"error": str(e)}, 400)
        try:
            return JSONResponse(await batcher.submit(item))
        except Busy as e:
            return JSONResponse({"error": f"busy: {e}; try again"}, 503, headers={"Retry-After": "1"})

    async def health(request):
        return JSONResponse({"status": "ok", "waiting": batcher.waiting, "batches": batcher.batches})

    async def info(request):
        return JSONResponse(describe(detector, settings))

    async def index(request):
        return HTMLResponse(page)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        if warmup:  # each batch size a burst makes (1, 2, 4 ... max_batch), at a square image of the val size
            from PIL import Image

            size, n = detector.preprocess.size, 1
            while True:
                blank = {"image": Image.new("RGB", (size, size)), "threshold": 1.0}
                await run_in_threadpool(run, detector, "detection", [blank] * min(n, settings.max_batch),
                                        settings.max_batch)
                if n >= settings.max_batch:
                    break
                n *= 2
        batcher.start()
        try:
            yield
        finally:
            await batcher.close()

    return Starlette(routes=[Route("/detect", detect, methods=["POST"]), Route("/health", health),
                             Route("/info", info), Route("/", index)], lifespan=lifespan)


def _parse_query(query, detector) -> dict:
    task = query.get("task", "detection")
    if task not in TASKS:
        raise BadRequest(400, f"task={task!r}: one of {', '.join(TASKS)}")
    if task != "detection" and not detector.config.masks:
        raise BadRequest(400, f"task={task}: this model has no mask head; it detects boxes only")
    default = panoptic.THRESHOLD if task == "panoptic" else postprocess.THRESHOLD
    try:
        threshold = float(query.get("threshold", default))
    except ValueError:
        raise BadRequest(400, f"threshold={query.get('threshold')!r}: a number in [0, 1]") from None
    if not 0 <= threshold <= 1:
        raise BadRequest(400, f"threshold={threshold}: a number in [0, 1]")
    return {"task": task, "threshold": threshold}


async def _upload(request, max_bytes: int) -> bytes:
    """The uploaded image's bytes: the raw body (image/*) or the multipart field `image`."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + (64 * 1024 if "multipart" in kind else 0):
        raise BadRequest(413, f"the upload is {int(length)} bytes; at most {max_bytes}")
    if kind.startswith("image/") or kind == "application/octet-stream":
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise BadRequest(413, f"the upload is over {max_bytes} bytes")
        if not body:
            raise BadRequest(400, "the body is empty: send the image's bytes")
        return bytes(body)
    if kind == "multipart/form-data":
        from starlette.datastructures import UploadFile

        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=max_bytes)
        except Exception as e:  # noqa: BLE001 - the multipart parser's own errors: a malformed form
            raise BadRequest(400, f"the form cannot be read ({e})") from None
        field = form.get("image")
        if not isinstance(field, UploadFile):
            raise BadRequest(400, "the form has no file field 'image'")
        data = await field.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise BadRequest(413, f"the upload is over {max_bytes} bytes")
        return data
    raise BadRequest(415, f"Content-Type {kind or 'missing'}: send image/* (the raw image) or multipart/form-data "
                          "with the field 'image'")


def run(detector, task: str, items: list[dict], batch_size: int) -> list[dict]:
    """One batch of requests of one `task` through the detector's inference path; each request's answer."""
    from detrax.data.masks import rle_encode

    images = [it["image"] for it in items]
    lowest = min(it["threshold"] for it in items)
    if task == "panoptic":  # the threshold picks the queries the segments come from: one call per threshold
        out: dict = {}
        for t in sorted({it["threshold"] for it in items}):
            mine = [i for i, it in enumerate(items) if it["threshold"] == t]
            for i, r in zip(mine, detector.segment([images[i] for i in mine], "panoptic", t, batch_size)):
                segments = [s | {"mask": m} for s, m in zip(r["segments"], _segment_masks(r, rle_encode))]
                out[i] = {"segments": segments}
        found = [out[i] for i in range(len(items))]
    elif task == "segm":
        found = [{"detections": _detections(d, it["threshold"], rle_encode)} for d, it in
                 zip(detector.segment(images, "segm", lowest, batch_size), items)]
    else:
        found = [{"detections": _detections(d, it["threshold"])} for d, it in
                 zip(detector.predict(images, threshold=lowest, batch_size=batch_size), items)]
    return [{"width": im.width, "height": im.height, "task": task} | f for im, f in zip(images, found)]


def _detections(det: dict, threshold: float, rle_encode=None) -> list[dict]:
    keep = [i for i, s in enumerate(det["scores"]) if s >= threshold]  # best first
    masks = rle_encode(det["masks"][keep]) if rle_encode is not None and keep else [None] * len(keep)
    return [{"box": [round(float(v), 2) for v in det["boxes"][i]], "score": round(float(det["scores"][i]), 4),
             "label": int(det["labels"][i]), "name": det["names"][i]} | ({"mask": m} if m else {})
            for i, m in zip(keep, masks)]


def _segment_masks(result: dict, rle_encode) -> list:
    import numpy as np

    ids = result["ids"]
    return rle_encode(np.stack([ids == s["id"] for s in result["segments"]])) if result["segments"] else []


def describe(detector, settings: Settings) -> dict:
    """/info: the model, its classes, its val transform, the runtime, the batching."""
    c, p = detector.config, detector.preprocess
    return {"model": {"backbone": c.backbone, "dilation": c.dilation, "num_queries": c.num_queries,
                      "num_classes": int(c.num_classes), "masks": c.masks, "dtype": c.dtype},
            "classes": {str(k): v for k, v in sorted(detector.names.items())},
            "sizes": {"val_size": p.size, "max_size": p.max_size, "bucket_step": p.step},
            "runtime": detector.runtime, "tasks": list(TASKS if c.masks else TASKS[:1]),
            "batching": dataclasses.asdict(settings)}


def serve(detector, host: str = "127.0.0.1", port: int = 8000, settings: Settings = Settings()) -> None:
    """Run the service until interrupted (Ctrl-C)."""
    import uvicorn

    uvicorn.run(app(detector, settings), host=host, port=port, log_level="warning")

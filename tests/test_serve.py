"""`detrax serve`: detections equal to `Detector.predict`, concurrent requests run as batches, a full queue answers
503, bad uploads answer 4xx and the service goes on."""

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image

import detrax
from detrax.serving import service
from detrax.serving.batcher import Batcher, Busy


@pytest.fixture(scope="module")
def detector():
    return detrax.load("random:tiny", enc_layers=1, dec_layers=1)  # ONE_LAYER: a cheaper model to compile


def _png(w=96, h=64, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(detector):
    from starlette.testclient import TestClient

    with TestClient(service.app(detector, service.Settings(max_batch=4, window_ms=50), warmup=False)) as c:
        yield c


def test_detections_equal_predict_raw_or_multipart(client, detector):
    data = _png()
    want = detector.predict(Image.open(io.BytesIO(data)), threshold=0.0)
    for answer in (client.post("/detect?threshold=0", content=data, headers={"content-type": "image/png"}),
                   client.post("/detect?threshold=0", files={"image": ("a.png", data, "image/png")})):
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert (got["width"], got["height"], got["task"]) == (96, 64, "detection")
        assert len(got["detections"]) == len(want["scores"]) == detector.config.num_queries
        np.testing.assert_allclose([d["score"] for d in got["detections"]], want["scores"], atol=1e-4)
        np.testing.assert_allclose([d["box"] for d in got["detections"]], want["boxes"], atol=0.01)
        assert [d["name"] for d in got["detections"]] == want["names"]
    strict = client.post("/detect?threshold=0.9", content=data, headers={"content-type": "image/png"}).json()
    assert len(strict["detections"]) == int((want["scores"] >= 0.9).sum())
    info = client.get("/info").json()
    assert info["model"]["num_queries"] == detector.config.num_queries and info["runtime"] == "xla"
    assert info["tasks"] == ["detection"] and info["batching"]["max_batch"] == 4
    page = client.get("/")
    assert page.status_code == 200 and 'id="threshold"' in page.text and "fetch(\"detect" in page.text


@pytest.mark.parametrize("body,headers,query,status,message", [
    (b"not an image", {"content-type": "image/png"}, "", 400, "the upload: not a readable image"),
    (None, {"content-type": "image/png"}, "", 400, "the upload: not a readable image"),  # truncated
    (b"", {"content-type": "image/jpeg"}, "", 400, "the body is empty"),
    (b"x" * 5000, {"content-type": "image/png"}, "", 413, "at most 4096"),
    (b"{}", {"content-type": "application/json"}, "", 415, "Content-Type application/json: send image/*"),
    (None, {"content-type": "image/png"}, "?threshold=high", 400, "threshold='high': a number in [0, 1]"),
    (None, {"content-type": "image/png"}, "?threshold=2", 400, "threshold=2.0: a number in [0, 1]"),
    (None, {"content-type": "image/png"}, "?task=panoptic", 400, "task=panoptic: this model has no mask head"),
    (None, {"content-type": "image/png"}, "?task=pose", 400, "task='pose': one of detection, segm, panoptic"),
])
def test_bad_requests_answer_4xx_saying_why(detector, body, headers, query, status, message):
    from starlette.testclient import TestClient

    if body is None:
        body = _png()[:200] if "threshold" not in query and "task" not in query else _png()
    with TestClient(service.app(detector, service.Settings(max_bytes=4096), warmup=False)) as c:
        answer = c.post(f"/detect{query}", content=body, headers=headers)
        assert answer.status_code == status and message in answer.json()["error"], answer.text
        assert c.get("/health").json()["status"] == "ok"  # and it goes on


def test_a_burst_runs_as_batches_and_a_full_queue_answers_busy():
    """8 concurrent requests within the window run as 2 batches of 4; with a queue of 2 and the worker held, the
    third waiting request is refused (the service answers it 503)."""
    calls, gate = [], threading.Event()

    def run(kind, items):
        gate.wait(5)
        calls.append(len(items))
        return [x * 10 for x in items]

    async def burst():
        b = Batcher(run, max_batch=4, window=0.2, queue=8)
        b.start()
        gate.set()
        out = await asyncio.gather(*(b.submit(i) for i in range(8)))
        await b.close()
        return out

    assert asyncio.run(burst()) == [i * 10 for i in range(8)] and calls == [4, 4]

    async def flood():
        gate.clear()
        b = Batcher(run, max_batch=1, window=0, queue=2)
        b.start()
        first = asyncio.ensure_future(b.submit(0))  # taken by the worker, which waits on the gate
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(Busy, match="2 requests are waiting already"):
            await b.submit(3)
        gate.set()
        out = await asyncio.gather(first, *waiting)
        await b.close()
        return out

    assert asyncio.run(flood()) == [0, 10, 20]


def test_a_thousand_fuzzed_bodies_leave_the_service_up(client):
    """Random bytes, truncated and corrupted PNG and JPEG files, each answered 4xx; then a real image is served."""
    rng = np.random.default_rng(1)
    good = _png(seed=2)
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(good)).save(jpeg, "JPEG")
    bodies = []
    for i in range(1000):
        base = (good, jpeg.getvalue(), b"")[i % 3]
        body = bytearray(base[:rng.integers(0, len(base) + 1)] if base else rng.bytes(rng.integers(0, 300)))
        for at in rng.integers(0, max(1, len(body)), 3 if i % 2 and body else 0):
            body[at] = rng.integers(0, 256)
        bodies.append(bytes(body))
    statuses = [client.post("/detect", content=b, headers={"content-type": "image/png"}).status_code for b in bodies]
    assert set(statuses) <= {200, 400}, sorted(set(statuses))  # a corrupted byte may still decode
    assert statuses.count(400) > 900
    assert client.post("/detect", content=good, headers={"content-type": "image/png"}).status_code == 200


def test_masks_come_as_rle_equal_to_segment():
    from pycocotools import mask as mask_utils
    from starlette.testclient import TestClient

    masked = detrax.load("random:tiny", enc_layers=1, dec_layers=1, masks=True, num_heads=8)  # widths of 8
    data = _png(seed=3)
    image = Image.open(io.BytesIO(data))
    with TestClient(service.app(masked, warmup=False)) as c:
        segm = c.post("/detect?task=segm&threshold=0", content=data, headers={"content-type": "image/png"}).json()
        pan = c.post("/detect?task=panoptic&threshold=0", content=data, headers={"content-type": "image/png"}).json()
    want = masked.segment(image, "segm", threshold=0.0)
    assert len(segm["detections"]) == len(want["scores"])
    for d, m in zip(segm["detections"], want["masks"]):
        np.testing.assert_array_equal(mask_utils.decode(d["mask"]).astype(bool), m)
    want = masked.segment(image, "panoptic", threshold=0.0)
    assert [s["id"] for s in pan["segments"]] == [s["id"] for s in want["segments"]]
    for s in pan["segments"]:
        np.testing.assert_array_equal(mask_utils.decode(s["mask"]).astype(bool), want["ids"] == s["id"])

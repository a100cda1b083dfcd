"""The HTTP service: predictions as JSON, model info, the page, and a 4xx JSON error for every bad upload."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_export import confident_val_images, real_run_cache, train_real_run, train_tiny_run

from resfit.inference.classifier import Classifier, InferenceConfig
from resfit.serve import MB, BackgroundServer, Batcher, ServeConfig, create_app, sniff_format


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_bomb(side: int = 20000) -> bytes:
    """A 20000x20000 PNG (400 million pixels) of ~50 KB: it would decode to 1.2 GB of RGB."""
    return encode(Image.new("1", (side, side)), "PNG", optimize=True)


def truncated_jpeg() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "JPEG", quality=90)
    return data[: len(data) // 2]


# Each bad request a client can send, as httpx keyword arguments, with the status it must get.
BAD_UPLOADS = {
    "text file": (
        dict(files={"file": ("notes.txt", b"just some text\n", "text/plain")}),
        415,
        "unsupported_format",
    ),
    "text named .jpg": (
        dict(files={"file": ("cat.jpg", b"<html>not a jpeg</html>", "image/jpeg")}),
        415,
        "unsupported_format",
    ),
    "truncated jpeg": (
        dict(files={"file": ("half.jpg", truncated_jpeg(), "image/jpeg")}),
        422,
        "corrupt_image",
    ),
    "50 MB file": (
        dict(files={"file": ("huge.jpg", b"\xff\xd8\xff\xe0" + bytes(50 * MB), "image/jpeg")}),
        413,
        "upload_too_large",
    ),
    "20000x20000 png bomb": (
        dict(files={"file": ("bomb.png", png_bomb(), "image/png")}),
        413,
        "too_many_pixels",
    ),
    "empty body": (dict(content=b""), 400, "empty_body"),
    "empty file": (dict(files={"file": ("empty.png", b"", "image/png")}), 400, "empty_file"),
    "wrong field name": (
        dict(files={"image": ("a.png", encode(Image.new("RGB", (40, 40)), "PNG"), "image/png")}),
        400,
        "missing_file",
    ),
    "raw image body": (
        dict(content=encode(Image.new("RGB", (40, 40)), "PNG"), headers={"content-type": "image/png"}),
        415,
        "not_multipart",
    ),
    "broken multipart": (
        dict(
            content=b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        ),
        400,
        None,
    ),
    "two files in 'file'": (
        dict(
            files=[
                ("file", ("a.png", encode(Image.new("RGB", (40, 40)), "PNG"))),
                ("file", ("b.png", encode(Image.new("RGB", (40, 40)), "PNG"))),
            ]
        ),
        400,
        "too_many_files",
    ),
}


@pytest.fixture(scope="module")
def tiny_classifier(tiny_imagefolder, tmp_path_factory, module_tmp) -> Classifier:
    run = train_tiny_run(tiny_imagefolder, tmp_path_factory.getbasetemp() / "deploy-tiny-run")
    cache = module_tmp("serve-cache")
    return Classifier.load(run, config=InferenceConfig(cache_dir=str(cache)))


@pytest.fixture(scope="module")
def client(tiny_classifier):
    with TestClient(create_app(tiny_classifier)) as test_client:
        yield test_client


def red_and_blue(tiny_imagefolder: Path) -> tuple[bytes, bytes]:
    return (
        (tiny_imagefolder / "val" / "red" / "red_000.png").read_bytes(),
        (tiny_imagefolder / "val" / "blue" / "blue_000.png").read_bytes(),
    )


def test_predict_one_image(client, tiny_classifier, tiny_imagefolder):
    red, _ = red_and_blue(tiny_imagefolder)
    response = client.post("/predict", files={"file": ("red.png", red, "image/png")}, params={"top_k": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["filename"] == "red.png"
    assert body["predicted"] == tiny_classifier.predict(red, top_k=1)[0][0]
    assert [entry["class"] for entry in body["top_k"]][0] == body["predicted"]
    assert sum(entry["probability"] for entry in body["top_k"]) == pytest.approx(1.0, abs=1e-4)


def test_predict_several_images_in_order(client, tiny_classifier, tiny_imagefolder):
    red, blue = red_and_blue(tiny_imagefolder)
    gray = encode(Image.open(io.BytesIO(red)).convert("L"), "JPEG")
    files = [
        ("files", ("red.png", red, "image/png")),
        ("files", ("blue.png", blue, "image/png")),
        ("files", ("gray.jpg", gray, "image/jpeg")),
    ]
    response = client.post("/predict", files=files)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["red.png", "blue.png", "gray.jpg"]
    assert [r["predicted"] for r in results[:2]] == [
        tiny_classifier.predict(x, top_k=1)[0][0] for x in (red, blue)
    ]
    assert results[2]["notes"] == ["grayscale (L) converted to RGB"]


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_every_bad_upload_gets_a_4xx_json_error(client, case):
    kwargs, status, code = BAD_UPLOADS[case]
    response = client.post("/predict", **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["detail"] and (code is None or body["error"] == code)


def test_limits_are_configurable_and_bad_parameters_are_4xx(tiny_classifier, tiny_imagefolder):
    red, _ = red_and_blue(tiny_imagefolder)
    gif = encode(Image.open(io.BytesIO(red)), "GIF")
    config = ServeConfig(max_upload_bytes=20_000, allowed_formats=("PNG",), max_files=2)
    with TestClient(create_app(tiny_classifier, config)) as small:
        assert small.post("/predict", files={"file": ("a.gif", gif)}).status_code == 415
        big = encode(
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)), "PNG"
        )
        assert small.post("/predict", files={"file": ("big.png", big)}).json()["error"] == "upload_too_large"
        three = [("files", (f"{i}.png", red)) for i in range(3)]
        assert small.post("/predict", files=three).status_code == 413
        assert small.post("/predict", params={"top_k": 0}, files={"file": ("a.png", red)}).status_code == 422
        assert small.get("/no/such/page").json()["error"] == "not_found"
        assert small.get("/predict").status_code == 405


def test_health_model_docs_and_page(client, tiny_classifier):
    assert client.get("/health").json() == {
        "status": "ok",
        "backend": tiny_classifier.choice.name,
        "precision": tiny_classifier.choice.precision,
    }
    model = client.get("/model").json()
    assert model["class_names"] == ["blue", "red"] and model["architecture"] == "resnet18"
    assert model["preprocessing"]["crop_size"] == 32
    assert model["metrics"]["split"] == "val"  # the run's metrics.json
    assert model["limits"]["max_upload_bytes"] == 10 * MB
    spec = client.get("/openapi.json").json()
    upload = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(upload["properties"]) == {"file", "files"}
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text  # everything served from here
    assert client.get("/static/app.js").status_code == 200


def test_sniff_format_reads_magic_bytes_not_names():
    image = Image.new("RGB", (8, 8))
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"):
        assert sniff_format(encode(image, fmt)) == fmt
    assert sniff_format(b"%PDF-1.7") is None and sniff_format(b"") is None


def test_batcher_runs_waiting_requests_together_and_splits_results():
    calls = []

    def double(batch):
        calls.append(len(batch))
        threading.Event().wait(0.05)  # long enough for the other requests to queue up
        return batch * 2

    async def scenario():
        batcher = Batcher(double, max_batch=16)
        batcher.start()
        inputs = [np.full((n, 1), i, dtype=np.float32) for i, n in enumerate([1, 2, 1, 3, 1])]
        outputs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.stop()
        return inputs, outputs

    inputs, outputs = asyncio.run(scenario())
    for x, y in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(y, x * 2)
    assert sum(calls) == 8 and len(calls) < 5  # fewer forward passes than requests


def test_real_server_answers_oversized_and_concurrent_uploads(tiny_classifier, tiny_imagefolder):
    """Over a real socket: a 50 MB body still gets its 413 JSON, and parallel requests all succeed."""
    red, blue = red_and_blue(tiny_imagefolder)
    with BackgroundServer(create_app(tiny_classifier)) as url, httpx.Client(base_url=url, timeout=60) as http:
        huge = http.post("/predict", files={"file": ("huge.png", b"\x89PNG\r\n\x1a\n" + os.urandom(50 * MB))})
        assert huge.status_code == 413 and huge.json()["error"] == "upload_too_large"
        statuses = []

        def send(data):
            statuses.append(http.post("/predict", files={"file": ("x.png", data)}).status_code)

        threads = [threading.Thread(target=send, args=(data,)) for data in [red, blue] * 4]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 8


@pytest.mark.slow
def test_real_run_service_predicts_validation_photos(shared_dir, tmp_path_factory, tmp_path):
    run = train_real_run(shared_dir, tmp_path_factory.getbasetemp())
    classifier = Classifier.load(run, config=InferenceConfig(cache_dir=str(tmp_path / "cache")))
    reference = Classifier.load(run, backend="torch", precision="fp32")
    with TestClient(create_app(classifier)) as client:
        for path, true_class in confident_val_images(reference, shared_dir, per_class=2):
            response = client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
            assert response.status_code == 200
            assert response.json()["predicted"] == true_class, path
        model = client.get("/model").json()
        assert model["class_names"] == ["ants", "bees"] and model["metrics"]["accuracy"] > 0.6
        for kwargs, status, _ in BAD_UPLOADS.values():
            assert client.post("/predict", **kwargs).status_code == status


@pytest.mark.slow
def test_resfit_serve_command_serves_a_real_run(shared_dir, tmp_path_factory, tmp_path):
    """`resfit serve RUN_DIR` as a user starts it: ready on loopback, right class, clean exit on Ctrl-C (also
    while int8 is still being quantized in the background, on a CPU without native bf16)."""
    run = train_real_run(shared_dir, tmp_path_factory.getbasetemp())
    reference = Classifier.load(run, backend="torch", precision="fp32")
    (photo, true_class), *_ = confident_val_images(reference, shared_dir)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # the session's cache: a first start's int8 quantization is the export tests' (and Ctrl-C after it,
    # test_backends.py's); here the command itself is under test
    env = os.environ | {"RESFIT_CACHE": str(real_run_cache(tmp_path_factory.getbasetemp()))}
    log = tmp_path / "serve.log"
    with open(log, "w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "resfit", "serve", str(run), "--port", str(port)], stderr=stderr, env=env
        )
    try:
        url = f"http://127.0.0.1:{port}"
        # without native bf16 a first start quantizes to int8 in the background (minutes): it does not wait
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        response = httpx.post(url + "/predict", files={"file": (photo.name, photo.read_bytes())}, timeout=60)
        assert response.status_code == 200 and response.json()["predicted"] == true_class
        assert httpx.post(url + "/predict", content=b"", timeout=60).status_code == 400
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0, log.read_text()
    assert "resfit: backend " in log.read_text()  # it says which backend and why

"""Fuzzing every input path: thousands of malformed images through check, open, scan, predict and the service,
and property-based model.json files, weights cards and CSV manifests. Nothing may raise past resfit's own
error types, no file may cost more than the stated bounds, and every answer names its real reason."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import example_dir
from fastapi.testclient import TestClient
from fuzz_corpus import write_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_export import train_tiny_run

from resfit.cli import main
from resfit.data.images import check_image, open_rgb
from resfit.data.scan import load_dataset
from resfit.errors import ImageReadError, ResfitError, RunFolderError, WeightsError
from resfit.inference.classifier import Classifier, InferenceConfig
from resfit.models import load_pretrained
from resfit.run_folder import RunFolder, read_meta
from resfit.serve import BackgroundServer, ServeConfig, create_app

SECONDS_PER_FILE = 2.0  # the documented bound for checking or opening any file of <= 10 MB
SPECIAL = (
    "huge-header.png",
    "huge-screen.gif",
    "huge-frame.gif",
    "huge-both.gif",
    "huge.bmp",
    "huge-sof.jpg",
    "bomb-20000.png",
    "pages-80000.tif",
    "frames-3000.gif",
    "tall-1x20000.png",
    "wide-100000x1.png",
    "tall-3x60000.jpg",
    "one-pixel.png",
    "jpeg-compressed.bmp",
    "unknown-fourcc.dds",
    "needs-ghostscript.eps",
    "page2-no-dims.tif",
    "stub.h5",
    "stub.grib",
    "empty.png",
    "text.jpg",
)
BOMBS = ("huge-header.png", "huge-screen.gif", "huge-frame.gif", "huge-both.gif", "huge.bmp", "huge-sof.jpg")
SERVICE_STATUSES = {200, 400, 413, 415, 422}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def corpus(module_tmp) -> dict[str, Path]:
    return write_corpus(module_tmp("fuzz-corpus"))


@pytest.fixture(scope="module")
def verdicts(corpus) -> dict[str, tuple[bool, str | None, float]]:
    """check_image of every corpus file: (usable, reason, seconds)."""
    found = {}
    for name, path in corpus.items():
        started = time.perf_counter()
        check = check_image(path)
        found[name] = (check.ok, check.reason, time.perf_counter() - started)
    return found


@pytest.fixture(scope="module")
def tiny_run(tiny_imagefolder, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_imagefolder, tmp_path_factory.getbasetemp() / "deploy-tiny-run")


@pytest.fixture(scope="module")
def classifier(tiny_run) -> Classifier:
    return Classifier.load(tiny_run, config=InferenceConfig(backend="torch"))


def sample(corpus: dict[str, Path], count: int, seed: int = 0) -> list[str]:
    """Every special file plus a seeded sample of the truncations and byte flips."""
    others = sorted(set(corpus) - set(SPECIAL))
    return list(SPECIAL) + random.Random(seed).sample(others, count)


def test_every_malformed_file_is_checked_and_opened_with_a_reason_in_bounded_time(corpus, verdicts):
    assert len(corpus) > 5000
    refused = 0
    for name, path in corpus.items():
        ok, reason, seconds = verdicts[name]
        assert seconds < SECONDS_PER_FILE, (name, seconds)
        started = time.perf_counter()
        try:
            image, _ = open_rgb(path)
            opened = True
            assert image.mode == "RGB" and min(image.size) >= 1
        except ImageReadError as error:
            opened = False
            assert error.reason
        assert time.perf_counter() - started < SECONDS_PER_FILE, name
        # what the scan lets through, training can read; what it refuses, it refuses with a reason
        assert opened == ok, (name, reason)
        refused += not ok
        assert ok or reason
    assert refused > len(corpus) // 2  # most truncations and flips are unusable: the corpus bites


def test_known_odd_files_get_their_real_reason(verdicts):
    for name in BOMBS + ("bomb-20000.png",):
        assert verdicts[name][:2] != (True, None) and verdicts[name][1].startswith("too large"), name
    assert "unsupported" in verdicts["jpeg-compressed.bmp"][1]
    assert "unsupported" in verdicts["unknown-fourcc.dds"][1]
    assert "Ghostscript" in verdicts["needs-ghostscript.eps"][1]
    assert "no decoder" in verdicts["stub.h5"][1] and "no decoder" in verdicts["stub.grib"][1]
    # multi-page files are usable, and counting their pages no longer walks all of them
    for name in ("pages-80000.tif", "frames-3000.gif", "page2-no-dims.tif"):
        assert verdicts[name][0] and verdicts[name][2] < 0.5, (name, verdicts[name])
    for name in ("tall-1x20000.png", "wide-100000x1.png", "tall-3x60000.jpg", "one-pixel.png"):
        assert verdicts[name][0], name
    assert verdicts["empty.png"][1].startswith("empty") and verdicts["text.jpg"][1].startswith("not an image")


def test_scan_of_a_messy_folder_skips_each_bad_file_with_its_reason(
    corpus, verdicts, tiny_imagefolder, tmp_path
):
    data = tmp_path / "messy"
    for split in ("train", "val"):
        shutil.copytree(tiny_imagefolder / split, data / split)
    chosen = sample(corpus, 200)
    for name in chosen:
        shutil.copy(corpus[name], data / "train" / "red" / name)
    source, report = load_dataset(data)
    skipped = {Path(entry["path"]).name: entry["reason"] for entry in report.skipped}
    expected = {name for name in chosen if not verdicts[name][0]}
    assert set(skipped) == expected and len(expected) > 50
    assert all(skipped[name] == verdicts[name][1] for name in expected)
    assert len(source.splits["train"].items) == 24 + len(chosen) - len(expected)


def test_predict_answers_every_input_in_order_whatever_it_is(corpus, verdicts, classifier, tmp_path):
    chosen = sample(corpus, 300)
    paths = [str(corpus[name]) for name in chosen] + [str(tmp_path / "missing.jpg"), str(tmp_path)]
    predictions = list(classifier.predict_paths(paths, top_k=2))
    assert [p.path for p in predictions] == paths
    for name, prediction in zip(chosen, predictions, strict=False):
        assert (prediction.error is None) == verdicts[name][0], (name, prediction.error)
        if prediction.error is None:
            assert abs(sum(p for _, p in prediction.top_k) - 1) < 1e-4  # 2 classes: top-2 is everything
    assert predictions[-2].error == "file not found"
    assert predictions[-1].error == "not a regular file"


def test_predict_cli_prints_one_line_per_input_and_exit_1_when_some_failed(
    corpus, tiny_run, tmp_path, capsys
):
    names = ["one-pixel.png", "huge.bmp", "tall-1x20000.png", "unknown-fourcc.dds"]
    args = [str(corpus[n]) for n in names] + [str(tmp_path / "missing.jpg")]
    assert main(["predict", str(tiny_run), *args, "--backend", "torch", "--json"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == args
    assert ["error" in line for line in lines] == [False, True, False, True, True]


def test_service_answers_every_malformed_upload_with_a_4xx_never_a_5xx(corpus, verdicts, classifier):
    config = ServeConfig(max_pixels=40_000_000)
    with TestClient(create_app(classifier, config)) as client:
        for name in sample(corpus, 150, seed=1):
            response = client.post("/predict", files={"file": (name, corpus[name].read_bytes())})
            assert response.status_code in SERVICE_STATUSES, (name, response.status_code, response.text)
            if response.status_code != 200:
                assert response.json()["error"] and response.json()["detail"]
        for name in BOMBS:
            response = client.post("/predict", files={"file": (name, corpus[name].read_bytes())})
            assert response.status_code == 413, (name, response.text)
            assert response.json()["error"] == "too_many_pixels"
        for route in ("/health", "/model", "/", "/docs", "/openapi.json"):
            head, get = client.head(route), client.get(route)
            assert head.status_code == get.status_code == 200 and head.content == b"", route
            assert head.headers["content-type"] == get.headers["content-type"], route


def test_a_declared_huge_body_is_answered_413_at_once(classifier):
    """Content-Length: 2 GiB with a tiny body: the answer must not wait for a body that never comes."""
    with BackgroundServer(create_app(classifier)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            started = time.perf_counter()
            connection.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 2147483648\r\n\r\n--b\r\n"
            )
            answer = b""
            while b"upload_too_large" not in answer and time.perf_counter() - started < 5:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                answer += chunk
            assert time.perf_counter() - started < 5
    answer = answer.decode("latin-1")
    assert answer.startswith("HTTP/1.1 413") and "upload_too_large" in answer


def _peak_rss_mb(args: list[str]) -> float:
    process = subprocess.Popen([sys.executable, "-m", "resfit", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return usage.ru_maxrss / 1024


def test_memory_for_one_image_does_not_depend_on_its_shape(corpus, tiny_run, tiny_imagefolder):
    """A 1x20000 strip used to be resized to millions of pixels (+1.3 GB at 128 px): now it costs what a photo does."""
    normal = str(next((tiny_imagefolder / "val" / "red").iterdir()))
    flags = ["--backend", "torch", "--json"]
    baseline = _peak_rss_mb(["predict", str(tiny_run), normal, *flags])
    strips = [str(corpus[n]) for n in ("tall-1x20000.png", "wide-100000x1.png", "tall-3x60000.jpg")]
    extreme = _peak_rss_mb(["predict", str(tiny_run), *strips, *flags])
    assert extreme - baseline < 100, (baseline, extreme)


# --- property-based: run folders, weights cards, manifests -------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**9), 10**9)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
META_FIELDS = ("format", "format_version", "architecture", "num_classes", "class_names", "dropout", "tta")
PREPROCESSING_FIELDS = ("crop_size", "resize_size", "mean", "std", "interpolation")


@FUZZ
@given(data=st.data())
def test_any_damaged_model_json_is_one_run_folder_error(tiny_run, tmp_path_factory, data):
    with example_dir(tmp_path_factory, "damaged") as run:
        shutil.copy(tiny_run / RunFolder.MODEL_WEIGHTS, run / RunFolder.MODEL_WEIGHTS)
        meta = json.loads((tiny_run / RunFolder.MODEL_META).read_text())
        where = data.draw(st.sampled_from(("meta", "preprocessing")))
        target = meta if where == "meta" else meta["preprocessing"]
        field = data.draw(st.sampled_from(META_FIELDS if where == "meta" else PREPROCESSING_FIELDS))
        if data.draw(st.booleans()):
            target.pop(field, None)
        else:
            target[field] = data.draw(json_values | st.integers(-5, 10**6) | st.sampled_from([0, 0.0, -1.0]))
        (run / RunFolder.MODEL_META).write_text(json.dumps(meta))
        try:
            Classifier.load(run, config=InferenceConfig(backend="torch"))
        except RunFolderError as error:
            assert str(run / RunFolder.MODEL_META) in str(error) and "\n" not in str(error)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda m: m["preprocessing"].update(std=[0, 0.2, 0.2]), "preprocessing.std"),
        (lambda m: m["preprocessing"].update(crop_size=-5), "preprocessing.crop_size"),
        (lambda m: m["preprocessing"].update(resize_size=10**6), "preprocessing.resize_size"),
        (lambda m: m.pop("class_names"), "class_names"),
        (lambda m: m.update(num_classes="2"), "num_classes"),
        (lambda m: m.update(architecture="resnet9"), "resnet9"),
    ],
)
def test_invalid_run_is_refused_by_predict_and_serve_with_exit_6(
    tiny_run, tmp_path, capsys, change, fragment
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta = json.loads((run / RunFolder.MODEL_META).read_text())
    change(meta)
    (run / RunFolder.MODEL_META).write_text(json.dumps(meta))
    for command in (
        ["predict", str(run), str(run / RunFolder.MODEL_META)],
        ["serve", str(run), "--host", "256.256.256.256"],
    ):
        assert main(command) == 6
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0] and RunFolder.MODEL_META in err[0], err


@FUZZ
@given(cut=st.integers(0, 400), flips=st.lists(st.integers(0, 7), max_size=3))
def test_a_damaged_safetensors_file_is_one_run_folder_error(tiny_run, tmp_path_factory, cut, flips):
    with example_dir(tmp_path_factory, "damaged-weights") as run:
        shutil.copy(tiny_run / RunFolder.MODEL_META, run / RunFolder.MODEL_META)
        data = bytearray((tiny_run / RunFolder.MODEL_WEIGHTS).read_bytes())
        for position in flips:  # the 8-byte header length, then the JSON header
            data[position * 7] ^= 0x5A
        (run / RunFolder.MODEL_WEIGHTS).write_bytes(
            bytes(data[: len(data) - cut * 997]) if cut else bytes(data)
        )
        try:
            read_meta(run)
            Classifier.load(run, config=InferenceConfig(backend="torch"))
        except RunFolderError as error:
            assert RunFolder.MODEL_WEIGHTS in str(error)


@pytest.fixture(scope="module")
def small_weights(module_tmp) -> Path:
    """A resnet18 state dict as a .pth, to hang cards beside."""
    from resfit.models import build_model

    path = module_tmp("weights") / "source.pth"
    torch.save(build_model("resnet18", 10).state_dict(), path)
    return path


@FUZZ
@given(
    recipe=st.fixed_dictionaries(
        {},
        optional={
            "train_size_px": json_values | st.integers(-5, 10**6),
            "normalisation": json_values
            | st.fixed_dictionaries(
                {"mean": st.lists(json_values, max_size=4), "std": st.lists(json_values, max_size=4)}
            ),
        },
    )
)
def test_any_weights_card_loads_or_is_one_weights_error(small_weights, recipe):
    small_weights.with_suffix(".json").write_text(json.dumps({"recipe": recipe}))
    try:
        source = load_pretrained("resnet18", str(small_weights))
    except WeightsError as error:
        assert "source.json" in str(error) and "\n" not in str(error)
        return
    assert all(v > 0 for v in source.std) and (source.crop_size is None or 32 <= source.crop_size <= 2048)


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", b"PK\x03\x04" + bytes(40), os.urandom(300)])
def test_a_pth_that_is_not_a_checkpoint_is_one_weights_error(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="bad.pth"):
        load_pretrained("resnet18", str(path))


manifest_cells = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)


@FUZZ
@given(
    header=st.lists(st.sampled_from(["path", "label", "split", "extra", ""]), min_size=0, max_size=4),
    rows=st.lists(
        st.lists(manifest_cells | st.sampled_from(["red/a.png", "train", "val", "test"]), max_size=4)
    ),
    bom=st.booleans(),
)
def test_any_csv_manifest_is_a_dataset_or_one_error(tiny_imagefolder, tmp_path_factory, header, rows, bom):
    with example_dir(tmp_path_factory, "manifest") as folder:
        shutil.copytree(tiny_imagefolder / "train" / "red", folder / "red")
        text = "\n".join(",".join(json.dumps(cell) for cell in row) for row in [header, *rows])
        (folder / "data.csv").write_bytes(
            ("\ufeff" if bom else "").encode() + text.encode("utf-8", "surrogatepass")
        )
        try:
            source, _ = load_dataset(folder / "data.csv")
        except ResfitError as error:
            assert "\n" not in str(error).strip() or "data.csv" in str(error)
            return
        assert source.splits["train"].items and source.splits["val"].items

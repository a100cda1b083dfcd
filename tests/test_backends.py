"""Inference backends: the auto rule follows the CPU's capabilities, every backend gives PyTorch's answers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_export import train_tiny_run

from resfit.errors import ConfigError
from resfit.export import ExportError
from resfit.hardware import CpuInfo, apply_isa_cap
from resfit.inference.classifier import Classifier, InferenceConfig
from resfit.inference.engines import MEASURE_MIN_ROUNDS, OpenVinoBackend, choose_backend, time_engines

ZEN5 = CpuInfo("2-core Zen 5", 2, 2, avx2=True, avx512=True, native_bf16=True)
EPYC_AVX2 = CpuInfo("2-core AVX2 EPYC", 2, 2, avx2=True, avx512=False, native_bf16=False)


@pytest.fixture(scope="module")
def tiny_run(tiny_imagefolder, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_imagefolder, tmp_path_factory.getbasetemp() / "deploy-tiny-run")


def test_auto_picks_openvino_bf16_with_native_bf16_and_fp32_without():
    native = choose_backend(ZEN5)
    assert (native.name, native.precision) == ("openvino", "bf16")
    assert "natively" in native.describe() and "--precision fp32" in native.describe()
    emulated = choose_backend(EPYC_AVX2)
    assert (emulated.name, emulated.precision) == ("openvino", "fp32")
    assert "emulated" in emulated.describe()
    assert choose_backend(ZEN5, precision="fp32").precision == "fp32"
    assert choose_backend(ZEN5, backend="onnxruntime").precision == "fp32"  # ORT has no CPU bf16 path
    assert choose_backend(ZEN5, backend="torch").precision == "bf16"


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, (True, True, "")),
        (
            {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
            (False, False, "ONEDNN_MAX_CPU_ISA=AVX2"),
        ),
        ({"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"}, (True, True, "")),
        ({"ATEN_CPU_CAPABILITY": "avx2"}, (False, False, "ATEN_CPU_CAPABILITY=avx2")),
    ],
)
def test_the_avx2_stand_in_turns_off_native_bf16(environ, expected):
    """Under the stand-in oneDNN runs no bf16 kernels: auto must not pick bf16 as if it were native."""
    avx512, bf16, cap = apply_isa_cap(True, True, True, environ)
    assert (avx512, bf16) == expected[:2]
    assert expected[2] in cap and bool(cap) == bool(expected[2])
    assert apply_isa_cap(True, False, False, {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == (False, False, "")


def test_auto_falls_back_when_packages_are_missing(monkeypatch):
    import resfit.inference.engines as backends

    monkeypatch.setattr(backends, "is_available", lambda name: name in ("torch", "onnxruntime"))
    assert choose_backend(ZEN5).name == "onnxruntime"
    monkeypatch.setattr(backends, "is_available", lambda name: name == "torch")
    choice = choose_backend(ZEN5)
    assert (choice.name, choice.precision) == ("torch", "bf16")
    with pytest.raises(ConfigError, match="pip install openvino"):
        choose_backend(ZEN5, backend="openvino")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"backend": "tensorrt"}, "unknown backend 'tensorrt'"),
        ({"backend": "onnxruntime", "precision": "bf16"}, "use --precision fp32"),
        ({"precision": "fp16"}, "fp16 is for CUDA"),
        ({"backend": "torch", "precision": "int8"}, "not int8"),
        ({"backend": "openvino", "device": "cuda"}, "CPU only"),
        ({"performance_hint": "FAST"}, "LATENCY or THROUGHPUT"),
    ],
)
def test_bad_choices_are_refused_clearly(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        choose_backend(ZEN5, **kwargs)


def test_every_backend_matches_fp32_torch_on_the_tiny_run(tiny_run, tiny_imagefolder, tmp_path):
    images = sorted((tiny_imagefolder / "val").rglob("*.png"))
    reference = Classifier.load(tiny_run, backend="torch", precision="fp32")
    batch = reference.preprocess(images)
    expected = reference.logits(batch)
    for backend, precision in [
        ("onnxruntime", "fp32"),
        ("openvino", "fp32"),
        ("openvino", "bf16"),
        ("torch", "bf16"),
    ]:
        config = InferenceConfig(backend=backend, precision=precision, cache_dir=str(tmp_path))
        classifier = Classifier.load(tiny_run, config=config)
        assert (classifier.choice.name, classifier.choice.precision) == (backend, precision)
        logits = classifier.logits(batch)
        assert logits.shape == expected.shape and logits.dtype == np.float32
        tolerance = 1e-4 if precision == "fp32" else 0.1 * (1 + np.abs(expected).max())
        assert np.abs(logits - expected).max() < tolerance, (backend, precision)
        # The same preprocessing whichever backend: predictions on files come out in class-name form.
        assert classifier.predict(images[0], top_k=1)[0][0] == reference.predict(images[0], top_k=1)[0][0]


def test_openvino_throughput_hint_splits_the_batch_and_keeps_order(tiny_run, tiny_imagefolder, tmp_path):
    classifier = Classifier.load(
        tiny_run, config=InferenceConfig(backend="openvino", precision="fp32", cache_dir=str(tmp_path))
    )
    xml = next(tmp_path.glob("exports/*/model.xml"))
    throughput = OpenVinoBackend(xml, threads=2, precision="fp32", performance_hint="THROUGHPUT")
    batch = classifier.preprocess(sorted((tiny_imagefolder / "val").rglob("*.png")))
    np.testing.assert_allclose(throughput(batch), classifier.logits(batch), atol=1e-4)


def test_cli_predict_and_evaluate_say_which_backend(tiny_run, tiny_imagefolder, tmp_path):
    env_cache = {"RESFIT_CACHE": str(tmp_path)}
    image = sorted((tiny_imagefolder / "val" / "red").glob("*.png"))[0]

    env = os.environ | env_cache
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "resfit",
            "predict",
            str(tiny_run),
            str(image),
            "--json",
            "--backend",
            "onnxruntime",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "backend onnxruntime (fp32)" in result.stderr
    assert json.loads(result.stdout)["top_k"][0]["class"] in ("red", "blue")
    result = subprocess.run(
        [sys.executable, "-m", "resfit", "evaluate", str(tiny_run), str(tiny_imagefolder), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "resfit: backend " in result.stderr
    assert json.loads(result.stdout)["num_images"] == 12


def test_int8_is_calibrated_once_checked_and_cached(tiny_run, tiny_imagefolder, tmp_path):
    config = InferenceConfig(backend="openvino", precision="int8", cache_dir=str(tmp_path))
    said: list[str] = []
    classifier = Classifier.load(tiny_run, config=config, say=said.append)
    assert (classifier.choice.name, classifier.choice.precision) == ("openvino", "int8")
    # the one-off cost is stated when it is paid
    assert any(re.fullmatch(r"int8 quantized and checked in \d+ s, once: kept", line) for line in said), said
    # checked on validation images and on training images it was not calibrated on (24 train: 12 + 12)
    assert (
        "agreed with fp32 on 100.0% of 12 validation images and 100.0% of 12 training images"
        in classifier.describe()
    )
    int8_ir = next(tmp_path.glob("exports/*/model-int8.xml"))
    stamp = int8_ir.stat().st_mtime_ns
    said.clear()
    again = Classifier.load(tiny_run, config=config, say=said.append)
    assert int8_ir.stat().st_mtime_ns == stamp and not any("quantiz" in line for line in said), said
    image = tiny_imagefolder / "val" / "red" / "red_000.png"
    assert again.choice.precision == "int8" and again.predict(image, top_k=1)[0][0] in ("red", "blue")


CTRL_C_AFTER_OPENVINO = """
import gc, glob, os, signal, sys, time
from resfit.inference.classifier import Classifier, InferenceConfig
from resfit.inference.engines import OpenVinoBackend
Classifier.load(sys.argv[1], config=InferenceConfig(precision="int8", cache_dir=sys.argv[2]))
assert "nncf" not in sys.modules, "NNCF ran in this process"
ir = glob.glob(os.path.join(sys.argv[2], "exports", "*", "model.xml"))[0]
timed, kept = OpenVinoBackend(ir, 1), OpenVinoBackend(ir, 1)  # an engine timed and dropped, one kept
del timed
gc.collect()
del kept
gc.collect()
signal.signal(signal.SIGINT, lambda *_: print("caught Ctrl-C", flush=True))
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.2)
"""


def test_ctrl_c_after_openvino_engines_come_and_go_is_caught_not_a_segfault(tiny_run, tmp_path):
    """OpenVINO cores freed out of order left the main thread a freed signal stack: ``resfit serve`` died of a
    segmentation fault on Ctrl-C after its first start (int8 quantized, engines timed). A fresh process shows
    it: NNCF quantizes in a process of its own, and our engines share one core."""
    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_AFTER_OPENVINO, str(tiny_run), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "caught Ctrl-C" in done.stdout


def test_a_damaged_int8_verdict_is_reached_again_not_a_traceback(tiny_run, tmp_path):
    config = InferenceConfig(backend="openvino", precision="int8", cache_dir=str(tmp_path))
    Classifier.load(tiny_run, config=config)
    verdict = next(tmp_path.glob("exports/*/model-int8.json"))
    for damaged in ("", '{"kept": tr', "[1, 2]", '{"other": 1}'):
        verdict.write_text(damaged)
        again = Classifier.load(tiny_run, config=config)
        assert again.choice.precision == "int8", damaged
        assert json.loads(verdict.read_text())["kept"] is True, damaged


def test_int8_that_disagrees_with_fp32_is_refused_and_not_retried(tiny_run, tmp_path, monkeypatch):
    import resfit.inference.export_cache as export_module

    monkeypatch.setattr(export_module, "INT8_MIN_AGREEMENT", 1.01)  # nothing can pass
    config = InferenceConfig(backend="openvino", precision="int8", cache_dir=str(tmp_path))
    with pytest.raises(ExportError, match="not used; use --precision fp32 or bf16"):
        Classifier.load(tiny_run, config=config)
    assert not list(tmp_path.glob("exports/*/model-int8.xml"))

    def must_not_run(*args, **kwargs):
        raise AssertionError("a refused model was quantized again")

    monkeypatch.setattr(export_module, "_quantize", must_not_run)
    with pytest.raises(ExportError, match="not used"):
        Classifier.load(tiny_run, config=config)


def _as_cpu(monkeypatch, cpu: CpuInfo) -> None:
    import resfit.hardware as hardware

    monkeypatch.setattr(hardware, "detect_cpu", lambda: cpu)


def test_int8_joins_auto_where_bf16_is_emulated_and_only_if_it_passes(tiny_run, tmp_path, monkeypatch):
    """Serve/batch predict on an AVX2 CPU: gated int8 is timed beside the fp32 engines and kept if fastest."""
    import resfit.inference.export_cache as export_module

    _as_cpu(monkeypatch, EPYC_AVX2)
    config = InferenceConfig(cache_dir=str(tmp_path), int8="now")
    classifier = Classifier.load(tiny_run, config=config)
    figures = json.loads(next((tmp_path / "engine-timings").glob("*.json")).read_text())["images_per_second"]
    assert set(figures) == {"openvino-int8", "openvino", "onnxruntime", "torch"}
    fastest = max(figures, key=figures.get)
    chosen = (classifier.choice.name, classifier.choice.precision)
    assert chosen == (("openvino", "int8") if fastest == "openvino-int8" else (fastest, "fp32"))
    assert "int8 agreed with fp32 on 100.0% of 12 validation images" in classifier.describe()
    # With native bf16 a batch predict never waits for a quantization (int8 gains less over bf16), but once
    # a verdict is cached (serve reaches one in the background) int8 is timed beside the bf16 engines.
    _as_cpu(monkeypatch, ZEN5)
    fresh = Classifier.load(tiny_run, config=replace(config, cache_dir=str(tmp_path / "fresh")))
    assert fresh.choice.precision == "bf16" and "int8" not in fresh.describe()
    assert not list((tmp_path / "fresh").rglob("model-int8*"))  # nothing was quantized
    Classifier.load(tiny_run, config=config)  # tmp_path holds the verdict reached above
    timed = [json.loads(p.read_text())["images_per_second"] for p in (tmp_path / "engine-timings").glob("*")]
    assert {"openvino-int8", "openvino", "torch"} in [set(figures) for figures in timed]
    _as_cpu(monkeypatch, EPYC_AVX2)
    # Where int8 is the fastest measured, auto runs it and says so.
    monkeypatch.setattr(
        "resfit.inference.classifier.read_measurement", lambda path: {**figures, "openvino-int8": 1e9}
    )
    int8 = Classifier.load(tiny_run, config=config)
    assert (int8.choice.name, int8.choice.precision) == ("openvino", "int8")
    assert "passed its gate" in int8.describe() and "--precision fp32" in int8.describe()
    assert "int8 because bf16 would be emulated on this CPU" in int8.describe()
    # Without the flag or with an explicit precision, int8 is never considered.
    for other, cpu in [
        (InferenceConfig(cache_dir=str(tmp_path)), EPYC_AVX2),
        (replace(config, precision="fp32"), EPYC_AVX2),
        (InferenceConfig(cache_dir=str(tmp_path)), ZEN5),
    ]:
        _as_cpu(monkeypatch, cpu)
        loaded = Classifier.load(tiny_run, config=other)
        assert loaded.choice.precision != "int8" and "int8" not in loaded.describe(), other
    # A model that fails the gate runs in fp32, and the line says why int8 was not used.
    _as_cpu(monkeypatch, EPYC_AVX2)
    monkeypatch.setattr(export_module, "INT8_MIN_AGREEMENT", 1.01)
    refused = Classifier.load(tiny_run, config=config)
    assert refused.choice.precision == "fp32" and "int8 not used: int8 agreed" in refused.describe()


def test_int8_plan_quantizes_up_front_only_where_bf16_is_emulated():
    from resfit.inference.classifier import int8_plan

    assert int8_plan("fp32", "now", verdict_reached=False) == "now"  # AVX2 batch predict
    assert int8_plan("fp32", "background", verdict_reached=False) == "later"  # serve, in the background
    assert int8_plan("bf16", "now", verdict_reached=False) is None  # native bf16: no wait
    assert int8_plan("bf16", "background", verdict_reached=False) == "later"
    assert int8_plan("bf16", "now", verdict_reached=True) == "now"  # a cached verdict: free
    assert int8_plan("int8", "background", verdict_reached=True) is None  # asked for: not auto's
    # a few-image predict: a cached verdict is read, never a quantization started
    assert int8_plan("fp32", "cached", verdict_reached=True) == "now"
    assert int8_plan("fp32", "cached", verdict_reached=False) is None
    # the library default: int8 only when asked for, even with a verdict cached
    assert int8_plan("fp32", "off", verdict_reached=True) is None


def test_an_unknown_int8_mode_is_a_clear_error():
    from resfit.errors import ConfigError

    with pytest.raises(ConfigError, match="int8 must be one of off, cached, now, background"):
        InferenceConfig(int8="always")


def test_one_load_reads_and_hashes_the_weights_once(tiny_run, tmp_path, monkeypatch):
    """Timing four engines builds an ONNX file, an OpenVINO IR and a gated int8 IR: all from one read."""
    import resfit.inference.export_cache as export_module
    import resfit.run_folder as run_folder_module

    reads, digests = [], []
    read, digest = run_folder_module.load_file, export_module.model_digest
    monkeypatch.setattr(run_folder_module, "load_file", lambda path: reads.append(path) or read(path))
    monkeypatch.setattr(
        export_module, "model_digest", lambda run_dir: digests.append(run_dir) or digest(run_dir)
    )
    _as_cpu(monkeypatch, EPYC_AVX2)
    classifier = Classifier.load(tiny_run, config=InferenceConfig(cache_dir=str(tmp_path), int8="now"))
    timed = json.loads(next((tmp_path / "engine-timings").glob("*.json")).read_text())["images_per_second"]
    assert set(timed) == {"openvino-int8", "openvino", "onnxruntime", "torch"}
    assert len(list(tmp_path.glob("exports/*/*"))) >= 3  # the exports were really made here
    assert [Path(p).name for p in reads] == ["model.safetensors"] and len(digests) == 1
    probs = classifier.predict_proba([Image.new("RGB", (40, 40), "red")])
    assert probs.shape == (1, 2) and abs(probs.sum() - 1) < 1e-5


def test_time_engines_ranks_engines_measured_side_by_side():
    batch = np.zeros((4, 3, 8, 8), np.float32)
    calls = {"fast": [], "slow": []}

    def engine(name, seconds):
        def run(images):
            calls[name].append(len(images))
            time.sleep(seconds)
            return np.zeros((len(images), 2), np.float32)

        return run

    figures = time_engines({"fast": engine("fast", 0.002), "slow": engine("slow", 0.02)}, batch)
    assert figures["fast"] > 3 * figures["slow"] > 0
    # interleaved rounds: both called alike, each timed call of the whole batch after a one-image call
    assert calls["fast"] == calls["slow"] and len(calls["fast"]) >= 1 + 2 * MEASURE_MIN_ROUNDS
    assert calls["fast"][0] == 4 and set(calls["fast"][1::2]) == {1} and set(calls["fast"][2::2]) == {4}


def test_the_ranking_follows_the_batch_the_caller_runs():
    """An engine with a high cost per call wins at 16 images and loses at 2 (as OpenVINO bf16 against torch
    bf16 did on a native-bf16 EPYC): auto must time at the caller's batch, not at a fixed small one."""

    def engine(per_call, per_image):
        def run(images):
            time.sleep(per_call + per_image * len(images))
            return np.zeros((len(images), 2), np.float32)

        return run

    engines = {"per_call": engine(0.03, 0.001), "per_image": engine(0.0, 0.005)}
    small = time_engines(engines, np.zeros((2, 3, 8, 8), np.float32))
    large = time_engines(engines, np.zeros((16, 3, 8, 8), np.float32))
    assert max(small, key=small.get) == "per_image" and max(large, key=large.get) == "per_call"


def test_auto_times_at_the_callers_batch_and_keys_the_figures_by_it(tiny_run, tmp_path, monkeypatch):
    import resfit.inference.classifier as classifier_module

    timed_batches: list[int] = []
    real = classifier_module.time_engines

    def recorded(engines, batch):
        timed_batches.append(len(batch))
        return real(engines, batch)

    monkeypatch.setattr(classifier_module, "time_engines", recorded)
    said: list[str] = []
    for batch_size in (3, 16, 3):
        config = InferenceConfig(precision="fp32", cache_dir=str(tmp_path), batch_size=batch_size)
        loaded = Classifier.load(tiny_run, config=config, say=said.append)
        assert f"(batch {batch_size}, " in loaded.choice.reason
    assert timed_batches == [3, 16]  # the third load read the batch-3 figures back
    assert "(cached)" in loaded.choice.reason
    assert len(list((tmp_path / "engine-timings").glob("*.json"))) == 2
    assert sum(line.startswith("timed in ") for line in said) == 2


def test_auto_times_the_engines_once_then_keeps_the_fastest(tiny_run, tmp_path, monkeypatch):
    said: list[str] = []
    config = InferenceConfig(precision="fp32", cache_dir=str(tmp_path))
    first = Classifier.load(tiny_run, config=config, say=said.append)
    timings = list((tmp_path / "engine-timings").glob("*.json"))
    assert len(timings) == 1 and any(line.startswith("timing ") for line in said)
    figures = json.loads(timings[0].read_text())["images_per_second"]
    assert set(figures) == {"openvino", "onnxruntime", "torch"} and all(v > 0 for v in figures.values())
    assert (
        first.choice.name == max(figures, key=figures.get)
        and "measured on this CPU just now" in first.choice.reason
    )
    said.clear()
    second = Classifier.load(tiny_run, config=config, say=said.append)
    assert not any(line.startswith("timing ") for line in said) and "(cached)" in second.choice.reason
    assert second.choice.name == first.choice.name
    # A different instruction-set limit is a different machine as far as speed goes: timed again.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    Classifier.load(tiny_run, config=config, say=said.append)
    assert len(list((tmp_path / "engine-timings").glob("*.json"))) == 2
    # An explicit backend is never timed.
    explicit = Classifier.load(tiny_run, config=InferenceConfig(backend="torch", cache_dir=str(tmp_path)))
    assert explicit.choice.name == "torch" and "asked for" in explicit.choice.reason


def test_serve_and_batch_predict_quantize_int8_a_few_images_only_read_its_verdict(
    tiny_run, tiny_imagefolder, tmp_path, monkeypatch, capsys
):
    """A first few-image predict never waits for a quantization; a batch predict quantizes and checks int8;
    a few-image predict after it reads the cached verdict and has int8 among its engines, as serve does."""
    import resfit.serve as serve_module
    from resfit.cli import PREDICT_INT8_MIN_IMAGES, main

    _as_cpu(monkeypatch, EPYC_AVX2)
    monkeypatch.setenv("RESFIT_CACHE", str(tmp_path))
    photos = sorted(str(p) for p in tiny_imagefolder.rglob("*.png"))
    assert len(photos) >= PREDICT_INT8_MIN_IMAGES
    assert main(["predict", str(tiny_run), *photos[:2]]) == 0
    err = capsys.readouterr().err
    assert "int8" not in err and "(batch 2, " in err  # timed at the two images it runs
    assert main(["predict", str(tiny_run), str(tiny_imagefolder)]) == 0
    out, err = capsys.readouterr()
    assert "openvino-int8" in err and "int8 agreed with fp32" in err and "(batch 16, " in err
    assert len(out.strip().splitlines()) == len(photos)
    assert main(["predict", str(tiny_run), *photos[:2]]) == 0
    err = capsys.readouterr().err
    assert "openvino-int8" in err and "(batch 2, " in err and "quantiz" not in err
    served = []
    monkeypatch.setattr(serve_module, "run_server", lambda classifier, *args: served.append(classifier))
    assert main(["serve", str(tiny_run), "--port", "8765"]) == 0
    assert len(served) == 1 and "openvino-int8" in served[0].describe()
    assert "(batch 16, " in served[0].describe()  # serve's largest batch


def test_serve_answers_at_once_and_switches_to_int8_when_its_background_verdict_passes(
    tiny_run, tiny_imagefolder, tmp_path, monkeypatch
):
    """Where bf16 is emulated, serve's first start does not wait minutes for int8: it answers on fp32 while
    int8 is quantized and checked in a thread, then runs int8 if it passed and is the fastest measured (here
    made the fastest); the next start finds the verdict cached and starts on int8 directly."""
    import threading

    import httpx

    import resfit.inference.classifier as classifier_module
    from resfit.serve import BackgroundServer, create_app

    _as_cpu(monkeypatch, EPYC_AVX2)
    let_int8_start, real_gated_int8 = threading.Event(), classifier_module._gated_int8

    def held_back(*args, **kwargs):
        assert let_int8_start.wait(300), "the test never let int8 start"
        return real_gated_int8(*args, **kwargs)

    monkeypatch.setattr(classifier_module, "_gated_int8", held_back)
    read = classifier_module.read_measurement

    def int8_fastest(path):
        figures = read(path)
        return figures and ({**figures, "openvino-int8": 1e9} if "openvino-int8" in figures else figures)

    monkeypatch.setattr(classifier_module, "read_measurement", int8_fastest)
    config = InferenceConfig(cache_dir=str(tmp_path), int8="background")
    classifier = Classifier.load(tiny_run, config=config)
    assert classifier.int8_pending and classifier.choice.precision == "fp32"
    assert "int8 is being quantized and checked in the background" in classifier.describe()
    photo = next((tiny_imagefolder / "val" / "red").glob("*.png"))
    with BackgroundServer(create_app(classifier)) as url, httpx.Client(base_url=url, timeout=60) as http:
        before = http.post("/predict", files={"file": ("red.png", photo.read_bytes())})
        assert before.status_code == 200 and http.get("/health").json()["precision"] == "fp32"
        let_int8_start.set()
        deadline = time.time() + 600
        while http.get("/health").json()["precision"] != "int8":
            assert time.time() < deadline, "serve never switched to int8"
            time.sleep(0.5)
        after = http.post("/predict", files={"file": ("red.png", photo.read_bytes())})
        assert after.status_code == 200
        assert after.json()["predicted"] == before.json()["predicted"] == "red"
    again = Classifier.load(tiny_run, config=config)  # the verdict is cached now: no waiting, no thread
    assert not again.int8_pending and (again.choice.name, again.choice.precision) == ("openvino", "int8")


def test_int8_that_passes_but_is_slower_leaves_serve_on_fp32_saying_why(tiny_run, tmp_path, monkeypatch):
    import resfit.inference.classifier as classifier_module

    _as_cpu(monkeypatch, EPYC_AVX2)
    timed = classifier_module.time_engines

    def int8_slowest(engines, batch):
        figures = timed(engines, batch)
        return {**figures, "openvino-int8": 1e-3} if "openvino-int8" in figures else figures

    monkeypatch.setattr(classifier_module, "time_engines", int8_slowest)
    config = InferenceConfig(cache_dir=str(tmp_path), int8="background")
    classifier = Classifier.load(tiny_run, config=config)
    before = classifier.choice
    said = []
    assert classifier.reach_int8_verdict(said.append) is False and not classifier.int8_pending
    assert classifier.choice == before and classifier.choice.precision == "fp32"
    line = said[-1]
    assert line.startswith(f"staying on {before.name} (fp32)") and "openvino-int8" in line, said
    assert "in the background" not in line, line  # measured afresh from the rule, not from the first line
    assert classifier.reach_int8_verdict(said.append) is False  # once only

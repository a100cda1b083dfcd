"""The Classifier a run folder becomes: the one inference path for predict, evaluate and the service."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..batched_inference import softmax
from ..data.images import open_rgb
from ..data.scan import default_cache_dir
from ..data.transforms import Preprocessing
from ..errors import ConfigError, ExportError, ImageReadError
from ..hardware import Runtime, apply_threads, resolve_runtime
from ..model_wrappers import TTA_HELP, TTA_MODES
from ..rejection import UNKNOWN, RejectRule, needs_features, split_output
from ..run_folder import RunFolder, read_meta
from ..settings import setting
from .engines import (
    BACKENDS,
    INT8_ENGINE,
    PERFORMANCE_HINTS,
    BackendChoice,
    OnnxRuntimeBackend,
    OpenVinoBackend,
    TorchBackend,
    choose_backend,
    describe_measurement,
    is_available,
    measurable_engines,
    measurement_path,
    read_measurement,
    time_engines,
    write_measurement,
)
from .export_cache import LoadedRun, cached_export, cached_int8_export, int8_verdict_is_reached

PREDICT_BATCH_SIZE = 16
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # fp16: CUDA only


@dataclass
class Prediction:
    path: str
    top_k: list[tuple[str, float]] | None = None
    error: str | None = None
    answer: Answer | None = None  # the run's "unknown" rule applied (None: no rule or --no-reject)

    @property
    def unknown(self) -> bool:
        return self.answer is not None and self.answer.unknown

    @property
    def reason(self) -> str:
        return self.answer.reason if self.answer is not None else ""

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        best = self.top_k[0][0]
        return {
            "path": self.path,
            "predicted": UNKNOWN if self.unknown else best,
            **(self.answer.to_dict(best) if self.answer is not None else {}),
            "top_k": [{"class": name, "probability": round(p, 6)} for name, p in self.top_k],
        }


@dataclass(frozen=True)
class Answer:
    """The rejection rule's verdict on one image: its score against the run's threshold."""

    unknown: bool
    score: float
    rule: RejectRule

    @property
    def reason(self) -> str:
        relation = "below" if self.unknown else "at or above"
        return f"{self.rule.score} {self.score:.4g} {relation} {self.rule.threshold:.4g}"

    def to_dict(self, best: str) -> dict:
        return {
            "unknown": self.unknown,
            "best_guess": best,
            "score": {
                "name": self.rule.score,
                "value": round(self.score, 6),
                "threshold": self.rule.threshold,
            },
        }


# How auto treats the gated int8 IR when no precision is asked for. Quantizing and checking takes minutes
# once per model, so each caller says how much of that it may wait for:
#   "off":        never (the library default; int8 only with precision int8)
#   "cached":     read a verdict serve or a batch predict cached, never quantize (a few-image predict)
#   "now":        quantize and check before loading where int8 pays (a batch predict)
#   "background": load on fp32/bf16 at once, quantize later in reach_int8_verdict (serve)
INT8_MODES = ("off", "cached", "now", "background")


@dataclass(frozen=True)
class InferenceConfig:
    """How a run folder is turned into a Classifier: where it runs, how fast, and at what precision."""

    device: str = setting("auto", help="auto, cpu, cuda or cuda:N (a GPU index)")
    precision: str = setting(
        "auto",
        choices=INFERENCE_PRECISIONS,
        help="auto: bf16 where the CPU has it natively; fp32 for exact fp32 results; "
        "int8 (OpenVINO): quantized once on the run's training images, used only if it agrees with fp32",
    )
    backend: str = setting(
        "auto", choices=BACKENDS, help="inference engine on CPU (default: the fastest for this CPU, printed)"
    )
    performance_hint: str = setting(
        "LATENCY",
        choices=PERFORMANCE_HINTS,
        help="OpenVINO: LATENCY (one request on all cores, measured faster on 2 cores) or THROUGHPUT",
    )
    cache_dir: str | None = None  # on-the-fly exports; default $RESFIT_CACHE or ~/.cache/resfit
    # None: the run's stored setting (see run_folder.with_tta)
    tta: str | None = setting(None, choices=TTA_MODES, help=f"{TTA_HELP}; default: the run's stored setting")
    reject: bool = setting(  # apply the run's "unknown" rule (model.json "reject"), if it has one
        True,
        negate="--no-reject",
        help='always name a class: ignore the run\'s "unknown" rule (see resfit train --reject-target)',
    )
    # when auto may also time the gated int8 IR (OpenVINO) and keep it if fastest (INT8_MODES; when it is
    # quantized: int8_plan); under "off" int8 is used only when asked for with precision int8
    int8: str = "off"
    # images per engine call the caller will mostly run (serve: its largest batch; predict: up to 16): auto
    # times the engines at this batch, since which is fastest changes with it
    batch_size: int = PREDICT_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.int8 not in INT8_MODES:
            raise ConfigError(f"int8 must be one of {', '.join(INT8_MODES)}, got {self.int8!r}")


class Classifier:
    """A trained model with its class names and preprocessing: give it images, get probabilities.

    The model runs on the backend in ``choice`` (eager PyTorch, ONNX Runtime or OpenVINO); the
    preprocessing is the run's own whichever backend runs, so only the speed differs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        meta: dict,
        runtime: Runtime,
        backend=None,
        choice: BackendChoice | None = None,
        run_dir: str | os.PathLike | None = None,
        reject: bool = True,
    ):
        self.meta = meta
        # a rule whose score needs no bank (msp, energy) needs no run folder either
        if not reject or not meta.get("reject"):
            self.reject = None
        elif run_dir is not None:
            self.reject = RunFolder(run_dir).reject_rule(meta)
        else:
            self.reject = RejectRule.from_dict(meta["reject"])
        self.runtime = runtime
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.class_names: list[str] = list(meta["class_names"])
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.transform = self.preprocessing.eval_transform()
        self.model = model.to(runtime.device, memory_format=torch.channels_last).eval()
        self.backend = backend or TorchBackend(self.model, runtime.precision, runtime.device)
        self.choice = choice or BackendChoice("torch", runtime.precision, runtime.reason)
        self._int8_later: tuple[_Engines, BackendChoice] | None = None  # InferenceConfig.int8 "background"

    @classmethod
    def load(
        cls,
        run_dir: str | os.PathLike,
        device: str = "auto",
        precision: str = "auto",
        backend: str = "auto",
        config: InferenceConfig | None = None,
        say: Callable[[str], None] | None = None,
    ) -> Classifier:
        """The run on the backend ``config`` asks for; a first use of ONNX/OpenVINO exports once to the cache."""
        config = config or InferenceConfig(device, precision, backend)
        # int8 is a backend precision (OpenVINO); PyTorch's runtime around it stays fp32.
        runtime = resolve_runtime(config.device, "fp32" if config.precision == "int8" else config.precision)
        # On CUDA the runtime has already resolved the precision (AMP); on CPU the backend decides it.
        precision = config.precision if runtime.device == "cpu" else runtime.precision
        choice = choose_backend(
            runtime.cpu, config.backend, precision, runtime.device, config.performance_hint
        )
        runtime = replace(runtime, precision=choice.precision) if runtime.device == "cpu" else runtime
        apply_threads(runtime)
        # A feature-distance "unknown" rule needs the features: every engine then outputs them after the logits.
        stored = read_meta(Path(run_dir))
        features = config.reject and needs_features(stored.get("reject"))
        if features and (config.tta or stored.get("tta", "none")) != "none":
            if say is not None:
                say("note: the run's \"unknown\" rule reads one view's features, so it is off under TTA")
            config, features = replace(config, reject=False), False
        # The weights are read once: every engine and every export below comes from this one model.
        run = LoadedRun.read(run_dir, config.tta, features)
        model, meta = run.model, run.meta
        cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()

        engines = _Engines(run, runtime, cache_dir, choice.performance_hint, say, max(1, config.batch_size))
        int8_note, int8_later = "", False
        if config.int8 != "off" and config.backend == "auto" and config.precision == "auto":
            if runtime.device == "cpu" and is_available("openvino"):
                plan = int8_plan(choice.precision, config.int8, int8_verdict_is_reached(run, cache_dir))
                if plan == "later":
                    int8_later = True
                    int8_note = "int8 is being quantized and checked in the background (once; minutes)"
                elif plan == "now":
                    engines.int8_ir, int8_note = _gated_int8(run, cache_dir, say)

        rule_choice = choice  # the rule's, before any measurement: reach_int8_verdict measures from it again
        if config.backend == "auto" and runtime.device == "cpu" and choice.precision != "int8":
            backend_engine, choice = _fastest_choice(engines, choice, int8_note)
        elif choice.name == "openvino" and choice.precision == "int8":
            try:
                ir, summary = cached_int8_export(run, cache_dir, say)
            except ExportError as error:
                raise ExportError(f"{error}; use --precision fp32 or bf16") from None
            backend_engine = OpenVinoBackend(ir, runtime.threads, "int8", choice.performance_hint)
            choice = replace(choice, reason=f"{choice.reason}; {summary}")
        else:
            backend_engine = engines(choice.name, choice.precision)
        classifier = cls(model, meta, runtime, backend_engine, choice, run_dir, config.reject)
        classifier._int8_later = (engines, rule_choice) if int8_later else None
        return classifier

    @property
    def int8_pending(self) -> bool:
        """int8 was left for later (``InferenceConfig.int8`` "background"): ``reach_int8_verdict`` reaches it."""
        return self._int8_later is not None

    def reach_int8_verdict(self, say: Callable[[str], None] | None = None) -> bool:
        """Quantize and check int8 now (minutes, once per model), time it against the engines measured at
        load, and switch to it if it passed its gate and is the fastest; True if it switched.

        Safe while other threads predict: a batch runs wholly on the engine it started on, and the switch
        is one assignment. ``serve`` calls this in the background, so it answers from its first second.
        """
        if not self.int8_pending:
            return False
        engines, rule_choice = self._int8_later
        self._int8_later = None
        engines.int8_ir, int8_note = _gated_int8(engines.run, engines.cache_dir, say)
        if engines.int8_ir is None:
            if say is not None:
                say(f"staying on {self.choice.name} ({self.choice.precision}): {int8_note}")
            return False
        backend_engine, choice = _fastest_choice(engines, rule_choice, int8_note)
        if choice.precision != "int8":
            if say is not None:
                say(f"staying on {self.choice.name} ({self.choice.precision}): {choice.reason}")
            return False
        self.backend, self.choice = backend_engine, choice
        if say is not None:
            say(f"switched to int8: {self.describe()}")
        return True

    def describe(self) -> str:
        """One line: the backend, its precision and why, test-time augmentation, the "unknown" rule, and the
        machine it runs on."""
        tta = self.meta.get("tta", "none")
        views = "" if tta == "none" else f"; TTA {tta} at {self.meta.get('tta_sizes')} px"
        unknown = f"; {self.reject.describe()}" if self.reject else ""
        return (
            f"{self.choice.describe()}{views}{unknown} [{self.runtime.cpu.describe()}; "
            f"{self.runtime.threads} threads]"
        )

    def answers(self, logits: np.ndarray, features: np.ndarray | None = None) -> list[Answer | None]:
        """The "unknown" rule's verdict per row of logits (None for every row when the run has no rule)."""
        if self.reject is None:
            return [None] * len(logits)
        answered, scores = self.reject.accepts(logits, features)
        return [Answer(not ok, float(score), self.reject) for ok, score in zip(answered, scores, strict=True)]

    def logits_module(self) -> tuple[torch.nn.Module, Runtime]:
        """The chosen backend as a module plus the runtime to call it with, for evaluate_split's loop (its
        output may carry features after the logits: evaluate_split takes them apart)."""
        if isinstance(self.backend, TorchBackend) and self.backend.model is self.model:
            return self.model, self.runtime
        return _BackendModule(self.backend), replace(self.runtime, precision="fp32")

    def _as_image(self, image) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB") if image.mode != "RGB" else image
        return open_rgb(image)[0]

    def preprocess(self, images: Iterable) -> np.ndarray:
        """The run's preprocessing applied to PIL images, paths or bytes: a float32 (N, 3, H, W) batch."""
        return torch.stack([self.transform(self._as_image(image)) for image in images]).numpy()

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(float32 logits (N, C), pooled features (N, D) or None) of a preprocessed batch; the features
        come only where the run's "unknown" rule uses them."""
        return split_output(self.backend(batch), len(self.class_names))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Float32 logits (N, C) of a preprocessed batch, from the chosen backend."""
        return self.outputs(batch)[0]

    def predict_proba(self, images: Iterable) -> np.ndarray:
        """Class probabilities, (N, C), for PIL images, paths or encoded bytes."""
        return softmax(self.logits(self.preprocess(images)))

    def predict_answers(self, images: Iterable) -> tuple[np.ndarray, list[Answer | None]]:
        """Class probabilities and the "unknown" rule's verdict per image."""
        logits, features = self.outputs(self.preprocess(images))
        return softmax(logits), self.answers(logits, features)

    def predict(self, image, top_k: int = 5) -> list[tuple[str, float]]:
        """Top-k (class name, probability) for one image (PIL image, path or bytes)."""
        return self._top_k(self.predict_proba([image])[0], top_k)

    def top_k(self, probs: np.ndarray, top_k: int = 5) -> list[tuple[str, float]]:
        """(class name, probability) pairs, most likely first, for one row of probabilities."""
        return self._top_k(probs, top_k)

    def _top_k(self, probs: np.ndarray, top_k: int) -> list[tuple[str, float]]:
        order = np.argsort(-probs, kind="stable")[: max(1, min(top_k, len(self.class_names)))]
        return [(self.class_names[i], float(probs[i])) for i in order]

    def predict_paths(
        self, paths: Iterable[str], top_k: int = 5, batch_size: int = PREDICT_BATCH_SIZE
    ) -> Iterator[Prediction]:
        """Predictions in input order, batched; an unreadable file yields an error entry and the rest go on.

        Each image is preprocessed as soon as it is decoded, so a batch holds small tensors, not up to
        ``batch_size`` full-size decoded photos.
        """
        pending: list[tuple[str, torch.Tensor | None, str | None]] = []

        def flush() -> Iterator[Prediction]:
            inputs = [tensor for _, tensor, _ in pending if tensor is not None]
            if inputs:
                logits, features = self.outputs(torch.stack(inputs).numpy())
            else:
                logits, features = np.zeros((0, len(self.class_names)), np.float32), None
            rows = iter(zip(softmax(logits), self.answers(logits, features), strict=True))
            for path, tensor, error in pending:
                if tensor is None:
                    yield Prediction(path, error=error)
                    continue
                probs, answer = next(rows)
                yield Prediction(path, self._top_k(probs, top_k), answer=answer)
            pending.clear()

        decoded = 0
        for path in paths:
            try:
                pending.append((path, self.transform(open_rgb(path)[0]), None))
                decoded += 1
            except ImageReadError as error:
                pending.append((path, None, error.reason))
            if decoded >= batch_size:
                yield from flush()
                decoded = 0
        if pending:
            yield from flush()


@dataclass
class _Engines:
    """Builds the engine ``auto`` names for one loaded run (``int8_ir``: the gated int8 IR, once reached)."""

    run: LoadedRun
    runtime: Runtime
    cache_dir: Path
    performance_hint: str
    say: Callable[[str], None] | None
    batch_size: int  # what auto times the engines at
    int8_ir: Path | None = None

    def __call__(self, name: str, precision: str):
        threads = self.runtime.threads
        if name == INT8_ENGINE:
            return OpenVinoBackend(self.int8_ir, threads, "int8", self.performance_hint)
        if name == "onnxruntime":
            return OnnxRuntimeBackend(cached_export(self.run, "onnx", self.cache_dir, self.say), threads)
        if name == "openvino":
            ir = cached_export(self.run, "openvino", self.cache_dir, self.say)
            return OpenVinoBackend(ir, threads, precision, self.performance_hint)
        return TorchBackend(self.run.model, precision, self.runtime.device)


def int8_plan(precision: str, mode: str, verdict_reached: bool) -> str | None:
    """When the gated int8 IR joins auto's candidates, for a caller in ``mode`` (INT8_MODES): "now"
    (quantize and check before loading, or read the cached verdict), "later" (serve: in the background), or
    None (not at all).

    A cached verdict is free to read, so every mode but "off" reads it: a few-image predict ("cached") then
    answers on the engine serve and a batch predict chose, and never waits.

    Where bf16 is emulated auto runs fp32 and int8 is about twice as fast (issue #17), worth minutes of
    quantization once. With native bf16 int8 gains far less over bf16 (1.13x on a 2-core Zen 5: 126.8
    against 111.9 img/s), so only serve quantizes (in the background, never delaying an answer) and a batch
    predict uses int8 only once a verdict is cached."""
    if mode == "off" or precision not in ("fp32", "bf16"):
        return None
    if verdict_reached:
        return "now"
    if mode == "background":
        return "later"
    if mode == "now" and precision == "fp32":
        return "now"
    return None


def _fastest_choice(engines: _Engines, choice: BackendChoice, int8_note: str) -> tuple[object, BackendChoice]:
    """(engine, choice): the fastest engine ``auto`` measured for ``choice.precision`` (and the gated int8 IR,
    where there is one), with why in the choice's reason."""
    name, measured, built = _fastest_engine(engines, choice.precision)
    backend_engine = built or engines(name, choice.precision)
    precision_reason = choice.reason.partition("; ")[2]  # what follows the rule's own "why"
    if name == INT8_ENGINE:  # the reason from the precision it replaces: fp32 where bf16 is emulated
        why = (
            "bf16 would be emulated on this CPU"
            if choice.precision == "fp32"
            else "it was the fastest measured"
        )
        name, choice = "openvino", replace(choice, precision="int8")
        precision_reason = (
            f"int8 because {why} and int8 passed its gate (--precision fp32 for exact fp32 results)"
        )
    reason = "; ".join(filter(None, [measured, precision_reason, int8_note]))
    return backend_engine, replace(choice, name=name, reason=reason)


def _gated_int8(run: LoadedRun, cache_dir: Path, say) -> tuple[Path | None, str]:
    """(int8 IR or None, what its gate said): the int8 candidate ``auto`` may time (int8_plan)."""
    if not is_available("openvino"):
        return None, ""
    try:
        return cached_int8_export(run, cache_dir, say)
    except ExportError as error:
        return None, f"int8 not used: {error}"


def _fastest_engine(engines: _Engines, precision: str) -> tuple[str, str, object]:
    """(engine name, why, the engine if it was built here): ``auto`` times every installed engine once per
    model, machine and batch size, then remembers the figures.

    The first load of a model on a CPU exports it to each format (once; cached) and times each engine on a
    batch of ``engines.batch_size`` images at the run's own input size (``time_engines``); later loads read
    the figures back. A gated int8 IR (``engines.int8_ir``) joins the candidates as INT8_ENGINE.
    """
    run, runtime, say = engines.run, engines.runtime, engines.say
    candidates = measurable_engines(precision) + ([INT8_ENGINE] if engines.int8_ir is not None else [])
    label = f"{precision} or int8" if engines.int8_ir is not None else precision
    if len(candidates) == 1:
        return candidates[0], "the only engine installed for this precision", None
    size = int(run.meta["preprocessing"]["crop_size"])
    model_key = f"{run.digest}:{run.meta.get('tta', 'none')}:{size}"
    batch_size = engines.batch_size
    path = measurement_path(engines.cache_dir, runtime.cpu, runtime.threads, label, model_key, batch_size)
    figures = read_measurement(path)
    cached = figures is not None and set(figures) == set(candidates)
    built = {}
    if not cached:
        if say is not None:
            say(f"timing {', '.join(candidates)} on this CPU once for this model, {batch_size} images a call")
        shape = (batch_size, 3, size, size)
        batch = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        built = {name: engines(name, precision) for name in candidates}
        started = time.perf_counter()
        figures = time_engines(built, batch)
        write_measurement(path, figures, runtime.cpu, runtime.threads, batch_size)
        if say is not None:
            say(f"timed in {time.perf_counter() - started:.1f} s (once per model, CPU and batch size)")
    fastest = max(figures, key=figures.get)
    described = describe_measurement(figures, label, runtime.threads, cached, batch_size)
    return fastest, described, built.get(fastest)


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files as given; folders walked recursively in sorted order, hidden names skipped.

    A path that does not exist is kept: reading it fails with "file not found" on that input's own line.
    """
    paths: list[str] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                paths += [str(Path(root) / f) for f in sorted(files) if not f.startswith(".")]
        else:
            paths.append(str(path))
    return paths


class _BackendModule(torch.nn.Module):
    """A non-torch backend behind the nn.Module call that evaluate_split's batch loop expects."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.backend(images.float().cpu().contiguous().numpy()))


def load(
    run_dir: str | os.PathLike, device: str = "auto", precision: str = "auto", backend: str = "auto"
) -> Classifier:
    """``resfit.load(RUN_DIR).predict(image)``, on the fastest backend this CPU has (see ``describe()``)."""
    return Classifier.load(run_dir, device, precision, backend)

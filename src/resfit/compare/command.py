"""``resfit compare``: train (or take) several models with one recipe, then measure them side by side.

Every row is evaluated by the code ``resfit evaluate`` runs, on one scan of the data, and timed on the
backend ``resfit predict`` uses, one row after another in this process, so the rows differ only in the
model. Each row names the weights it started from and that source's own accuracy, so a difference
between sources is not read as a difference in depth.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from ..data.scan import load_dataset
from ..data.sources import discover
from ..data.splits import DatasetSource
from ..ensemble import WEIGHTINGS
from ..errors import ConfigError, ExportError, RunFolderError, WeightsError
from ..evaluate import evaluate_split
from ..fileio import atomic_write_json
from ..inference.classifier import Classifier, InferenceConfig
from ..models import check_architecture, fused_members
from ..run_folder import RunFolder, load_model, read_meta
from ..settings import comma_list, setting
from ..train import TrainConfig, resume, train
from .measure import (
    Timing,
    batch_of,
    count_flops,
    count_parameters,
    file_size,
    history_seconds,
    time_calls,
    weights_files,
)
from .report import write_reports

DEFAULT_MODELS = ("resnet50", "resnet101", "resnet50+resnet101")
TTA_MODES = ("flip", "flip+multiscale")
WEIGHT_WORDS = ("imagenet", "none")
TIMINGS = "timings.json"  # build times of the runs this compare folder made, kept across reruns
# Settings of a stored run that do not change the model it trains, so a reused run may differ in them.
_RECIPE_IGNORED = {
    "data",
    "out",
    "quiet",
    "num_workers",
    "device",
    "precision",
    "feature_cache",
    "decoded_cache",
    "sync_bn",
}


@dataclass
class CompareConfig:
    """What to compare and how to measure it; ``train`` is the recipe every model trained here gets.

    ``models`` entries are architecture names ("resnet50", fused "resnet50+resnet101") trained into
    ``out/runs/<name>``, or existing run folders taken as they are. ``weights`` is 'imagenet' or 'none'
    for all, or ``arch=FILE`` pairs separated by commas.
    """

    data: str = ""  # the command's positional DATA
    models: list[str] = setting(
        default_factory=lambda: list(DEFAULT_MODELS),
        parse=comma_list,
        metavar="MODELS",
        help="comma-separated: architectures to train (a+b: one fused network) or existing run folders "
        f"(default {','.join(DEFAULT_MODELS)})",
    )
    weights: str = setting(
        "imagenet",
        help="imagenet or none for all, or ARCH=FILE pairs separated by commas "
        "(resnet50=A.pth,resnet101=B.pth; a fused a+b model gets both)",
    )
    out: str | None = setting(None, help="comparison folder (default runs/compare-<timestamp>)")
    train: TrainConfig = field(default_factory=TrainConfig)  # the recipe flags, as train's
    ensemble: bool = setting(
        True,
        negate="--no-ensemble",
        help="skip the late-fusion ensemble of the first two single-architecture runs",
    )
    ensemble_weighting: str = setting(
        "val",
        choices=WEIGHTINGS,
        help="the ensemble's member weights: equal, or fitted on the validation log-loss",
    )
    inference: InferenceConfig = field(default_factory=InferenceConfig)  # what `resfit predict` uses
    tta_modes: tuple[str, ...] = TTA_MODES
    # Timing protocol (the report states it): medians over enough calls to ride out scheduler noise.
    latency_warmup: int = 5
    latency_repeats: int = setting(30, help="timed batch-1 calls per figure (the median is reported)")
    throughput_batch: int = setting(32, help="batch size of the throughput figure")
    throughput_warmup: int = 2
    throughput_repeats: int = 5

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("compare needs DATA: the dataset every model is evaluated on")
        if not self.models:
            raise ConfigError("--models is empty: name architectures or run folders, comma-separated")
        checks = [
            (self.latency_repeats >= 1, f"latency repeats must be >= 1, got {self.latency_repeats}"),
            (self.throughput_repeats >= 1, f"throughput repeats must be >= 1, got {self.throughput_repeats}"),
            (self.throughput_batch >= 1, f"throughput batch must be >= 1, got {self.throughput_batch}"),
            (
                self.latency_warmup >= 1 and self.throughput_warmup >= 1,
                "warm-up must be at least one call",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class ModelPlan:
    """One row to be: an existing run folder, or an architecture to train with ``weights``."""

    name: str
    run_dir: Path
    architecture: str | None = None  # None: an existing run folder, taken as is
    weights: str | None = None


@dataclass
class CompareRow:
    """Everything measured about one model; every figure carries how it was measured in the report."""

    name: str
    kind: str  # single | fused | ensemble
    architecture: str
    run_dir: str
    origin: str  # trained here | resumed here | reused from this folder | given | built here
    sources: list[dict]
    epochs: int | None
    crop_size: int
    val: dict
    test: dict | None
    tta: dict[str, dict]
    latency: dict
    throughput: dict
    backend: str
    backend_fallback: str | None  # why the default backend could not run this row, when it could not
    precision: str
    threads: int
    parameters: int
    flops: int
    weight_files: list[str]
    file_bytes: int
    train_seconds: float | None
    train_seconds_how: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CompareResult:
    out: Path
    rows: list[CompareRow]
    table: str
    report_md: Path
    report_json: Path
    plot: Path


def compare(config: CompareConfig, say: Callable[[str], None] = print) -> CompareResult:
    """Train or take each model, add the ensemble, evaluate and time every row, write the reports."""
    config.validate()
    out = Path(config.out) if config.out else default_out()
    plans = plan_models(config, out)
    recipes = {plan.name: recipe_for(config, plan) for plan in plans if plan.architecture}
    for recipe in recipes.values():
        recipe.validate()  # every config is checked before the first (long) training starts
    for plan in plans:
        if not plan.architecture:
            check_given_run(plan.run_dir, config)
    out.mkdir(parents=True, exist_ok=True)
    timings = _read_timings(out)

    built: list[tuple[ModelPlan, str]] = []
    for plan in plans:
        origin = obtain_run(plan, recipes.get(plan.name), timings, out, say)
        built.append((plan, origin))

    if config.ensemble:
        ensemble = build_ensemble_row(config, [plan for plan, _ in built], timings, out, say)
        if ensemble is not None:
            built.append(ensemble)

    say(f"scanning {config.data} once for every row")
    source, report = load_dataset(
        config.data,
        val_fraction=config.train.val_fraction,
        seed=config.train.seed,
        progress=not config.train.quiet,
    )
    say(report.summary_line())
    val_items = source.splits["val"].items[: config.throughput_batch]
    timing_images = [source.read(item)[0] for item in val_items]

    rows = []
    load_before = os.getloadavg()[0]
    for plan, origin in built:
        say(f"measuring {plan.name} ({plan.run_dir})")
        rows.append(measure_row(plan, origin, config, source, timing_images, timings, say))
        gc.collect()  # one model in memory at a time: big rows must not slow the next one down

    load_average = {"before": load_before, "after": os.getloadavg()[0]}
    table, report_md, report_json, plot = write_reports(out, rows, config, source, report, load_average)
    say(table)
    return CompareResult(out, rows, table, report_md, report_json, plot)


def default_out() -> Path:
    return Path("runs") / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


# -- what to compare ------------------------------------------------------------------------------


def plan_models(config: CompareConfig, out: Path) -> list[ModelPlan]:
    """Each --models entry as a run folder to take or an architecture to train, with its weights."""
    plans: list[ModelPlan] = []
    to_train: list[str] = []
    for entry in (e.strip() for e in config.models):
        if not entry:
            raise ConfigError(f"empty entry in --models {','.join(config.models)!r}")
        path = Path(entry).expanduser()
        if RunFolder(path).has_model:
            plans.append(ModelPlan(path.name, path))
        elif path.is_dir() or "/" in entry or "\\" in entry:
            raise RunFolderError(f"{entry} is not a run folder (no {RunFolder.MODEL_META} in it)")
        else:
            check_architecture(entry)
            plans.append(ModelPlan(entry, out / "runs" / entry, architecture=entry))
            to_train.append(entry)
    names = [plan.name for plan in plans]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(
            f"--models names {', '.join(duplicates)} more than once: each row needs its own name"
        )
    weights = weights_per_backbone(config.weights, to_train)
    for plan in plans:
        if plan.architecture:
            plan.weights = weights_for(plan.architecture, weights)
    return plans


def weights_per_backbone(weights: str, architectures: list[str]) -> dict[str, str]:
    """--weights as one source per backbone architecture: a word for all, or ``arch=FILE`` pairs."""
    backbones = sorted({arch for name in architectures for arch in fused_members(name)})
    default, pairs = None, {}
    for token in (t.strip() for t in weights.split(",")):
        if not token:
            continue
        arch, is_pair, value = token.partition("=")
        if not is_pair:
            if default is not None:
                raise ConfigError(
                    f"--weights {weights!r}: give one word for all models, or arch=FILE pairs, e.g. "
                    "resnet50=A.pth,resnet101=B.pth"
                )
            default = token
            continue
        arch, value = arch.strip(), value.strip()
        check_architecture(arch)
        if len(fused_members(arch)) > 1:
            raise ConfigError(
                f"--weights {token!r}: give each backbone of a fused model its own pair "
                f"({', '.join(f'{a}=FILE' for a in fused_members(arch))})"
            )
        if arch in pairs:
            raise ConfigError(f"--weights names {arch} twice")
        if arch not in backbones:
            raise ConfigError(
                f"--weights names {arch}, which no model to train here uses ({', '.join(backbones)})"
            )
        if value not in WEIGHT_WORDS and not Path(value).expanduser().is_file():
            raise WeightsError(f"weights file not found: {value} (for {arch})")
        pairs[arch] = value
    if default is None:
        default = None if pairs else "imagenet"
    elif default not in WEIGHT_WORDS:
        if len(backbones) > 1:
            raise ConfigError(
                f"--weights {default}: a weights file fits one architecture, and {', '.join(backbones)} "
                "are trained here: give arch=FILE pairs"
            )
        if not Path(default).expanduser().is_file():
            raise WeightsError(f"weights file not found: {default}")
    resolved = {}
    for arch in backbones:
        value = pairs.get(arch, default)
        if value is None:
            raise ConfigError(f"--weights has no source for {arch}: add {arch}=FILE (or imagenet / none)")
        resolved[arch] = value
    return resolved


def weights_for(architecture: str, per_backbone: dict[str, str]) -> str:
    """TrainConfig.weights for one model: its source, or for a fused one "A,B" in backbone order."""
    parts = [per_backbone[arch] for arch in fused_members(architecture)]
    return parts[0] if len(set(parts)) == 1 and parts[0] in WEIGHT_WORDS else ",".join(parts)


def recipe_for(config: CompareConfig, plan: ModelPlan) -> TrainConfig:
    return replace(
        config.train, data=config.data, model=plan.architecture, weights=plan.weights, out=str(plan.run_dir)
    )


# -- getting each run -------------------------------------------------------------------------------


def obtain_run(
    plan: ModelPlan, recipe: TrainConfig | None, timings: dict, out: Path, say: Callable[[str], None]
) -> str:
    """Make sure ``plan.run_dir`` holds a finished run: take it, reuse it, resume it or train it."""
    if recipe is None:
        return "given"
    run_dir, folder = plan.run_dir, RunFolder(plan.run_dir)
    if folder.is_finished:
        check_same_recipe(run_dir, recipe)
        say(f"{plan.name}: {run_dir} already holds a finished run with this recipe: reused")
        return "reused from this folder"
    if folder.is_started:
        check_same_recipe(run_dir, recipe)
        say(f"{plan.name}: resuming the interrupted run in {run_dir}")
        resume(run_dir, say=say)
        _record_timing(out, timings, run_dir, history_seconds(run_dir), "history.csv elapsed (resumed)")
        return "resumed here"
    say(f"{plan.name}: training {plan.architecture} from {plan.weights} into {run_dir}")
    result = train(recipe, say=say)
    _record_timing(out, timings, run_dir, result.seconds, "RunResult.seconds")
    return "trained here"


def check_same_recipe(run_dir: Path, recipe: TrainConfig) -> None:
    """A run found in the compare folder is reused only if it was trained with the recipe asked for now."""
    stored = TrainConfig.from_dict(RunFolder(run_dir).read_train_config())
    for name, wanted in recipe.to_dict().items():
        if name in _RECIPE_IGNORED or wanted is None or wanted == "auto":
            continue  # None and "auto" are resolved by training, so the stored value is the resolved one
        found, wanted = _plain(getattr(stored, name)), _plain(wanted)
        if name == "weights":
            found, wanted = _weights_key(found), _weights_key(wanted)
        if found != wanted:
            raise ConfigError(
                f"{run_dir} holds a run trained with {name}={found!r}, but this compare asks for {wanted!r}: "
                "choose another --out (or remove that run folder)"
            )


def _plain(value):
    """As stored in JSON (tuples become lists), so a value compares equal to its stored copy."""
    return json.loads(json.dumps(value))


def _weights_key(weights: str) -> str:
    return ",".join(
        part if part in WEIGHT_WORDS else str(Path(part).expanduser().resolve())
        for part in weights.split(",")
    )


def build_ensemble_row(
    config: CompareConfig, plans: list[ModelPlan], timings: dict, out: Path, say: Callable[[str], None]
) -> tuple[ModelPlan, str] | None:
    """The late-fusion ensemble of the first two single-architecture runs, or None when there are fewer."""
    singles = [plan for plan in plans if _architecture(plan.run_dir) not in ("ensemble",)]
    singles = [plan for plan in singles if len(fused_members(_architecture(plan.run_dir))) == 1]
    if len(singles) < 2:
        say("no ensemble: it needs two single-architecture runs")
        return None
    first, second = singles[:2]
    name = f"ensemble-{first.name}+{second.name}"
    plan = ModelPlan(name, out / "runs" / name)
    if RunFolder(plan.run_dir).is_finished:
        say(f"{name}: {plan.run_dir} already holds it: reused")
        return plan, "reused from this folder"
    from ..ensemble import build_ensemble

    started = time.perf_counter()
    build_ensemble(
        [first.run_dir, second.run_dir],
        plan.run_dir,
        data=config.data,
        weighting=config.ensemble_weighting,
        say=say,
    )
    _record_timing(out, timings, plan.run_dir, time.perf_counter() - started, "build_ensemble wall time")
    return plan, "built here"


def _architecture(run_dir: Path) -> str:
    return read_meta(run_dir)["architecture"]


def _read_timings(out: Path) -> dict:
    path = out / TIMINGS
    return json.loads(path.read_text()) if path.is_file() else {}


def _timing_key(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


def _record_timing(out: Path, timings: dict, run_dir: Path, seconds: float | None, how: str) -> None:
    timings[_timing_key(run_dir)] = {"seconds": seconds, "how": how}
    atomic_write_json(out / TIMINGS, timings)


# -- measuring each row -----------------------------------------------------------------------------


def check_given_run(run_dir: Path, config: CompareConfig) -> None:
    """A run folder given as is must know the data's classes and be validated on the same split."""
    meta = read_meta(run_dir)
    classes = discover(
        config.data, val_fraction=config.train.val_fraction, seed=config.train.seed
    ).class_names
    if meta["class_names"] != classes:
        raise ConfigError(
            f"the classes of {config.data} {classes} differ from {run_dir}'s {meta['class_names']}"
        )
    ours = (config.train.val_fraction, config.train.seed)
    split = RunFolder.split_settings(meta)
    theirs = (split["val_fraction"], split["seed"])
    if theirs == ours:
        return
    ours_val = discover(config.data, val_fraction=ours[0], seed=ours[1]).splits.get("val")
    theirs_val = RunFolder.listing(config.data, meta).splits.get("val")
    if ours_val is None or theirs_val is None or set(ours_val.items) != set(theirs_val.items):
        raise ConfigError(
            f"{run_dir} was trained holding out val_fraction {theirs[0]} with seed {theirs[1]}, which gives "
            f"another validation split of {config.data} than this compare's (val_fraction {ours[0]}, "
            f"seed {ours[1]}): pass --val-fraction/--seed to match"
        )


def measure_row(
    plan: ModelPlan,
    origin: str,
    config: CompareConfig,
    source: DatasetSource,
    timing_images: list,
    timings: dict,
    say: Callable[[str], None],
) -> CompareRow:
    run_dir = plan.run_dir
    splits = ["val"] + (["test"] if "test" in source.splits else [])

    classifier, fallback = load_classifier(run_dir, replace(config.inference, tta="none"), say)
    say(f"  inference: {classifier.describe()}")
    if classifier.class_names != source.class_names:
        raise ConfigError(
            f"the classes of {config.data} {source.class_names} differ from {run_dir}'s {classifier.class_names}"
        )
    metrics = evaluate(classifier, source, splits)
    images = classifier.preprocess(timing_images)
    latency = time_calls(
        classifier.logits, batch_of(images, 1), config.latency_warmup, config.latency_repeats
    )
    throughput = time_calls(
        classifier.logits,
        batch_of(images, config.throughput_batch),
        config.throughput_warmup,
        config.throughput_repeats,
    )
    say(
        f"  val accuracy {metrics['val']['accuracy']:.4f}; batch-1 {latency.median_ms:.1f} ms; "
        f"{throughput.images_per_s:.1f} img/s at batch {throughput.batch_size}"
    )
    backend, precision, threads = (
        classifier.describe(),
        classifier.choice.precision,
        classifier.runtime.threads,
    )
    meta, crop_size = classifier.meta, classifier.preprocessing.crop_size
    del classifier

    tta = {}
    for mode in config.tta_modes:
        augmented, tta_fallback = load_classifier(run_dir, replace(config.inference, tta=mode), say)
        accuracy = evaluate(augmented, source, ["val"])["val"]["accuracy"]
        tta_images = augmented.preprocess(timing_images[:1])
        tta_latency = time_calls(augmented.logits, tta_images, config.latency_warmup, config.latency_repeats)
        tta[mode] = {
            "val_accuracy": accuracy,
            "crop_size": augmented.preprocessing.crop_size,
            "latency": tta_latency.to_dict(),
            "backend": augmented.describe(),
            "backend_fallback": tta_fallback,
        }
        say(f"  TTA {mode}: val accuracy {accuracy:.4f}; batch-1 {tta_latency.median_ms:.1f} ms")
        del augmented

    module, _ = load_model(run_dir, tta="none")
    parameters = count_parameters(module)
    flops = count_flops(module, images[0])
    del module

    files = weights_files(run_dir, meta)
    seconds, how = training_seconds(plan, meta, timings)
    return CompareRow(
        name=plan.name,
        kind=kind_of(meta["architecture"]),
        architecture=meta["architecture"],
        run_dir=str(run_dir),
        origin=origin,
        sources=describe_sources(meta),
        epochs=_epochs(meta),
        crop_size=crop_size,
        val=_summary(metrics["val"]),
        test=_summary(metrics["test"]) if "test" in metrics else None,
        tta=tta,
        latency=latency.to_dict(),
        throughput=throughput.to_dict(),
        backend=backend,
        backend_fallback=fallback,
        precision=precision,
        threads=threads,
        parameters=parameters,
        flops=flops,
        weight_files=[str(path) for path in files],
        file_bytes=file_size(files),
        train_seconds=seconds,
        train_seconds_how=how,
    )


def load_classifier(
    run_dir: Path, inference: InferenceConfig, say: Callable[[str], None]
) -> tuple[Classifier, str | None]:
    """The Classifier ``resfit predict`` would use; eager PyTorch, with the reason, where its export fails."""
    try:
        return Classifier.load(run_dir, config=inference, say=say), None
    except ExportError as error:
        if inference.backend == "torch":
            raise
        reason = f"the {inference.backend} backend failed ({error}); measured on eager PyTorch instead"
        say(f"  {reason}")
        return Classifier.load(run_dir, config=replace(inference, backend="torch"), say=say), reason


def evaluate(classifier: Classifier, source: DatasetSource, splits: list[str]) -> dict[str, dict]:
    """Metrics per split exactly as ``resfit evaluate`` computes them, on the classifier's backend."""
    model, runtime = classifier.logits_module()
    return {
        split: evaluate_split(model, source, split, classifier.preprocessing, runtime)[0] for split in splits
    }


def _summary(metrics: dict) -> dict:
    return {
        "num_images": metrics["num_images"],
        "accuracy": metrics["accuracy"],
        "top5_accuracy": metrics.get("top5_accuracy"),
        "f1_macro": metrics["f1_macro"],
    }


def kind_of(architecture: str) -> str:
    if architecture == "ensemble":
        return "ensemble"
    return "fused" if len(fused_members(architecture)) > 1 else "single"


def _epochs(meta: dict) -> int | None:
    """Fine-tuning epochs of the recipe; an ensemble's when its members agree."""
    if meta.get("architecture") == "ensemble":
        epochs = set()
        for member in meta.get("members", []):
            member_run = RunFolder(member.get("run_dir", ""))
            training = member_run.read_meta().get("training_config") if member_run.has_model else None
            epochs.add((training or {}).get("epochs"))
        return epochs.pop() if len(epochs) == 1 else None
    return (meta.get("training_config") or {}).get("epochs")


def training_seconds(plan: ModelPlan, meta: dict, timings: dict) -> tuple[float | None, str]:
    """Wall time to train the row: as this compare measured it, else from the run's history.csv."""
    if meta.get("architecture") == "ensemble":
        member_seconds = [_run_seconds(Path(m["run_dir"]), timings)[0] for m in meta.get("members", [])]
        build = timings.get(_timing_key(plan.run_dir), {}).get("seconds")
        if build is None or not member_seconds or any(s is None for s in member_seconds):
            return None, "unknown: a member's training or the ensemble's build was not timed"
        return sum(member_seconds) + build, f"members' training + build_ensemble {build:.1f} s"
    return _run_seconds(plan.run_dir, timings)


def _run_seconds(run_dir: Path, timings: dict) -> tuple[float | None, str]:
    recorded = timings.get(_timing_key(run_dir))
    if recorded and recorded.get("seconds") is not None:
        return float(recorded["seconds"]), recorded["how"]
    seconds = history_seconds(run_dir)
    return seconds, "history.csv elapsed" if seconds is not None else "unknown: no history.csv"


def describe_sources(meta: dict) -> list[dict]:
    """The starting weights of every backbone in the row, each with its card's accuracy when it has one."""
    if meta.get("architecture") == "ensemble":
        sources = []
        for member in meta.get("members", []):
            sources += _sources_of(member.get("architecture", "?"), member.get("pretrained") or {})
        return sources
    return _sources_of(meta["architecture"], meta.get("pretrained") or {})


def _sources_of(architecture: str, pretrained: dict) -> list[dict]:
    if pretrained.get("members"):
        return [
            _source(arch, member)
            for arch, member in zip(fused_members(architecture), pretrained["members"], strict=False)
        ]
    return [_source(architecture, pretrained)]


def _source(architecture: str, pretrained: dict) -> dict:
    card = pretrained.get("card") or {}
    return {
        "architecture": architecture,
        "kind": pretrained.get("kind", "unknown"),
        "description": pretrained.get("description", "not recorded"),
        "card_file": card.get("file"),
        "card_sha256": card.get("sha256"),
        "card_val_top1": card.get("val_top1"),
    }


__all__ = ["CompareConfig", "CompareResult", "CompareRow", "Timing", "compare"]

"""Command line: parses flags into the library's configs and calls it; errors become one line and an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .errors import ConfigError, DataError, ResfitError
from .fileio import atomic_write_json
from .settings import add_flags, from_args
from .train.config import TrainConfig
from .version import __version__

EXIT_INTERRUPTED = 130
EXIT_SOME_FAILED = 1
SPLIT_SEED_HELP = {"seed": "seed of the held-out split (train's --seed)"}


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a ResNet on a dataset (or --resume a run)",
        description="Fine-tune: fit the head on the frozen backbone, then the whole network.",
    )
    p.add_argument(
        "data",
        nargs="?",
        help="dataset: ImageFolder tree, flat class folders, CSV manifest, CIFAR-10 archive or a folder of "
        "shards (resfit shard)",
    )
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue an interrupted run from the last epoch it saved"
    )
    add_flags(p, TrainConfig, skip={"data"})


def _audit_parser(sub) -> None:
    from .audit import AuditConfig

    p = sub.add_parser(
        "audit",
        help="find duplicates, train/val leakage, label conflicts, likely label errors and outliers",
        description="Audit a dataset: exact copies (sha256) and near copies (perceptual hash, backbone "
        "features) within a class, across classes and across splits; likely label errors by confident "
        "learning on out-of-fold probe probabilities; outliers; class counts. Writes OUT/audit.json (with a "
        "proposed 'exclude' list for train --exclude-from) and OUT/audit.png. Never moves or rewrites a file.",
    )
    p.add_argument("data", help="dataset: ImageFolder tree, flat class folders, CSV manifest or CIFAR-10")
    add_flags(p, AuditConfig, skip={"data"})
    p.add_argument("--json", action="store_true", help="print the whole audit.json")


def _run_audit(args) -> int:
    from .audit import AUDIT_FILE, AuditConfig, audit

    config = from_args(AuditConfig, args)
    say = _say_stderr if args.json else None
    report = audit(config, say=say)
    out = Path(report.out_dir)
    if args.json:
        print((out / AUDIT_FILE).read_text(encoding="utf-8"), end="")
        return 0
    for line in report.summary_lines():
        print(line)
    sheet = f" and the contact sheet {out / report.contact_sheet}" if report.contact_sheet else ""
    print(f"wrote {out / AUDIT_FILE}{sheet}")
    return 0


def _lr_find_parser(sub) -> None:
    from .train.lr_find import END_LR, START_LR, STEPS

    p = sub.add_parser(
        "lr-find",
        help="learning-rate range test: a loss-vs-lr plot and a suggested --lr (what --lr auto runs)",
        description="Prepare as train does (scan, weights, head stage), then sweep the fine-tuning lr "
        "exponentially over up to --steps optimizer steps; write lr_find.png and lr_find.json and print the suggestion. "
        "Given a run folder, use that run's settings (it is not modified); flags given here override them.",
    )
    p.add_argument(
        "run_or_data", metavar="RUN_OR_DATA", help="a dataset, or a run folder to take settings from"
    )
    add_flags(p, TrainConfig, skip={"data", "out", "log", "mlflow_uri"})
    # A flag not given stays None, so only the flags given apply (over a run's settings or the defaults).
    p.set_defaults(**{f.name: None for f in fields(TrainConfig) if f.name not in ("data", "out")})
    p.add_argument("--out", help="where lr_find.png/json go (default runs/lr-find-<timestamp>)")
    p.add_argument("--start-lr", type=float, default=START_LR, help="first head lr of the sweep")
    p.add_argument("--end-lr", type=float, default=END_LR, help="last head lr of the sweep")
    p.add_argument(
        "--steps", type=int, default=STEPS, help="optimizer steps in the sweep (it stops early on a blow-up)"
    )


def _run_lr_find(args) -> int:
    from .run_folder import RunFolder
    from .train.loop import find_lr, lr_find_config
    from .train.lr_find import describe

    known = {f.name for f in fields(TrainConfig)} - {"data", "out"}
    given = {k: v for k, v in vars(args).items() if k in known and v is not None}
    config = lr_find_config(args.run_or_data, given)
    result, out = find_lr(config, args.out, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps)
    print(describe(result))
    print(f"suggested --lr {result.suggestion:.2e}; plot: {RunFolder(out).lr_find_plot}")
    return 0


def _run_train(args) -> int:
    from .train import resume, train

    if args.resume:
        resume(args.resume)
        return 0
    if not args.data:
        raise ConfigError("train needs DATA (or --resume RUN_DIR)")
    train(from_args(TrainConfig, args))
    return 0


def _compare_parser(sub) -> None:
    from .compare import CompareConfig
    from .inference.classifier import InferenceConfig

    p = sub.add_parser(
        "compare",
        help="train several models with one recipe and compare accuracy, TTA, latency, size and cost",
        description="Train (or take) each model, add their ensemble, evaluate and time every one alike, "
        "and write OUT/report.md, report.json and accuracy_vs_latency.png.",
    )
    p.add_argument("data", help="dataset every model is trained and evaluated on")
    add_flags(p, CompareConfig, skip={"data"})
    # the recipe every model trained here gets (compare's own --weights names a source per architecture)
    add_flags(p, TrainConfig, skip={"data", "model", "weights", "out", "exclude_from", "log", "mlflow_uri"})
    add_flags(
        p,
        InferenceConfig,
        only={"backend"},
        help_for={
            "backend": "inference engine every row is measured on (default: the one resfit predict picks, printed)"
        },
    )


def _run_compare(args) -> int:
    from .compare import CompareConfig, compare
    from .inference.classifier import InferenceConfig

    recipe = from_args(TrainConfig, args, skip={"data", "model", "weights", "out"})
    inference = InferenceConfig(backend=args.backend)  # --device/--precision are the recipe's
    config = from_args(CompareConfig, args, train=recipe, inference=inference)
    compare(config)
    return 0


def _add_tta_flag(p, default_help: str) -> None:
    from .inference.classifier import InferenceConfig
    from .model_wrappers import TTA_HELP

    add_flags(p, InferenceConfig, only={"tta"}, help_for={"tta": f"{TTA_HELP}; {default_help}"})


def _add_backend_flags(p) -> None:
    from .inference.classifier import InferenceConfig

    add_flags(p, InferenceConfig)


def _say_stderr(message: str) -> None:
    print(f"resfit: {message}", file=sys.stderr, flush=True)


# Batch predict (this many images or more) and serve may quantize and check gated int8 (minutes where NNCF's
# accuracy control runs, once): it pays off there; a few-image predict uses int8 only once a verdict is cached
# (classifier.int8_plan).
PREDICT_INT8_MIN_IMAGES = 32


def _load_classifier(args, **settings):
    """The Classifier the flags ask for (``settings``: InferenceConfig fields no flag sets); which backend it
    runs on (and why) goes to stderr."""
    from .inference.classifier import Classifier, InferenceConfig

    config = from_args(InferenceConfig, args, **settings)
    classifier = Classifier.load(args.run_dir, config=config, say=_say_stderr)
    _say_stderr(classifier.describe())
    return classifier


def _run_export(args) -> int:
    from .export import ExportConfig, export_run
    from .inference.classifier import expand_inputs

    config = from_args(ExportConfig, args, check_images=expand_inputs(args.check_images))
    result = export_run(config)
    print(f"wrote {result.path} in {result.seconds:.1f} s (top-1 agrees with PyTorch on every check image)")
    if result.format == "timm":
        print(f'load it with: timm.create_model("local-dir:{result.path.resolve()}", pretrained=True)')
    return 0


def _run_serve(args) -> int:
    from .serve import ServeConfig, run_server

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {args.port}")
    config = from_args(ServeConfig, args)
    # serve answers from its first second: a first int8 quantization (minutes) runs in the background
    classifier = _load_classifier(args, int8="background", batch_size=config.max_batch)
    print(f"resfit: serving on http://{args.host}:{args.port}/ (API docs at /docs)", file=sys.stderr)
    run_server(classifier, args.host, args.port, config)
    return 0


def _run_evaluate(args) -> int:
    from .evaluate import evaluate_split
    from .metrics import format_metrics_table
    from .run_folder import RunFolder

    classifier = _load_classifier(args)
    # The run's own split settings, so a flat folder is split the same way as in training.
    source, report = RunFolder(classifier.run_dir).dataset(args.data, classifier.meta)
    if args.split not in source.splits:
        raise DataError(f"{args.data} has no {args.split} split (it has {', '.join(source.splits)})")
    if source.class_names != classifier.class_names:
        raise DataError(
            f"the classes of {args.data} {source.class_names} differ from the model's {classifier.class_names}"
        )
    trained_with = classifier.meta.get("precision")
    if classifier.choice.name != "torch" or classifier.choice.precision != trained_with:
        _say_stderr(
            f"note: training measured metrics.json with torch ({trained_with}); {classifier.choice.name} "
            f"({classifier.choice.precision}) may differ by an image or two: --backend torch reproduces it"
        )
    model, runtime = classifier.logits_module()
    metrics, probs = evaluate_split(
        model, source, args.split, classifier.preprocessing, runtime, reject=classifier.reject
    )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        # named as val's reports whichever split they are of: OUT holds one evaluation
        RunFolder(args.out).write_evaluation(metrics, probs, source, report_as="val")
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(report.summary_line(report_file=None))
        print(format_metrics_table(metrics))
    return 0


def _run_ensemble(args) -> int:
    from .ensemble import build_ensemble

    build_ensemble(args.run_dirs, args.out, args.data, args.weighting, tta=args.tta or "none")
    return 0


def _run_predict(args) -> int:
    from .inference.classifier import expand_inputs

    paths = expand_inputs(args.paths)
    if not paths:
        raise DataError(f"no files to predict in {' '.join(args.paths)}")
    from .inference.classifier import PREDICT_BATCH_SIZE

    classifier = _load_classifier(
        args,
        int8="now" if len(paths) >= PREDICT_INT8_MIN_IMAGES else "cached",
        batch_size=min(len(paths), PREDICT_BATCH_SIZE),
    )
    failed = 0
    for prediction in classifier.predict_paths(paths, top_k=args.top_k):
        failed += prediction.error is not None
        if args.json:
            print(json.dumps(prediction.to_dict()), flush=True)
        elif prediction.error is not None:
            print(f"{prediction.path}\tERROR: {prediction.error}", flush=True)
        else:
            ranked = "  ".join(f"{name} {p:.3f}" for name, p in prediction.top_k)
            unknown = f"unknown ({prediction.reason})  " if prediction.unknown else ""
            print(f"{prediction.path}\t{unknown}{ranked}", flush=True)
    if failed:
        print(f"resfit: {failed} of {len(paths)} files could not be read", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else 0


def _run_shard(args) -> int:
    from .data.shard_writer import write_shards

    summary = write_shards(
        args.data,
        args.out,
        shard_mb=args.shard_size,
        shard_samples=args.shard_samples,
        val_fraction=args.val_fraction,
        seed=args.seed,
        exclude_from=args.exclude_from,
        progress=True,
    )
    for line in summary.lines():
        print(line)
    return 0


def _run_scan(args) -> int:
    from .data.scan import load_dataset

    source, report = load_dataset(
        args.data, val_fraction=args.val_fraction, seed=args.seed, progress=not args.json
    )
    if args.report:
        atomic_write_json(Path(args.report), report.to_dict())
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    # Without --report the full report is what follows on screen: name no file that was not written.
    print(report.summary_line(args.report))
    for note in source.notes:
        print(f"note: {note}")
    for split, counts in report.class_counts.items():
        print(f"{split}: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    for entry in report.skipped:
        print(f"skipped {entry['path']}: {entry['reason']}")
    for entry in report.converted:
        print(f"converted {entry['path']}: {entry['note']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .ensemble import WEIGHTINGS
    from .export import ExportConfig
    from .serve import ServeConfig

    parser = argparse.ArgumentParser(prog="resfit", description="Fine-tune ImageNet ResNets on your images.")
    parser.add_argument("--version", action="version", version=f"resfit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _compare_parser(sub)
    _lr_find_parser(sub)
    _audit_parser(sub)

    p = sub.add_parser("evaluate", help="metrics of a run on a dataset split")
    p.add_argument("run_dir")
    p.add_argument("data")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.add_argument("--out", help="also write metrics.json, confusion_matrix.png and misclassified.* here")
    _add_backend_flags(p)

    p = sub.add_parser("predict", help="classify image files or folders")
    p.add_argument("run_dir")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_backend_flags(p)

    p = sub.add_parser(
        "export",
        help="export a run to ONNX, OpenVINO IR, TorchScript or a timm folder, checked against PyTorch on real images",
    )
    p.add_argument("run_dir")
    add_flags(p, ExportConfig, skip={"run_dir"})

    p = sub.add_parser(
        "ensemble",
        help="average several runs' probabilities into one run folder (evaluate/predict/export/serve it as one)",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="the ensemble's run folder")
    p.add_argument(
        "--weighting",
        choices=WEIGHTINGS,
        default="equal",
        help="equal weights, or weights that minimise the validation log-loss (never the test split)",
    )
    p.add_argument("--data", help="dataset whose val split scores it (default: the first run's data)")
    _add_tta_flag(p, "stored with the ensemble (default none)")

    p = sub.add_parser("serve", help="HTTP service with an upload page: POST /predict, GET /model, /docs")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) serves this machine only")
    p.add_argument("--port", type=int, default=8000)
    add_flags(p, ServeConfig)
    _add_backend_flags(p)

    p = sub.add_parser("scan", help="check a dataset: classes, splits, unreadable and converted files")
    p.add_argument("data")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument("--report", metavar="FILE", help="also write the report (data_report.json) to FILE")
    add_flags(p, TrainConfig, only={"val_fraction", "seed"}, help_for=SPLIT_SEED_HELP)  # as train splits

    p = sub.add_parser(
        "shard",
        help="write a dataset as WebDataset tar shards (scanned, unreadable files left out) for `resfit train DIR`",
    )
    p.add_argument("data")
    p.add_argument("--out", required=True, metavar="DIR", help="an empty folder outside the dataset")
    p.add_argument("--shard-size", type=float, default=256.0, metavar="MB", help="cut a shard at this size")
    p.add_argument("--shard-samples", type=int, metavar="N", help="also cut a shard at N images")
    add_flags(p, TrainConfig, only={"val_fraction", "seed", "exclude_from"}, help_for=SPLIT_SEED_HELP)
    return parser


COMMANDS = {
    "train": _run_train,
    "lr-find": _run_lr_find,
    "evaluate": _run_evaluate,
    "predict": _run_predict,
    "scan": _run_scan,
    "shard": _run_shard,
    "export": _run_export,
    "serve": _run_serve,
    "ensemble": _run_ensemble,
    "compare": _run_compare,
    "audit": _run_audit,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ResfitError as error:
        # One line, whatever a library's message held (tracebacks of other processes, wrapped text).
        print(f"resfit: error: {' '.join(str(error).split())}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("resfit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

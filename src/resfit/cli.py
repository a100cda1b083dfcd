"""Command line: parses flags into the library's configs and calls it; errors become one line and an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .errors import ConfigError, DataError, ResfitError
from .fileio import atomic_write_json
from .train.config import OPTIMIZERS, TrainConfig
from .version import __version__

EXIT_INTERRUPTED = 130
EXIT_SOME_FAILED = 1


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
        "--resume", metavar="RUN_DIR", help="continue an interrupted run from its last completed epoch"
    )
    p.add_argument(
        "--model",
        default=TrainConfig().model,
        help="resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d",
    )
    _add_train_flags(p, weights_help="imagenet (torchvision's weights), none, or a state-dict FILE")
    p.add_argument("--out", help="run folder (default runs/<model>-<timestamp>)")
    _add_exclude_flag(p)
    _add_tracking_flags(p)


def _add_tracking_flags(p) -> None:
    from .train.tracking import tracker_names

    # --track: the same flag under torchrun, whose own parser takes --log for an abbreviated --log-dir
    p.add_argument(
        "--log",
        "--track",
        type=tracker_names,
        default=[],
        metavar="TRACKERS",
        help="experiment tracking, comma-separated: tensorboard (RUN_DIR/tensorboard), mlflow "
        "(needs pip install 'resfit[track]'; default off); spell it --track under torchrun",
    )
    p.add_argument(
        "--mlflow-uri",
        metavar="URI",
        help="MLflow tracking URI (a server http://HOST:5000 or sqlite:///FILE); default $MLFLOW_TRACKING_URI, "
        "else sqlite in RUN_DIR/mlflow",
    )


def _add_exclude_flag(p) -> None:
    p.add_argument(
        "--exclude-from",
        metavar="FILE",
        help="leave out the files listed in FILE: an audit.json (its reviewed 'exclude' list, see "
        "resfit audit) or one path per line, relative to DATA; the files are not touched",
    )


def _audit_parser(sub) -> None:
    from .audit import AuditConfig

    defaults = AuditConfig()
    p = sub.add_parser(
        "audit",
        help="find duplicates, train/val leakage, label conflicts, likely label errors and outliers",
        description="Audit a dataset: exact copies (sha256) and near copies (perceptual hash, backbone "
        "features) within a class, across classes and across splits; likely label errors by confident "
        "learning on out-of-fold probe probabilities; outliers; class counts. Writes OUT/audit.json (with a "
        "proposed 'exclude' list for train --exclude-from) and OUT/audit.png. Never moves or rewrites a file.",
    )
    p.add_argument("data", help="dataset: ImageFolder tree, flat class folders, CSV manifest or CIFAR-10")
    p.add_argument("--out", help="output folder (default runs/audit-<timestamp>)")
    p.add_argument("--model", default=defaults.model, help="backbone for the feature-based checks")
    p.add_argument(
        "--weights",
        default=defaults.weights,
        help="as train: imagenet, a state-dict FILE, or none (then only the hash-based checks run)",
    )
    p.add_argument(
        "--no-features",
        dest="features",
        action="store_false",
        help="hash-based checks only (no model): copies, leakage, label conflicts",
    )
    p.add_argument(
        "--img-size", type=int, help="feature resolution (default: what the weights were trained at)"
    )
    p.add_argument("--top", type=int, default=defaults.top, help="cases per section on the contact sheet")
    p.add_argument(
        "--near-distance",
        type=int,
        default=defaults.near_distance,
        help="perceptual-hash bits (of 64) within which two images are the same picture",
    )
    p.add_argument("--json", action="store_true", help="print the whole audit.json")
    p.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default=defaults.precision, choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction)


def _run_audit(args) -> int:
    from .audit import AUDIT_FILE, AuditConfig, audit

    known = {f.name for f in fields(AuditConfig)}
    config = AuditConfig(**{k: v for k, v in vars(args).items() if k in known})
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


def _add_train_flags(p, weights_help: str) -> None:
    """The recipe's flags (TrainConfig fields), shared by train and compare."""
    defaults = TrainConfig()
    p.add_argument("--weights", default=defaults.weights, help=weights_help)
    p.add_argument(
        "--epochs", type=int, default=defaults.epochs, help="fine-tuning epochs after the head stage"
    )
    p.add_argument(
        "--img-size", type=int, help="training crop in px (default: what the weights were trained at)"
    )
    p.add_argument("--batch-size", type=int, help="default: chosen for the device")
    p.add_argument(
        "--lr",
        type=_learning_rate,
        help="head learning rate in fine-tuning (default 1e-3 AdamW, 1e-2 SGD); "
        "auto: a range test after the head stage picks it (see resfit lr-find)",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument(
        "--layer-decay",
        type=float,
        default=defaults.layer_decay,
        help="lr factor per block towards the input",
    )
    p.add_argument(
        "--frozen-blocks",
        type=int,
        default=defaults.frozen_blocks,
        help="lowest backbone blocks left untrained in fine-tuning: 0 none, 1 the stem, 2 stem + layer1 "
        "(default from pretrained weights: no backward pass through them, level accuracy in the suite; "
        "0 from scratch), up to 5",
    )
    p.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    p.add_argument(
        "--wise-ft",
        type=float,
        default=defaults.wise_ft,
        metavar="SHARE",
        help="keep SHARE x the last fine-tuned weights + (1 - SHARE) x the head stage's (WiSE-FT); "
        "1 keeps the best epoch on val",
    )
    p.add_argument("--dropout", type=float, default=defaults.dropout, help="dropout before the final layer")
    p.add_argument(
        "--augment",
        nargs="?",
        const="trivialaugment",
        default=defaults.augment,
        choices=("none", "standard", "trivialaugment", "randaugment"),
        help="standard = random resized crop + flip; --augment alone adds TrivialAugment",
    )
    p.add_argument(
        "--bn", choices=("frozen", "train"), default=defaults.bn, help="BatchNorm statistics in fine-tuning"
    )
    p.add_argument(
        "--no-head-stage", dest="head_stage", action="store_false", help="skip the frozen-backbone head fit"
    )
    p.add_argument(
        "--patience", type=int, default=defaults.patience, help="early stopping on validation loss"
    )
    p.add_argument(
        "--tta",
        choices=("none", "flip", "multiscale", "flip+multiscale"),
        default=defaults.tta,
        help="test-time augmentation stored with the model (predict, evaluate, export, serve apply it)",
    )
    p.add_argument(
        "--reject-target",
        default=defaults.reject_target,
        metavar="coverage:X|precision:X|none",
        help='the "unknown" answer, its threshold chosen on validation: answer the share X of validation '
        "photos (coverage) or the most confident share whose accuracy is X (precision); none: always answer",
    )
    p.add_argument(
        "--reject-score",
        choices=("msp", "energy"),
        default=defaults.reject_score,
        help="the confidence the rule thresholds: calibrated top-1 probability (msp) or logsumexp (energy)",
    )
    p.add_argument(
        "--multi-scale",
        action="store_true",
        help="progressive resizing: early epochs at smaller sizes, the last at --img-size",
    )
    p.add_argument(
        "--train-sizes",
        type=_int_list,
        metavar="S1,S2,...",
        help="the multi-scale sizes, run small to large (default 0.75x, 0.875x, 1x --img-size)",
    )
    p.add_argument("--ema", action="store_true", help="validate and keep an EMA of the weights")
    p.add_argument("--ema-decay", type=float, help="per step (default: a half-life of one epoch)")
    p.add_argument(
        "--mixup", type=float, default=defaults.mixup, metavar="ALPHA", help="mixup Beta alpha (0 = off)"
    )
    p.add_argument(
        "--cutmix", type=float, default=defaults.cutmix, metavar="ALPHA", help="cutmix Beta alpha (0 = off)"
    )
    p.add_argument(
        "--balance",
        choices=("auto", "none", "sampler", "loss"),
        default=defaults.balance,
        help="unequal classes: class-balanced batches or inverse-frequency loss weights "
        "(auto: batches balanced when the largest class has >= 3x the smallest's images)",
    )
    p.add_argument(
        "--no-feature-cache",
        dest="feature_cache",
        action="store_false",
        help="always recompute the head stage's features (default: cached by weights, preprocessing, image bytes)",
    )
    p.add_argument(
        "--decoded-cache",
        choices=("auto", "on", "off"),
        default=defaults.decoded_cache,
        help="decode and resize each image once into a memory-mapped cache (auto: at img-size <= 128)",
    )
    p.add_argument(
        "--sync-bn",
        action="store_true",
        help="CUDA only, under torchrun with --bn train: BatchNorm over the global batch (refused elsewhere)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=defaults.val_fraction,
        help="held out when there is no val split",
    )
    p.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N (a GPU index)")
    p.add_argument("--precision", default=defaults.precision, choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument(
        "--workers",
        dest="num_workers",
        type=int,
        help="DataLoader workers (default: none on 2 cores, where loading in-process is faster)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars: one line per epoch, for logs")


def _learning_rate(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


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
    p.add_argument("--model", default=TrainConfig().model, help="resnet18/34/50/101/152, resnext...")
    _add_train_flags(p, weights_help="imagenet (torchvision's weights), none, or a state-dict FILE")
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


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _run_train(args) -> int:
    from .train import resume, train

    if args.resume:
        resume(args.resume)
        return 0
    if not args.data:
        raise ConfigError("train needs DATA (or --resume RUN_DIR)")
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in known})
    train(config)
    return 0


def _compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="train several models with one recipe and compare accuracy, TTA, latency, size and cost",
        description="Train (or take) each model, add their ensemble, evaluate and time every one alike, "
        "and write OUT/report.md, report.json and accuracy_vs_latency.png.",
    )
    p.add_argument("data", help="dataset every model is trained and evaluated on")
    p.add_argument(
        "--models",
        default="resnet50,resnet101,resnet50+resnet101",
        help="comma-separated: architectures to train (a+b: one fused network) or existing run folders",
    )
    _add_train_flags(
        p,
        weights_help="imagenet or none for all, or ARCH=FILE pairs separated by commas "
        "(resnet50=A.pth,resnet101=B.pth; a fused a+b model gets both)",
    )
    p.add_argument("--out", help="comparison folder (default runs/compare-<timestamp>)")
    p.add_argument(
        "--no-ensemble",
        dest="ensemble",
        action="store_false",
        help="skip the late-fusion ensemble of the first two single-architecture runs",
    )
    p.add_argument(
        "--ensemble-weighting",
        choices=("equal", "val"),
        default="val",
        help="the ensemble's member weights: equal, or fitted on the validation log-loss",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "torch", "onnxruntime", "openvino"),
        help="inference engine every row is measured on (default: the one resfit predict picks, printed)",
    )
    p.add_argument(
        "--latency-repeats",
        type=int,
        default=30,
        help="timed batch-1 calls per figure (the median is reported)",
    )
    p.add_argument("--throughput-batch", type=int, default=32, help="batch size of the throughput figure")


def _run_compare(args) -> int:
    from .compare import CompareConfig, compare
    from .inference.classifier import InferenceConfig

    known = {f.name for f in fields(TrainConfig)} - {"data", "model", "weights", "out"}
    recipe = TrainConfig(**{k: v for k, v in vars(args).items() if k in known})
    config = CompareConfig(
        data=args.data,
        models=[entry.strip() for entry in args.models.split(",")],
        weights=args.weights,
        out=args.out,
        train=recipe,
        ensemble=args.ensemble,
        ensemble_weighting=args.ensemble_weighting,
        inference=InferenceConfig(backend=args.backend),
        latency_repeats=args.latency_repeats,
        throughput_batch=args.throughput_batch,
    )
    compare(config)
    return 0


def _add_tta_flag(p, default_help: str) -> None:
    from .model_wrappers import TTA_MODES

    p.add_argument(
        "--tta",
        choices=TTA_MODES,
        help="test-time augmentation, probabilities averaged over flips and/or sizes "
        f"(multiscale: 0.875x, 1x, 1.15x the crop); {default_help}",
    )


def _add_backend_flags(p) -> None:
    from .inference.engines import BACKENDS, PERFORMANCE_HINTS

    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (a GPU index)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="inference engine on CPU (default: the fastest for this CPU, printed)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16", "int8"),
        help="auto: bf16 where the CPU has it natively; fp32 for exact fp32 results; "
        "int8 (OpenVINO): quantized once on the run's training images, used only if it agrees with fp32",
    )
    _add_tta_flag(p, "default: the run's stored setting")
    p.add_argument(
        "--no-reject",
        dest="reject",
        action="store_false",
        help='always name a class: ignore the run\'s "unknown" rule (see resfit train --reject-target)',
    )
    p.add_argument(
        "--performance-hint",
        default="LATENCY",
        choices=PERFORMANCE_HINTS,
        help="OpenVINO: LATENCY (one request on all cores, measured faster on 2 cores) or THROUGHPUT",
    )


def _say_stderr(message: str) -> None:
    print(f"resfit: {message}", file=sys.stderr, flush=True)


# Batch predict (this many images or more) and serve may run gated int8 where bf16 is emulated: its one-time
# quantization and check (minutes where NNCF's accuracy control runs) pay off there, not for a few images.
PREDICT_INT8_MIN_IMAGES = 32


def _load_classifier(args, int8_when_safe: bool = False):
    """The Classifier the flags ask for; which backend it runs on (and why) goes to stderr."""
    from .inference.classifier import Classifier, InferenceConfig

    config = InferenceConfig(
        args.device,
        args.precision,
        args.backend,
        args.performance_hint,
        tta=getattr(args, "tta", None),
        reject=getattr(args, "reject", True),
        int8_when_safe=int8_when_safe,
    )
    classifier = Classifier.load(args.run_dir, config=config, say=_say_stderr)
    _say_stderr(classifier.describe())
    return classifier


def _run_export(args) -> int:
    from .export import ExportConfig, export_run
    from .inference.classifier import expand_inputs

    config = ExportConfig(
        run_dir=args.run_dir,
        format=args.format,
        out=args.out,
        check_images=expand_inputs(args.check_images) if args.check_images else [],
        num_check_images=args.num_check_images,
        tta=args.tta,
    )
    result = export_run(config)
    print(f"wrote {result.path} in {result.seconds:.1f} s (top-1 agrees with PyTorch on every check image)")
    if result.format == "timm":
        print(f'load it with: timm.create_model("local-dir:{result.path.resolve()}", pretrained=True)')
    return 0


def _run_serve(args) -> int:
    from .serve import MB, ServeConfig, run_server

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {args.port}")
    config = ServeConfig(
        max_upload_bytes=int(args.max_upload_mb * MB), max_pixels=args.max_pixels, top_k=args.top_k
    )
    classifier = _load_classifier(args, int8_when_safe=True)
    print(f"resfit: serving on http://{args.host}:{args.port}/ (API docs at /docs)", file=sys.stderr)
    run_server(classifier, args.host, args.port, config)
    return 0


def _run_evaluate(args) -> int:
    from .evaluate import evaluate_split
    from .reports import format_metrics_table
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
    classifier = _load_classifier(args, int8_when_safe=len(paths) >= PREDICT_INT8_MIN_IMAGES)
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
    p.add_argument("--format", default="onnx", choices=("onnx", "openvino", "torchscript", "timm"))
    p.add_argument(
        "--out",
        help="output file, or folder for timm (default RUN_DIR/export/model.onnx|model.xml|model.pt|timm)",
    )
    p.add_argument(
        "--check-images",
        nargs="+",
        metavar="PATH",
        help="images or folders to check parity on (default: images from the run's validation data)",
    )
    p.add_argument("--num-check-images", type=int, default=8, help="how many validation images by default")
    _add_tta_flag(p, "default: the run's stored setting, baked into the exported graph")

    p = sub.add_parser(
        "ensemble",
        help="average several runs' probabilities into one run folder (evaluate/predict/export/serve it as one)",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="the ensemble's run folder")
    p.add_argument(
        "--weighting",
        choices=("equal", "val"),
        default="equal",
        help="equal weights, or weights that minimise the validation log-loss (never the test split)",
    )
    p.add_argument("--data", help="dataset whose val split scores it (default: the first run's data)")
    _add_tta_flag(p, "stored with the ensemble (default none)")

    p = sub.add_parser("serve", help="HTTP service with an upload page: POST /predict, GET /model, /docs")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) serves this machine only")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--top-k", type=int, default=5, help="classes returned when the request does not say")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body accepted")
    p.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="largest image accepted (decompression-bomb guard)"
    )
    _add_backend_flags(p)

    p = sub.add_parser("scan", help="check a dataset: classes, splits, unreadable and converted files")
    p.add_argument("data")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument("--report", metavar="FILE", help="also write the report (data_report.json) to FILE")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "shard",
        help="write a dataset as WebDataset tar shards (scanned, unreadable files left out) for `resfit train DIR`",
    )
    p.add_argument("data")
    p.add_argument("--out", required=True, metavar="DIR", help="an empty folder outside the dataset")
    p.add_argument("--shard-size", type=float, default=256.0, metavar="MB", help="cut a shard at this size")
    p.add_argument("--shard-samples", type=int, metavar="N", help="also cut a shard at N images")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held out where the data has no val split")
    p.add_argument("--seed", type=int, default=0, help="the seed of that held-out split")
    _add_exclude_flag(p)
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

"""The comparison written down: report.md (table + how every figure was measured), report.json, a plot."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..data.scan import DataReport
from ..data.splits import DatasetSource
from ..fileio import atomic_write, atomic_write_json, atomic_write_text
from ..hardware import detect_cpu
from ..inference.classifier import InferenceConfig
from ..run_folder import library_versions

if TYPE_CHECKING:
    from .command import CompareConfig, CompareRow

MIB = 2**20
DASH = "—"


def gmacs(row: CompareRow) -> float:
    """Multiply-adds per image in billions: FlopCounterMode's FLOPs / 2 (torchvision's "GFLOPS" unit)."""
    return row.flops / 2e9


def _percent(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.1f}%"


def _seconds(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def source_label(source: dict) -> str:
    """'resnet50-imagenette.pth (card 74.3%)': what the backbone started from and the card's own accuracy."""
    kind = source["kind"]
    if kind == "none":
        text = "none (from scratch)"
    elif kind == "imagenet":
        text = source["description"].split(" (")[0]
    else:
        text = source["card_file"] or Path(str(source["description"])).name
    if kind == "none":
        return text
    card = source["card_val_top1"]
    return f"{text} (card val top-1 {_percent(card)})" if card is not None else f"{text} (no card accuracy)"


def sources_label(row: CompareRow) -> str:
    if len(row.sources) == 1:
        return source_label(row.sources[0])
    return " + ".join(f"{s['architecture']}: {source_label(s)}" for s in row.sources)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def format_table(rows: list[CompareRow], tta_modes: tuple[str, ...]) -> str:
    """The markdown table: one row per model."""
    has_test = any(row.test for row in rows)
    throughput_batch = rows[0].throughput["batch_size"] if rows else 0
    header = ["model", "val top-1", "val macro F1", "val top-5"]
    header += [f"val top-1 TTA {mode}" for mode in tta_modes]
    header += ["test top-1", "test macro F1"] if has_test else []
    header += ["batch-1 ms"] + [f"batch-1 ms TTA {mode}" for mode in tta_modes]
    header += [f"img/s @ batch {throughput_batch}", "params (M)", "GMACs/img", "GFLOPs/img", "size (MiB)"]
    header += ["train time", "starting weights (card accuracy)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row.name, _percent(row.val["accuracy"]), f"{row.val['f1_macro']:.3f}"]
        cells.append(_percent(row.val["top5_accuracy"]))
        cells += [_percent(row.tta[mode]["val_accuracy"]) for mode in tta_modes]
        if has_test:
            test = row.test or {}
            cells += [_percent(test.get("accuracy")), f"{test['f1_macro']:.3f}" if test else DASH]
        cells.append(f"{row.latency['median_ms']:.1f}" + (" (torch)" if row.backend_fallback else ""))
        cells += [
            f"{row.tta[mode]['latency']['median_ms']:.1f}"
            + (" (torch)" if row.tta[mode]["backend_fallback"] else "")
            for mode in tta_modes
        ]
        cells.append(f"{row.throughput['images_per_s']:.1f}")
        cells += [f"{row.parameters / 1e6:.1f}", f"{gmacs(row):.2f}", f"{row.flops / 1e9:.2f}"]
        cells += [f"{row.file_bytes / MIB:.1f}", _seconds(row.train_seconds), sources_label(row)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _unique(values) -> str:
    return "; ".join(dict.fromkeys(str(v) for v in values))


def measurement(rows: list[CompareRow], config: CompareConfig, load_average: dict) -> dict:
    """How every figure was measured, as data: the same text feeds report.md and report.json."""
    first, cpu = rows[0], detect_cpu()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu.describe(),
            "physical_cores": cpu.physical_cores,
            "logical_cpus": cpu.logical_cpus,
            "platform": platform.platform(),
            "versions": library_versions(),
        },
        "backend": _unique(row.backend for row in rows),
        "backend_chosen_by": "the default of `resfit predict`, InferenceConfig()"
        if config.inference == InferenceConfig()
        else f"asked for: {config.inference}",
        "load_average_1min": load_average,
        "precision": _unique(row.precision for row in rows),
        "threads": _unique(row.threads for row in rows),
        "latency": {
            "batch_size": 1,
            "warmup_calls": first.latency["warmup"],
            "timed_calls": first.latency["repeats"],
            "statistic": "median",
            "what": "Classifier.logits on an already preprocessed float32 (1, 3, H, W) batch of a real "
            "validation image: model time only, no decoding or resizing; time.perf_counter per call",
        },
        "throughput": {
            "batch_size": first.throughput["batch_size"],
            "warmup_calls": first.throughput["warmup"],
            "timed_calls": first.throughput["repeats"],
            "statistic": "batch size / median seconds per call",
            "what": "Classifier.logits on a preprocessed float32 batch of real validation images "
            "(cycled when the split has fewer)",
        },
        "accuracy": "evaluate_split (the code of `resfit evaluate`) on the classifier's backend; top-1; "
        "top-5 only with 5 or more classes; macro F1 = unweighted mean of per-class F1",
        "tta": {
            mode: "Classifier.load(run, InferenceConfig(tta=...)): same backend" for mode in config.tta_modes
        },
        "parameters": "numel of every parameter of the torch module resfit.run_folder.load_model returns (no TTA)",
        "flops": "torch.utils.flop_counter.FlopCounterMode, one image at the row's eval crop, fp32 torch module: "
        "convolutions and matrix products at 2 FLOPs per multiply-add (BatchNorm, ReLU, pooling, additions "
        "not counted); GMACs = FLOPs / 2, the unit of torchvision's '4.09 GFLOPS' for ResNet-50 at 224 px",
        "file_size": "bytes on disk of the row's weight files (report.json lists them; an ensemble's hold every "
        "member's weights); MiB = 2^20 bytes",
        "train_time": "wall time of training: RunResult.seconds when trained by this compare, else the last "
        "'elapsed' of the run's history.csv; an ensemble: its members' times + its build time",
        "resolution": {row.name: row.crop_size for row in rows},
        "epochs": {row.name: row.epochs for row in rows},
    }


def format_markdown(
    table: str,
    rows: list[CompareRow],
    config: CompareConfig,
    how: dict,
    source: DatasetSource,
    report: DataReport,
) -> str:
    val_images = rows[0].val["num_images"]
    lines = [
        "# resfit compare",
        "",
        f"Data: `{config.data}` ({report.summary_line(report_file=None)}). Validation split: {val_images} images, so one "
        f"image is {100 / val_images:.2f} points of accuracy."
        + (f" Test split: {rows[0].test['num_images']} images." if rows[0].test else ""),
        "",
        table,
        "",
        "## Starting weights",
        "",
        "Each row's backbones and the source they started from, with the source's own accuracy from its card "
        "(on the source's data, not this one). Rows that started from different sources differ by more than "
        "depth.",
        "",
    ]
    for row in rows:
        lines.append(f"- **{row.name}** ({row.kind}, `{row.run_dir}`, {row.origin}):")
        for s in row.sources:
            card = (
                f"card `{s['card_file']}` val top-1 {_percent(s['card_val_top1'])}, sha256 {str(s['card_sha256'])[:12]}"
                if s["card_val_top1"] is not None
                else "no card accuracy"
            )
            lines.append(f"  - {s['architecture']}: {s['kind']}, {s['description']}; {card}")
    latency, throughput, load = how["latency"], how["throughput"], how["load_average_1min"]
    fallbacks = [(row.name, "no TTA", row.backend_fallback) for row in rows if row.backend_fallback] + [
        (row.name, f"TTA {mode}", row.tta[mode]["backend_fallback"])
        for row in rows
        for mode in config.tta_modes
        if row.tta[mode]["backend_fallback"]
    ]
    fallback_lines = [
        f"- Not on the default backend (marked '(torch)' in the table): {name}, {what}: {reason}."
        for name, what, reason in fallbacks
    ]
    tta_lines = [
        f"  - {mode}: val top-1 and batch-1 latency (same protocol as below) with `tta={mode!r}`; "
        + ", ".join(f"{row.name} at {row.tta[mode]['crop_size']} px input" for row in rows)
        for mode in config.tta_modes
    ]
    lines += [
        "",
        "## How measured",
        "",
        f"- Date: {how['date']}; one process, rows measured one after another.",
        f"- Machine: {how['machine']['cpu']}; {how['machine']['platform']}.",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in how['machine']['versions'].items())}.",
        f"- Inference backend ({how['backend_chosen_by']}): {how['backend']}.",
        f"- Precision: {how['precision']}; threads: {how['threads']}.",
        f"- Machine load (1-minute load average; {how['machine']['logical_cpus']} logical CPUs): "
        f"{load['before']:.2f} before the measurements, {load['after']:.2f} after; above the CPU count, "
        "other processes shared the CPU and the timings are slower and noisier than on an idle machine "
        "(report.json has each timing's min and max).",
        *fallback_lines,
        f"- Accuracy: {how['accuracy']}. No TTA in the plain columns.",
        "- TTA columns:",
        *tta_lines,
        f"- Batch-1 latency: median of {latency['timed_calls']} timed calls after {latency['warmup_calls']} "
        f"warm-up calls; {latency['what']}.",
        f"- Throughput: batch {throughput['batch_size']}, median of {throughput['timed_calls']} timed calls "
        f"after {throughput['warmup_calls']} warm-up calls; images/s = {throughput['statistic']}; "
        f"{throughput['what']}.",
        f"- Parameters: {how['parameters']}.",
        f"- GMACs / GFLOPs per image: {how['flops']}.",
        f"- Size: {how['file_size']}.",
        f"- Training time: {how['train_time']}. Per row: "
        + "; ".join(f"{row.name}: {row.train_seconds_how}" for row in rows)
        + ".",
        "- Resolution (eval crop, px): " + ", ".join(f"{n} {v}" for n, v in how["resolution"].items()) + ".",
        "- Fine-tuning epochs: "
        + ", ".join(f"{n} {DASH if v is None else v}" for n, v in how["epochs"].items())
        + ".",
        "",
        "![accuracy vs latency](accuracy_vs_latency.png)",
        "",
    ]
    return "\n".join(lines)


def plot_accuracy_vs_latency(rows: list[CompareRow], path: Path, subtitle: str) -> None:
    """Validation top-1 against batch-1 latency, one labelled point per row."""
    figure = Figure(figsize=(7.0, 4.8), layout="constrained")
    axes = figure.add_subplot(1, 1, 1)
    for row in rows:
        x, y = row.latency["median_ms"], 100 * row.val["accuracy"]
        axes.scatter([x], [y], s=40, zorder=3)
        axes.annotate(row.name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    axes.set_xlabel("batch-1 latency, median ms (model only)")
    axes.set_ylabel("validation top-1 (%)")
    axes.set_title("accuracy vs latency", fontsize=11)
    axes.grid(True, alpha=0.3)
    axes.margins(x=0.2, y=0.15)
    axes.set_xlim(left=0)
    bottom, top = axes.get_ylim()
    axes.set_ylim(max(0.0, bottom), min(101.0, top))
    figure.suptitle(subtitle, fontsize=7)
    FigureCanvasAgg(figure)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def write_reports(
    out: Path,
    rows: list[CompareRow],
    config: CompareConfig,
    source: DatasetSource,
    report: DataReport,
    load_average: dict,
) -> tuple[str, Path, Path, Path]:
    """report.md, report.json and accuracy_vs_latency.png in ``out``; returns the table and the three paths."""
    out = Path(out)
    table = format_table(rows, config.tta_modes)
    how = measurement(rows, config, load_average)
    report_md, report_json, plot = out / "report.md", out / "report.json", out / "accuracy_vs_latency.png"
    atomic_write_text(report_md, format_markdown(table, rows, config, how, source, report))
    atomic_write_json(
        report_json,
        {
            "data": str(config.data),
            "class_names": list(source.class_names),
            "how_measured": how,
            "rows": [
                row.to_dict() | {"gmacs": round(gmacs(row), 4), "gflops": round(row.flops / 1e9, 4)}
                for row in rows
            ],
        },
    )
    backends = _unique(row.backend.split(":")[0] for row in rows)
    subtitle = f"{backends}, {how['threads']} threads; val split of {config.data}"
    plot_accuracy_vs_latency(rows, plot, subtitle)
    return table, report_md, report_json, plot

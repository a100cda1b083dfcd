"""The pictures of a run: confusion matrix, training curves and the most confident mistakes.

Plots are drawn on a private ``Figure`` rendered by the Agg canvas, never through pyplot's global state,
so they are safe to make from any thread or process and leave nothing open behind them.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from .fileio import atomic_write

# Above this many classes, counts written in the cells would overlap and become unreadable.
_MAX_CLASSES_WITH_CELL_TEXT = 30
_PLOT_DPI = 110


def _save_png(figure: Figure, path: str | os.PathLike) -> None:
    """Render with Agg and write atomically, so a killed run never leaves a truncated PNG."""
    FigureCanvasAgg(figure)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=_PLOT_DPI, bbox_inches="tight"))


def _save_message_png(message: str, path: str | os.PathLike) -> None:
    """A small picture that says why there is nothing to plot, so the run folder is never missing a file."""
    figure = Figure(figsize=(4, 1.5))
    axes = figure.add_subplot()
    axes.axis("off")
    axes.text(0.5, 0.5, message, ha="center", va="center", fontsize=12)
    _save_png(figure, path)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike
) -> None:
    """Colours show each true class's share, so rare classes stand out like common ones; cells show counts."""
    counts = np.asarray(matrix, dtype=np.int64)
    num_classes = len(class_names)
    if counts.shape != (num_classes, num_classes):
        raise ValueError(
            f"confusion matrix has shape {counts.shape}, expected ({num_classes}, {num_classes})"
        )
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)

    side = min(max(4.0, 0.45 * num_classes + 2.5), 24.0)
    figure = Figure(figsize=(side + 1.0, side))
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true class")

    label_size = 9 if num_classes <= 30 else max(3, int(9 * 30 / num_classes))
    ticks = np.arange(num_classes)
    long_names = num_classes > 8 or max((len(str(name)) for name in class_names), default=0) > 4
    axes.set_xticks(ticks, [str(name) for name in class_names], fontsize=label_size)
    axes.set_yticks(ticks, [str(name) for name in class_names], fontsize=label_size)
    if long_names:
        for tick_label in axes.get_xticklabels():
            tick_label.set_rotation(45)
            tick_label.set_horizontalalignment("right")
            tick_label.set_rotation_mode("anchor")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")

    if num_classes <= _MAX_CLASSES_WITH_CELL_TEXT:
        cell_size = 10 if num_classes <= 10 else 7
        for row in range(num_classes):
            for column in range(num_classes):
                colour = "white" if shares[row, column] > 0.5 else "black"
                axes.text(
                    column,
                    row,
                    str(counts[row, column]),
                    ha="center",
                    va="center",
                    color=colour,
                    fontsize=cell_size,
                )

    total = int(counts.sum())
    accuracy = np.trace(counts) / total if total else float("nan")
    axes.set_title(f"Confusion matrix: accuracy {accuracy:.3f} on {total} images")
    _save_png(figure, path)


def _as_float(value: Any, key: str) -> float:
    """None and missing values become NaN, so a stage without a metric simply leaves a gap."""
    if value is None:
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"history value for {key!r} is not a number: {value!r}") from error


def _epoch_positions(history: Sequence[dict]) -> tuple[np.ndarray, str]:
    """Epochs as an x axis; if a stage restarts its count, fall back to the overall epoch number."""
    epochs = [_as_float(row.get("epoch"), "epoch") for row in history]
    if all(math.isfinite(e) for e in epochs) and all(
        b > a for a, b in zip(epochs[:-1], epochs[1:], strict=True)
    ):
        return np.asarray(epochs), "epoch"
    return np.arange(1, len(history) + 1, dtype=float), "epoch (overall)"


def _stage_spans(stages: list[str], positions: np.ndarray) -> list[tuple[str, float, float]]:
    """Runs of consecutive rows with the same stage, as (stage, first x, last x)."""
    spans: list[tuple[str, float, float]] = []
    for stage, x in zip(stages, positions, strict=True):
        if spans and spans[-1][0] == stage:
            spans[-1] = (stage, spans[-1][1], float(x))
        else:
            spans.append((stage, float(x), float(x)))
    return spans


def _plot_series(axes: Axes, positions: np.ndarray, values: np.ndarray, label: str) -> bool:
    """Plot only the finite points; return whether anything was drawn."""
    finite = np.isfinite(values)
    if not finite.any():
        return False
    axes.plot(positions[finite], values[finite], marker="o", markersize=3, label=label)
    return True


def _mark_stages(axes: Axes, spans: list[tuple[str, float, float]]) -> None:
    """Shade every other stage and draw a dashed line where a new one starts."""
    for span_index, (_, start, end) in enumerate(spans):
        if span_index % 2 == 1:
            axes.axvspan(start - 0.5, end + 0.5, color="0.9", zorder=0)
        if span_index > 0:
            axes.axvline(start - 0.5, color="0.5", linestyle="--", linewidth=0.8)


def _describe_span(span: tuple[str, float, float]) -> str:
    """'head: epochs 1–3', for the figure title that names what each shaded band is."""
    stage, start, end = span
    epochs = f"epoch {start:g}" if start == end else f"epochs {start:g}–{end:g}"
    return f"{stage or '?'}: {epochs}"


def _all_positive(values: np.ndarray) -> bool:
    """Whether a log axis can show every finite value."""
    finite = values[np.isfinite(values)]
    return finite.size > 0 and bool(np.all(finite > 0))


def plot_training_curves(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Loss, accuracy and learning rate per epoch, with each training stage shaded, to spot over-fitting."""
    if not history:
        _save_message_png("no training history", path)
        return
    positions, x_label = _epoch_positions(history)
    stages = [str(row.get("stage") or "") for row in history]

    def column(key: str) -> np.ndarray:
        return np.asarray([_as_float(row.get(key), key) for row in history])

    panels = [
        ("loss", [("train", column("train_loss")), ("val", column("val_loss"))]),
        ("accuracy", [("train", column("train_acc")), ("val", column("val_acc"))]),
        ("learning rate", [("lr", column("lr"))]),
    ]
    figure = Figure(figsize=(5.0 * len(panels), 4.0), layout="constrained")
    spans = _stage_spans(stages, positions)
    for index, (title, series) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        drawn = [_plot_series(axes, positions, values, label) for label, values in series]
        _mark_stages(axes, spans)
        if not any(drawn):
            axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", va="center", color="0.4")
        elif len(series) > 1:
            axes.legend(fontsize=8, loc="best")
        if title == "learning rate" and _all_positive(series[0][1]):
            axes.set_yscale("log")  # schedules span decades; a linear axis flattens everything after warm-up
        axes.set_xlim(positions.min() - 0.5, positions.max() + 0.5)
        if len(positions) <= 15:
            axes.set_xticks(positions)  # a short run reads best with a tick on every epoch
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(title)
        axes.set_xlabel(x_label)
    if any(stage for stage, _, _ in spans):
        figure.suptitle("   ".join(_describe_span(span) for span in spans), fontsize=10)
    _save_png(figure, path)


def _thumbnail(read_image: Callable[[str], Image.Image], image_path: str) -> np.ndarray:
    """A small RGB copy, so a grid of large photos does not hold all their pixels in memory."""
    image = read_image(image_path).convert("RGB")
    image.thumbnail((256, 256))
    return np.asarray(image)


def plot_misclassified(
    examples: Sequence[dict],
    read_image: Callable[[str], Image.Image],
    path: str | os.PathLike,
    limit: int = 16,
) -> None:
    """A grid of the most confident mistakes; an unreadable image becomes a tile with its error."""
    shown = list(examples)[: max(limit, 0)]
    if not shown:
        _save_message_png("no misclassified images", path)
        return
    columns = min(4, len(shown))
    rows = math.ceil(len(shown) / columns)
    figure = Figure(figsize=(2.8 * columns, 3.1 * rows), layout="constrained")
    for index, example in enumerate(shown):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.set_xticks([])
        axes.set_yticks([])
        try:
            axes.imshow(_thumbnail(read_image, example["path"]))
        except Exception as error:  # any reader failure is shown in its tile; the grid is still useful
            message = textwrap.fill(f"{type(error).__name__}: {error}", width=28)
            axes.set_facecolor("0.92")
            axes.text(0.5, 0.5, message, ha="center", va="center", fontsize=7, color="darkred", wrap=True)
        caption = f"{example['true']} → {example['predicted']} ({float(example['confidence']):.2f})"
        axes.set_title(textwrap.shorten(caption, width=40, placeholder="…"), fontsize=8)
        axes.set_xlabel(
            textwrap.shorten(os.path.basename(str(example["path"])), 36, placeholder="…"), fontsize=6
        )
    figure.suptitle(f"Most confident mistakes ({len(shown)} of {len(examples)})")
    _save_png(figure, path)

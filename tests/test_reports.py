"""Metrics a user compares runs by, and the pictures in a run folder, checked against hand-worked cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from resfit.metrics import classification_metrics, format_metrics_table, misclassified_examples
from resfit.plots import (
    plot_confusion_matrix,
    plot_misclassified,
    plot_training_curves,
)

CLASSES3 = ["cat", "dog", "bird"]


def one_hot_probs(predicted: list[int], num_classes: int, confidence: float = 0.8) -> np.ndarray:
    """Softmax-like rows that put `confidence` on the predicted class and share the rest."""
    rest = (1.0 - confidence) / (num_classes - 1)
    probs = np.full((len(predicted), num_classes), rest)
    probs[np.arange(len(predicted)), predicted] = confidence
    return probs


def assert_png(path, min_side: int = 100) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_side and image.height >= min_side // 2
    assert not list(path.parent.glob(".*.tmp")), "temporary file left behind"


# --- classification_metrics -------------------------------------------------------------------


def test_perfect_predictions_give_accuracy_one_and_diagonal_matrix():
    labels = [0, 1, 2, 2, 1, 0]
    metrics = classification_metrics(labels, one_hot_probs(labels, 3), CLASSES3, "val")
    assert metrics["accuracy"] == 1.0
    assert metrics["f1_macro"] == 1.0 and metrics["f1_weighted"] == 1.0
    assert metrics["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert metrics["split"] == "val" and metrics["num_images"] == 6 and metrics["num_classes"] == 3
    assert metrics["class_names"] == CLASSES3
    assert metrics["loss"] == pytest.approx(-math.log(0.8), abs=1e-6)


def test_hand_computed_three_class_case():
    labels = [0, 0, 1, 1, 2, 2]
    predicted = [0, 1, 1, 1, 2, 0]
    metrics = classification_metrics(labels, one_hot_probs(predicted, 3), CLASSES3, "test")
    # Rows are the true class, columns the prediction.
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    cat, dog, bird = (metrics["per_class"][name] for name in CLASSES3)
    # cat: predicted twice, right once; dog: predicted 3 times, right twice; bird: predicted once, right.
    assert (cat["precision"], cat["recall"], cat["support"]) == (0.5, 0.5, 2)
    assert dog["precision"] == pytest.approx(2 / 3, abs=1e-6) and dog["recall"] == 1.0
    assert (bird["precision"], bird["recall"]) == (1.0, 0.5)
    assert cat["f1"] == 0.5
    assert dog["f1"] == pytest.approx(0.8, abs=1e-6)
    assert bird["f1"] == pytest.approx(2 / 3, abs=1e-6)
    assert metrics["precision_macro"] == pytest.approx((0.5 + 2 / 3 + 1) / 3, abs=1e-6)
    assert metrics["recall_macro"] == pytest.approx((0.5 + 1 + 0.5) / 3, abs=1e-6)
    assert metrics["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3, abs=1e-6)
    assert metrics["f1_weighted"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3, abs=1e-6)  # equal supports
    assert list(metrics["per_class"]) == CLASSES3
    assert "top5_accuracy" not in metrics


def test_metrics_are_plain_json_types():
    labels = [0, 1, 2, 0]
    metrics = classification_metrics(np.array(labels), one_hot_probs([0, 2, 2, 1], 3), CLASSES3, "val")
    assert json.loads(json.dumps(metrics)) == metrics
    assert type(metrics["accuracy"]) is float
    assert type(metrics["confusion_matrix"][0][0]) is int
    assert type(metrics["per_class"]["cat"]["support"]) is int


def test_top5_present_and_counted_for_five_or_more_classes():
    names = [f"c{i}" for i in range(6)]
    # Class 0 is ranked 1st, 5th and 6th (last) for three images of true class 0.
    probs = np.array(
        [
            [0.50, 0.10, 0.10, 0.10, 0.10, 0.10],
            [0.05, 0.30, 0.25, 0.20, 0.15, 0.05],
            [0.01, 0.30, 0.25, 0.20, 0.15, 0.09],
        ]
    )
    metrics = classification_metrics([0, 0, 0], probs, names, "val")
    assert metrics["accuracy"] == pytest.approx(1 / 3, abs=1e-6)
    # Row 2 ties class 0 and class 5 at 0.05 for 5th place; the lower index wins, as argmax does.
    assert metrics["top5_accuracy"] == pytest.approx(2 / 3, abs=1e-6)


def test_top5_absent_below_five_classes():
    names = ["a", "b", "c", "d"]
    metrics = classification_metrics([0, 1, 2, 3], one_hot_probs([0, 1, 2, 3], 4), names, "val")
    assert "top5_accuracy" not in metrics


def test_class_absent_from_labels_still_reported():
    labels = [0, 0, 1, 1]
    metrics = classification_metrics(labels, one_hot_probs(labels, 3), CLASSES3, "val")
    assert metrics["per_class"]["bird"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics["confusion_matrix"][2] == [0, 0, 0]
    assert len(metrics["confusion_matrix"]) == 3
    # A class with nothing to score does not drag the macro average down.
    assert metrics["f1_macro"] == 1.0


def test_confident_wrong_prediction_gives_large_finite_loss():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    metrics = classification_metrics([1, 1], probs, ["a", "b"], "val")
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 10


@pytest.mark.parametrize(
    ("labels", "probs", "match"),
    [
        ([0, 1], np.full((3, 3), 1 / 3), "3 rows but there are 2 labels"),
        ([0, 1], np.full((2, 2), 0.5), "2 columns but there are 3 class names"),
        ([], np.zeros((0, 3)), "empty"),
        ([0, 3], np.full((2, 3), 1 / 3), "label 3 is out of range"),
        ([0, -1], np.full((2, 3), 1 / 3), "label -1 is out of range"),
        ([0, 1], np.full(3, 1 / 3), "2-D"),
        ([[0], [1]], np.full((2, 3), 1 / 3), "1-D"),
        ([0, 1], np.array([[2.0, 1.0, 0.5], [0.1, 3.0, 0.2]]), "logits"),
        ([0.5, 1], np.full((2, 3), 1 / 3), "integer"),
    ],
)
def test_bad_inputs_raise_clear_value_error(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(labels, probs, CLASSES3, "val")


# --- misclassified_examples -------------------------------------------------------------------


def test_misclassified_most_confident_first():
    labels = [0, 1, 2, 0, 1]
    probs = np.array(
        [
            [0.6, 0.3, 0.1],  # right
            [0.7, 0.2, 0.1],  # wrong, 0.7
            [0.05, 0.9, 0.05],  # wrong, 0.9
            [0.2, 0.2, 0.6],  # wrong, 0.6
            [0.1, 0.8, 0.1],  # right
        ]
    )
    items = [f"img{i}.jpg" for i in range(5)]
    examples = misclassified_examples(labels, probs, items, CLASSES3)
    assert [e["path"] for e in examples] == ["img2.jpg", "img1.jpg", "img3.jpg"]
    assert examples[0] == {
        "path": "img2.jpg",
        "true": "bird",
        "predicted": "dog",
        "confidence": 0.9,
        "true_probability": 0.05,
    }
    assert [e["path"] for e in misclassified_examples(labels, probs, items, CLASSES3, limit=2)] == [
        "img2.jpg",
        "img1.jpg",
    ]


def test_misclassified_rejects_wrong_number_of_items():
    with pytest.raises(ValueError, match="2 items but 3 labels"):
        misclassified_examples([0, 1, 2], one_hot_probs([0, 1, 2], 3), ["a", "b"], CLASSES3)


# --- plots ------------------------------------------------------------------------------------


def test_confusion_matrix_png(tmp_path):
    path = tmp_path / "plots" / "confusion.png"
    plot_confusion_matrix([[5, 1, 0], [0, 3, 2], [0, 0, 0]], ["cat", "dog", "a rather long bird name"], path)
    assert_png(path)


def test_confusion_matrix_png_many_classes(tmp_path):
    names = [f"class_{i:02d}" for i in range(40)]
    matrix = (np.eye(40, dtype=int) * 7 + 1).tolist()
    plot_confusion_matrix(matrix, names, tmp_path / "confusion.png")
    assert_png(tmp_path / "confusion.png", min_side=500)


def test_confusion_matrix_shape_mismatch_raises(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        plot_confusion_matrix([[1, 0], [0, 1]], CLASSES3, tmp_path / "confusion.png")


def history_row(epoch, stage, **values):
    row = {"epoch": epoch, "stage": stage, "lr": 1e-3, "seconds": 1.0}
    row.update({"train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.1, "val_acc": 0.45})
    row.update(values)
    return row


def test_training_curves_png_two_stages_with_gaps(tmp_path):
    history = [
        history_row(1, "head", train_acc=None, lr=1e-2),
        history_row(2, "head", train_acc=float("nan"), lr=1e-2),
        history_row(3, "finetune", train_loss=0.7, lr=1e-4),
        history_row(4, "finetune", val_loss=float("nan"), lr=5e-5),
    ]
    plot_training_curves(history, tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png", min_side=300)


def test_training_curves_png_single_row(tmp_path):
    plot_training_curves([history_row(1, "head")], tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png", min_side=300)


def test_training_curves_png_when_epochs_restart_per_stage(tmp_path):
    history = [history_row(1, "head"), history_row(2, "head"), history_row(1, "finetune")]
    plot_training_curves(history, tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png", min_side=300)


def test_training_curves_png_empty_history(tmp_path):
    plot_training_curves([], tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")


def test_misclassified_grid_png_with_unreadable_image(tmp_path):
    def read_image(path: str) -> Image.Image:
        if path.endswith("broken.jpg"):
            raise OSError("cannot identify image file")
        return Image.new("RGB", (640, 480), (200, 30, 30))

    examples = [
        {
            "path": f"{name}.jpg",
            "true": "cat",
            "predicted": "dog",
            "confidence": 0.9,
            "true_probability": 0.05,
        }
        for name in ["a", "broken", "c", "d", "e"]
    ]
    plot_misclassified(examples, read_image, tmp_path / "mistakes.png")
    assert_png(tmp_path / "mistakes.png", min_side=300)


def test_misclassified_grid_png_when_nothing_is_wrong(tmp_path):
    def read_image(path: str) -> Image.Image:
        raise AssertionError("no image should be read")

    plot_misclassified([], read_image, tmp_path / "mistakes.png")
    assert_png(tmp_path / "mistakes.png")


# --- format_metrics_table ---------------------------------------------------------------------


def test_metrics_table_lists_every_class_and_summary():
    names = ["airplane", "car", "bird", "cat", "deer"]
    labels = [0, 1, 2, 3, 4, 0]
    metrics = classification_metrics(labels, one_hot_probs([0, 1, 2, 3, 4, 1], 5), names, "val")
    table = format_metrics_table(metrics)
    lines = table.splitlines()
    assert "val" in lines[0] and "6" in lines[0]
    for name in names:
        assert any(line.startswith(name) for line in lines)
    macro = next(line for line in lines if line.startswith("macro avg"))
    assert f"{metrics['f1_macro']:.3f}" in macro
    accuracy = next(line for line in lines if line.startswith("accuracy"))
    assert "0.833" in accuracy
    assert any(line.startswith("top-5 accuracy") for line in lines)
    class_lines = [line for line in lines if line.split() and line.split()[0] in names]
    assert len({len(line) for line in class_lines}) == 1, "columns must line up"


def test_metrics_table_without_top5():
    metrics = classification_metrics([0, 1], one_hot_probs([0, 1], 3), CLASSES3, "test")
    assert "top-5" not in format_metrics_table(metrics)

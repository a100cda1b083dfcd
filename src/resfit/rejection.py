"""An "unknown" answer: a confidence score per photo and a threshold below which the model does not answer.

A classifier trained on ants and bees still names one of them for a photo of a tulip. The rule here is
chosen on validation photos after calibration. The score is, by default, how close the photo's pooled
backbone features come to the training photos' ("knn": minus the distance to the k-th nearest of a bank of
L2-normalised training features, Sun et al. 2022), or the calibrated top-1 probability ("msp"), or the
log-sum-exp of the logits ("energy", Liu et al. 2020). benchmarks/ood.py measured them on real
out-of-distribution photos: the logit scores barely separate them (a 2-class softmax is confident about a
tulip), the feature distance does (README, "Unknown"). The threshold is set for a target coverage (the share
of validation photos still answered) or a target precision (the accuracy on those answered). The rule is in
model.json ("reject"), the bank in reject_bank.safetensors; the engines output the features beside the
logits (``model_wrappers.WithFeatures``), so every engine and the service answer alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import ConfigError

if TYPE_CHECKING:  # run_folder reads rules through this module: the folder is handed in, not imported
    from .run_folder import RunFolder

SCORES = ("knn", "msp", "energy")
FEATURE_SCORES = ("knn",)  # need the backbone's pooled features and the bank of training features
DEFAULT_SCORE = "knn"
KNN_K = 5
MAX_BANK_IMAGES = 2000  # training photos in the bank at most (a seeded sample): bounds time and file size
DEFAULT_TARGET = "coverage:0.95"
TARGET_KINDS = ("coverage", "precision")
UNKNOWN = "unknown"
# Fewer held-out photos than this cannot place a 5% quantile: the rule is left out and the reason said.
MIN_REJECTION_IMAGES = 20


def confidence_scores(
    logits: np.ndarray,
    score: str,
    features: np.ndarray | None = None,
    bank: np.ndarray | None = None,
    k: int = KNN_K,
) -> np.ndarray:
    """Higher means more like the training photos: minus the k-th nearest bank distance of the (normalised)
    features, the top-1 softmax probability, or logsumexp(logits)."""
    if score == "knn":
        if features is None or bank is None or len(bank) == 0:
            raise ConfigError("the knn score needs the photos' features and the bank of training features")
        if np.shape(features)[1] != np.shape(bank)[1]:
            from .errors import RunFolderError

            raise RunFolderError(
                f"the feature bank holds {np.shape(bank)[1]}-wide features but the model gives "
                f"{np.shape(features)[1]}: the bank is from another model"
            )
        query = torch.from_numpy(np.asarray(features, dtype=np.float32))
        distances = torch.cdist(query, torch.from_numpy(np.asarray(bank, dtype=np.float32)))
        kth = min(k, distances.shape[1])
        return (-distances.topk(kth, dim=1, largest=False).values[:, kth - 1]).double().numpy()
    logits = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    if score == "msp":
        return torch.softmax(logits, dim=1).max(dim=1).values.numpy()
    if score == "energy":
        return torch.logsumexp(logits, dim=1).numpy()
    raise ConfigError(f"rejection score must be one of {SCORES}, got {score!r}")


def split_output(output: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, features or None) of an engine's output: WithFeatures' columns after the classes."""
    output = np.asarray(output)
    if output.shape[1] == num_classes:
        return output, None
    return output[:, :num_classes], output[:, num_classes:]


def needs_features(rule: dict | None) -> bool:
    return bool(rule) and rule.get("score") in FEATURE_SCORES


def parse_target(text: str) -> tuple[str, float] | None:
    """'coverage:0.95' or 'precision:0.99' -> (kind, value); 'none' -> None (no rule stored)."""
    if text.strip().lower() == "none":
        return None
    kind, _, value = text.partition(":")
    kind = kind.strip().lower()
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if kind not in TARGET_KINDS or not 0 < number <= 1:
        raise ConfigError(
            f"reject-target must be coverage:X or precision:X with 0 < X <= 1, or none; got {text!r}"
        )
    return kind, number


@dataclass(frozen=True)
class RejectRule:
    """Answer "unknown" when the score is below the threshold. The figures are the validation split's."""

    score: str
    threshold: float
    target: str
    coverage: float  # share of validation photos answered
    accuracy_answered: float  # accuracy on those
    accuracy_all: float
    fitted_on: str = "val"
    images: int = 0
    k: int = KNN_K
    bank: np.ndarray | None = field(default=None, repr=False, compare=False)  # knn: reject_bank.safetensors

    def accepts(
        self, logits: np.ndarray, features: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(answered?, score) per row of logits (and features, for the knn score)."""
        scores = confidence_scores(logits, self.score, features, self.bank, self.k)
        return scores >= self.threshold, scores

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "bank"}

    @classmethod
    def from_dict(cls, data: dict, bank: np.ndarray | None = None) -> RejectRule:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "bank"}, bank=bank)

    def describe(self) -> str:
        return (
            f'"{UNKNOWN}" below {self.score} {self.threshold:.4g} ({self.target}: on {self.images} {self.fitted_on} '
            f"photos it answers {self.coverage:.1%}, {self.accuracy_answered:.1%} of them right, "
            f"against {self.accuracy_all:.1%} answering all)"
        )


def why_no_rule(labels: np.ndarray) -> str | None:
    if len(labels) < MIN_REJECTION_IMAGES:
        return f"only {len(labels)} validation images (at least {MIN_REJECTION_IMAGES} are needed)"
    return None


def fit_rule(
    logits: np.ndarray,
    labels: np.ndarray,
    target: str,
    score: str = DEFAULT_SCORE,
    features: np.ndarray | None = None,
    bank: np.ndarray | None = None,
) -> RejectRule:
    """The threshold meeting ``target`` on these held-out (calibrated) logits.

    coverage:X keeps the X most confident share of the photos (the threshold is the score of the last one
    kept); precision:X keeps the largest most-confident share whose accuracy is at least X (all photos
    rejected when no share reaches it: the threshold is then above every score seen).
    """
    parsed = parse_target(target)
    if parsed is None:
        raise ConfigError("fit_rule needs a target; 'none' means no rule")
    kind, value = parsed
    scores = confidence_scores(logits, score, features, bank)
    correct = np.asarray(logits).argmax(1) == np.asarray(labels)
    if len(scores) == 0:
        raise ConfigError("no held-out predictions to choose a rejection threshold on")
    order = np.argsort(-scores, kind="stable")
    ranked_scores, ranked_correct = scores[order], correct[order]
    if kind == "coverage":
        keep = max(1, math.ceil(value * len(scores) - 1e-9))
    else:
        running = np.cumsum(ranked_correct) / np.arange(1, len(scores) + 1)
        reaching = np.flatnonzero(running >= value - 1e-12)
        keep = int(reaching[-1]) + 1 if len(reaching) else 0
    threshold = float(ranked_scores[keep - 1]) if keep else float(np.nextafter(ranked_scores[0], np.inf))
    answered = scores >= threshold
    return RejectRule(
        score=score,
        threshold=threshold,
        target=f"{kind}:{value:g}",
        coverage=float(answered.mean()),
        accuracy_answered=float(correct[answered].mean()) if answered.any() else float("nan"),
        accuracy_all=float(correct.mean()),
        images=len(scores),
        bank=bank,
    )


def answered_metrics(
    logits: np.ndarray, labels: np.ndarray, rule: RejectRule, features: np.ndarray | None = None
) -> dict:
    """What the stored rule does on a labelled split: share answered, accuracy on them and on all, AURC."""
    answered, scores = rule.accepts(logits, features)
    correct = np.asarray(logits).argmax(1) == np.asarray(labels)
    return {
        "rule": rule.to_dict(),
        "coverage": float(answered.mean()) if len(correct) else float("nan"),
        "accuracy_answered": float(correct[answered].mean()) if answered.any() else float("nan"),
        "accuracy_all": float(correct.mean()) if len(correct) else float("nan"),
        "aurc": risk_coverage(scores, correct)["aurc"] if len(correct) else float("nan"),
    }


def risk_coverage(scores: np.ndarray, correct: np.ndarray) -> dict:
    """The selective-classification curve: answering the k most confident photos, k = 1..n.

    Returns coverage and risk (error rate on those answered) at every k, and the area under the curve
    (AURC: lower is better; a perfect ranking of mistakes last gives the smallest area for that accuracy).
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    wrong = ~np.asarray(correct, dtype=bool)[order]
    counts = np.arange(1, len(order) + 1)
    risk = np.cumsum(wrong) / counts
    coverage = counts / len(order)
    return {"coverage": coverage.tolist(), "risk": risk.tolist(), "aurc": float(risk.mean())}


def coverage_table(
    scores: np.ndarray, correct: np.ndarray, coverages=(1.0, 0.95, 0.9, 0.8, 0.7, 0.5)
) -> list:
    """Accuracy on the answered photos at a few coverages: the numbers beside the risk-coverage plot."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    ranked = np.asarray(correct, dtype=bool)[order]
    rows = []
    for share in coverages:
        keep = max(1, math.ceil(share * len(ranked) - 1e-9))
        rows.append({"coverage": share, "answered": keep, "accuracy": float(ranked[:keep].mean())})
    return rows


def plot_risk_coverage(curves: dict[str, dict], rule: RejectRule | None, path: Path) -> None:
    """Risk (error on answered photos) against coverage per score; the chosen operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import atomic_write

    figure, axis = plt.subplots(figsize=(5.2, 4.2), dpi=110)
    for name, curve in curves.items():
        axis.plot(curve["coverage"], curve["risk"], label=f"{name} (AURC {curve['aurc']:.3f})")
    if rule is not None:
        axis.scatter(
            [rule.coverage],
            [1 - rule.accuracy_answered],
            color="black",
            zorder=3,
            label=f"chosen: {rule.target}",
        )
    axis.set(
        xlim=(0, 1), ylim=(0, None), xlabel="coverage (share of photos answered)", ylabel="error on answered"
    )
    axis.set_title("risk-coverage on the validation split")
    axis.legend(loc="upper left")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def choose_and_store_rule(
    folder: RunFolder,
    logits: np.ndarray,
    labels: np.ndarray,
    target: str,
    score: str,
    say,
    features: np.ndarray | None = None,
    bank: np.ndarray | None = None,
) -> dict:
    """The "unknown" rule for ``target`` on calibrated held-out logits, stored in model.json (its bank, for
    knn, in reject_bank.safetensors); risk_coverage.png; returns the rule and its risk-coverage figures."""
    meta = {k: v for k, v in folder.read_meta().items() if k != "reject"}
    reason = "--reject-target none" if parse_target(target) is None else why_no_rule(labels)
    correct = np.asarray(logits).argmax(1) == np.asarray(labels)
    curves = {
        name: risk_coverage(confidence_scores(logits, name, features, bank), correct)
        for name in SCORES
        if features is not None or name not in FEATURE_SCORES
    }
    rule = None if reason else fit_rule(logits, labels, target, score, features, bank)
    folder.remove_bank()
    if rule is not None and bank is not None and score in FEATURE_SCORES:
        folder.write_bank(bank)
    folder.write_meta(meta | ({"reject": rule.to_dict()} if rule else {}))
    if len(labels):
        plot_risk_coverage(curves, rule, folder.risk_coverage_plot)
    say(f'"unknown" answers: off ({reason})' if rule is None else f"unknown answers: {rule.describe()}")
    return {
        "rule": rule.to_dict() if rule else None,
        "not_chosen_because": reason,
        "aurc": {name: curve["aurc"] for name, curve in curves.items()},
        "accuracy_at_coverage": coverage_table(
            confidence_scores(logits, rule.score if rule else "msp", features, bank), correct
        ),
    }

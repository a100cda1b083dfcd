"""Learning-rate range test: sweep the fine-tuning lr exponentially and watch the training loss.

Leslie Smith's test, as fastai runs it: from where stage 2 starts (the head fitted on frozen features),
take ~100 optimizer steps on augmented training batches while the head's lr grows from 1e-6 to 1, every
block below it keeping its layer-wise share; stop once the loss blows up (4x its lowest). The loss stays
flat, may fall, then climbs; a good lr for a whole run sits well below where it climbs. The steps are
fine-tuning's: its optimizer and param groups, augmentation, mixup/cutmix, class-weighted loss, BatchNorm
mode and autocast; the sweep runs at --img-size with plainly shuffled batches (no multi-scale sizes, no
class-balanced sampler).

The rule is fastai's "minimum / 10", with the minimum read robustly: the suggestion is one tenth of the
*largest* lr at which the smoothed loss is still at its floor, i.e. within 10% of its minimum (or within
the per-step noise, when that is larger). Why:
- A minimum is a stable landmark; the steepest-descent point is a derivative of noisy data and jumps
  from seed to seed. One decade below is where many steps at one lr stay stable, not just a few.
- Reading the *last* lr at the floor, not the argmin, handles the curve fine-tuning usually gives: flat
  (the head is already fitted) until it blows up. There the argmin is anywhere in the noise; the end of
  the floor is where the blow-up starts.
- The smoothing is a centred running median over 9 steps: robust to an odd batch, without lag, and
  unlike any average it does not drag the blow-up backwards onto smaller lrs.
Guards: the suggestion is clamped to [default / 100, default * 10] of the optimizer's default lr, and
when the curve never clearly climbs above its floor (flat, or too noisy to read) or blows up at once,
the default is kept, with a note saying why.

The test leaves no trace: the model's weights, BatchNorm buffers, trainable flags, train/eval modes and
the random number generators are put back exactly, so a run with ``--lr auto`` trains as a run given
the suggested number would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

from ..data.dataset import ImageDataset
from ..distributed import DistContext, GlobalBatchSampler
from ..errors import ConfigError
from ..fileio import atomic_write
from ..hardware import pin_memory
from ..run_folder import RunFolder
from .config import DEFAULT_LR
from .recipe import batch_mixing
from .state import rng_state, set_rng_state
from .step import fine_tuning_loss, training_step

if TYPE_CHECKING:
    from .loop import Trainer

START_LR = 1e-6
END_LR = 1.0
STEPS = 100
RULE = (
    "minimum/10: one tenth of the largest lr at which the smoothed loss is within 10% "
    "(or the per-step noise, if larger) of its minimum"
)
DIVERGENCE_FACTOR = 4.0  # stop once the running average of the loss exceeds 4x its lowest value
FLOOR_TOLERANCE = 0.10  # "at the floor": within 10% of the minimum
CLIMB_FACTOR = 1.25  # the curve must rise at least this far above its floor for a blow-up to be read
SMOOTHING_WINDOW = 9  # steps in the running median: half a decade of lr at 100 steps
STOP_AVERAGING = 0.9  # EMA factor of the online divergence check
MIN_STEPS = 10  # fewer recorded steps than this (divergence at once) cannot be read
CLAMP = (0.01, 10.0)  # the suggestion stays within these multiples of the optimizer's default lr
_PLOT_DPI = 110


@dataclass
class RangeTest:
    """One sweep: the lrs tried (the head's), the loss of each step, and the lr it suggests."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    rule: str
    reason: str  # how the suggestion came from the curve, or why the default was kept
    fallback: bool  # True when the curve could not be read and the optimizer's default is suggested
    floor_end: float | None  # the largest lr still at the loss's floor (the suggestion is a tenth of it)
    stopped: str  # "diverged" or "end of range"
    seconds: float
    settings: dict = field(default_factory=dict)  # what was swept: optimizer, layer decay, batch, model...

    def to_dict(self) -> dict:
        return asdict(self)


# -- the rule -------------------------------------------------------------------------------------


def smooth(losses: list[float] | np.ndarray, window: int = SMOOTHING_WINDOW) -> np.ndarray:
    """A centred running median (shorter at the ends): no lag, and a blow-up stays where it happened."""
    values = np.asarray(losses, dtype=np.float64)
    half = window // 2
    return np.array([np.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))])


def suggest_lr(
    lrs: list[float] | np.ndarray,
    losses: list[float] | np.ndarray,
    default_lr: float,
    blew_up: bool = False,
) -> tuple[float, str, bool, float | None]:
    """The lr the curve suggests, how it was read, whether it fell back to ``default_lr``, and the floor's end.

    ``blew_up``: the sweep stopped on a loss that exploded or became NaN, a climb even if too quick to smooth.
    """
    lrs, losses = np.asarray(lrs, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if len(lrs) < MIN_STEPS:
        where = f" (at lr {lrs[-1]:.1e})" if len(lrs) else ""
        return (
            default_lr,
            f"the loss blew up after {len(lrs)} steps{where}: the curve cannot be read, "
            f"keeping the default {default_lr:g}",
            True,
            None,
        )
    smoothed = smooth(losses)
    lowest = int(np.argmin(smoothed))
    floor = smoothed[lowest]
    # The typical relative deviation of one step from the smoothed curve (MAD scaled to a std).
    noise = 1.4826 * float(np.median(np.abs(losses / np.maximum(smoothed, 1e-12) - 1)))
    tolerance = max(FLOOR_TOLERANCE, noise)
    edge = int(np.nonzero(smoothed <= floor * (1 + tolerance))[0][-1])
    # How far the loss climbs once it has left its floor: noise alone rarely gets to 3x the tolerance.
    rise = smoothed[edge:].max() / max(floor, 1e-12) - 1
    if not blew_up and rise < max(CLIMB_FACTOR - 1, 3 * tolerance):
        return (
            default_lr,
            f"the smoothed loss never climbed clearly above its floor {floor:.3g} (by {100 * rise:.0f}%, "
            f"per-step noise {100 * noise:.0f}%): the curve is flat or too noisy to read, "
            f"keeping the default {default_lr:g}",
            True,
            None,
        )
    suggestion = float(lrs[edge] / 10)
    reason = (
        f"smoothed loss lowest ({floor:.3g}) at lr {lrs[lowest]:.1e}, still within {100 * tolerance:.0f}% "
        f"of it up to lr {lrs[edge]:.1e}"
    )
    low, high = default_lr * CLAMP[0], default_lr * CLAMP[1]
    if not low <= suggestion <= high:
        clamped = min(max(suggestion, low), high)
        reason += f"; {suggestion:.1e} clamped into [{low:.0e}, {high:.0e}]"
        suggestion = clamped
    return suggestion, reason, False, float(lrs[edge])


# -- the sweep -----------------------------------------------------------------------------------


def sweep_lrs(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    return start_lr * (end_lr / start_lr) ** (np.arange(steps) / max(1, steps - 1))


class _Snapshot:
    """Everything a few training steps change in a model, and the RNGs: taken, then put back bitwise."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        self.modes = [(module, module.training) for module in model.modules()]
        self.rng = rng_state()

    def restore(self) -> None:
        with torch.no_grad():
            self.model.load_state_dict(self.weights)
        for name, param in self.model.named_parameters():
            param.requires_grad_(self.trainable[name])
            param.grad = None
        for module, training in self.modes:
            module.training = training
        set_rng_state(*self.rng)


def _training_batches(
    train_set: ImageDataset, batch_size: int, seed: int, num_workers: int, pin: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches, pass after pass, each pass shuffled and augmented from (seed, pass) alone."""
    epoch = 0
    while True:
        epoch += 1
        train_set.set_epoch(seed, epoch)
        sampler = GlobalBatchSampler(len(train_set), batch_size, DistContext(), seed, epoch)
        yield from torch.utils.data.DataLoader(
            train_set, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin
        )


def range_test(
    trainer: Trainer,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
    steps: int = STEPS,
) -> RangeTest:
    """Sweep the stage-2 optimizer (as ``trainer.make_optimizer`` builds it) from the model's current state.

    The model and the RNGs are left exactly as they were found.
    """
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"the range test needs 0 < start lr < end lr, got {start_lr:g} and {end_lr:g}")
    if steps < MIN_STEPS:
        raise ConfigError(f"the range test needs at least {MIN_STEPS} steps, got {steps}")
    config, model, runtime = trainer.config, trainer.model, trainer.runtime
    default_lr = DEFAULT_LR[config.optimizer]
    # The batches and the loss of a fine-tuning step (see Trainer.fine_tune and train_epoch).
    train_set = ImageDataset(
        trainer.source,
        "train",
        trainer.preprocessing.train_transform(config.augment, config.min_crop_scale),
        decoded=trainer.decoded.get("train"),
    )
    num_classes = len(trainer.source.class_names)
    criterion = fine_tuning_loss(config, trainer.source.splits["train"].labels, num_classes, runtime.device)
    mixing = batch_mixing(config.mixup, config.cutmix, num_classes)
    snapshot = _Snapshot(model)
    started = time.perf_counter()
    lrs, losses = [], []
    try:
        # The optimizer is built the one way stage 2 builds it, for a head lr of 1: each group's lr is
        # then its share of the head's, and the sweep scales all of them together.
        optimizer = trainer.make_optimizer(head_lr=1.0)
        shares = [group["lr"] for group in optimizer.param_groups]
        scaler = runtime.grad_scaler()
        trainer.train_mode(model)
        batches = _training_batches(
            train_set, config.batch_size, config.seed, config.num_workers, pin_memory(runtime)
        )
        average, lowest = 0.0, math.inf
        bar = tqdm(
            sweep_lrs(start_lr, end_lr, steps), desc="lr range test", leave=False, disable=config.quiet
        )
        for step, lr in enumerate(bar):
            for group, share in zip(optimizer.param_groups, shares, strict=True):
                group["lr"] = share * lr
            images, labels = next(batches)
            value = training_step(
                model, optimizer, scaler, runtime, criterion, images, labels, mixing
            ).loss.item()
            if not math.isfinite(value):
                break
            lrs.append(float(lr))
            losses.append(value)
            # The stop watches a one-sided average: it must decide now, without the steps to come.
            average = STOP_AVERAGING * average + (1 - STOP_AVERAGING) * value
            running = average / (1 - STOP_AVERAGING ** (step + 1))
            lowest = min(lowest, running)
            bar.set_postfix(lr=f"{lr:.1e}", loss=f"{running:.3f}")
            if running > DIVERGENCE_FACTOR * lowest:
                break
    finally:
        snapshot.restore()
    diverged = len(lrs) < steps
    suggestion, reason, fallback, floor_end = suggest_lr(lrs, losses, default_lr, blew_up=diverged)
    return RangeTest(
        lrs=lrs,
        losses=losses,
        smoothed=smooth(losses).tolist(),
        suggestion=suggestion,
        rule=RULE,
        reason=reason,
        fallback=fallback,
        floor_end=floor_end,
        stopped="diverged" if diverged else "end of range",
        seconds=time.perf_counter() - started,
        settings={
            "model": config.model,
            "weights": config.weights,
            "data": config.data,
            "img_size": config.img_size,
            "batch_size": config.batch_size,
            "optimizer": config.optimizer,
            "weight_decay": config.weight_decay,
            "layer_decay": config.layer_decay,
            "label_smoothing": config.label_smoothing,
            "augment": config.augment,
            "mixup": config.mixup,
            "cutmix": config.cutmix,
            "balance": config.balance,
            "bn": config.bn,
            "head_stage": config.head_stage,
            "precision": runtime.precision,
            "seed": config.seed,
            "start_lr": start_lr,
            "end_lr": end_lr,
            "steps": steps,
        },
    )


# -- the outputs -----------------------------------------------------------------------------------


def plot_range_test(result: RangeTest, path: str | Path) -> None:
    """Loss against lr on a log axis: each step faint, the smoothed curve, the suggestion marked."""
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axes = figure.add_subplot(1, 1, 1)
    if result.lrs:
        axes.plot(result.lrs, result.losses, color="0.75", linewidth=0.8, label="loss per step")
        axes.plot(result.lrs, result.smoothed, color="C0", linewidth=2, label="smoothed")
        axes.set_xscale("log")
        # The blown-up tail would squash the interesting part of the curve into a line.
        low, high = min(result.smoothed), max(result.smoothed[0], min(result.smoothed) * 2.5)
        axes.set_ylim(low - 0.1 * (high - low) - 1e-3, high + 0.1 * (high - low) + 1e-3)
    kind = "default kept" if result.fallback else "suggested"
    axes.axvline(result.suggestion, color="C3", linestyle="--", label=f"{kind}: {result.suggestion:.1e}")
    if result.floor_end is not None:
        at = result.lrs.index(result.floor_end)
        axes.plot(
            [result.floor_end],
            [result.smoothed[at]],
            "o",
            color="C3",
            label=f"floor ends: {result.floor_end:.1e}",
        )
    axes.set_xlabel("head learning rate (blocks below: layer-wise shares)")
    axes.set_ylabel("training loss")
    settings = result.settings
    axes.set_title(
        f"lr range test: {settings.get('model', '')}, {settings.get('optimizer', '')}, "
        f"batch {settings.get('batch_size', '')}, {settings.get('img_size', '')} px",
        fontsize=10,
    )
    axes.legend(fontsize=8, loc="upper left")
    FigureCanvasAgg(figure)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=_PLOT_DPI, bbox_inches="tight"))


def write_range_test(result: RangeTest, folder: str | Path) -> tuple[Path, Path]:
    """``lr_find.json`` and ``lr_find.png`` in ``folder``; returns their paths."""
    folder = RunFolder(folder)
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.write_lr_find(result.to_dict())
    plot_range_test(result, folder.lr_find_plot)
    return folder.lr_find_file, folder.lr_find_plot


def read_range_test(folder: str | Path) -> RangeTest:
    return RangeTest(**RunFolder(folder).read_lr_find())


# -- inside a run ---------------------------------------------------------------------------------------


def auto_lr(trainer: Trainer) -> float:
    """``--lr auto``: the range test in the trainer's stage-2 situation, saved in its run folder; the lr."""
    default_lr = DEFAULT_LR[trainer.config.optimizer]
    if trainer.config.epochs == 0:
        trainer.say(f"lr auto: no fine-tuning epochs, so no range test; lr {default_lr:g} recorded")
        return default_lr
    result = range_test(trainer, START_LR, END_LR, STEPS)
    if trainer.dist.is_main:
        write_range_test(result, trainer.run_dir)
    trainer.say(f"{describe(result)}; plot: {RunFolder(trainer.run_dir).lr_find_plot}")
    return result.suggestion


def describe(result: RangeTest) -> str:
    """One line for the terminal: the number, and how it was read."""
    where = f"{len(result.lrs)} steps, {result.stopped}, {result.seconds:.0f}s"
    if result.fallback:
        return f"lr range test ({where}): {result.reason}"
    return f"lr range test ({where}): suggested lr {result.suggestion:.2e} ({result.reason})"

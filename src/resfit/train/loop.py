"""The training run: scan the data, fit the head on the frozen backbone, fine-tune everything, keep the best.

Every epoch ends with the best model in the run folder and a resumable state on disk, so a crash
or kill -9 costs at most one epoch.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..batched_inference import eval_loader, predict_logits
from ..calibration import calibrate_run, scaled_logits
from ..data.dataset import ImageDataset
from ..data.decoded_cache import DecodedImages, decoded_caches, holding
from ..data.duplicates import hash_duplicates, warning_line
from ..data.feature_cache import FeatureCache, content_fingerprint, feature_key, weights_fingerprint
from ..data.scan import load_dataset
from ..data.shard_stream import SHUFFLE_BUFFER, ShardEpoch, StreamedShards
from ..data.shards import train_shards
from ..data.transforms import Preprocessing
from ..distributed import (
    DistContext,
    GlobalBatchSampler,
    barrier,
    broadcast_module,
    gather_rows,
    init_distributed,
    process_device,
    shutdown,
    sum_across,
)
from ..errors import ConfigError, RunFolderError, StorageError
from ..hardware import apply_device, pin_memory, resolve_runtime
from ..metrics import format_metrics_table
from ..model_wrappers import WithFeatures
from ..models import (
    apply_pretrained,
    build_model,
    feature_dim,
    freeze_batchnorm,
    freeze_lowest_blocks,
    layerwise_param_groups,
    load_pretrained,
    set_backbone_trainable,
)
from ..plots import plot_training_curves
from ..rejection import (
    FEATURE_SCORES,
    MAX_BANK_IMAGES,
    choose_and_store_rule,
    split_output,
    why_no_rule,
)
from ..rejection import parse_target as parse_reject_target
from ..run_folder import RunFolder, build_model_meta
from .config import TrainConfig
from .folded_bn import training_network
from .head import extract_features, fit_probe_head, head_logits
from .lr_find import END_LR, START_LR, STEPS, RangeTest, auto_lr, range_test, write_range_test
from .recipe import (
    balanced_sample_weights,
    batch_for_size,
    batch_mixing,
    class_counts,
    default_train_sizes,
    ema_decay_for,
    ema_or_network,
    epoch_sizes,
    interpolate_weights,
    make_ema,
    replaces_kept_model,
)
from .resolve import DataFacts, resolve_settings
from .state import (
    load_start_weights,
    load_state,
    restore,
    save_start_weights,
    save_state,
    saves_resume_state,
)
from .step import fine_tuning_loss, training_step
from .tracking import Tracking, open_tracking, require_tracker_packages

POSTFIX_EVERY = 10  # steps between progress-bar updates of the running loss (each one waits for the GPU)
# A drawing of curves.png costs about half a second (a sixth of a 3-second GPU epoch, 3% of a 2-core CPU's
# run when drawn every epoch): between epochs it is redrawn at most this often, and always at the end.
CURVES_EVERY_S = 60.0
# The kept model's validation outputs (logits and pooled features) are held for calibration, sparing it a pass
# over val, up to this size (a 50,000-photo val set of 1,000 classes would need 600 MB: it is passed again).
MAX_HELD_VAL_BYTES = 256 * 2**20


def holds_val_output(model: nn.Module, num_images: int, num_classes: int) -> bool:
    """Whether validating ``model`` on ``num_images`` photos should keep its outputs (float32 logits and
    pooled features) for calibration: decided before the pass, so a val set too big to hold is scored on
    logits alone and never builds the features it would then drop."""
    if not hasattr(model, "fc"):
        return False
    return num_images * (num_classes + feature_dim(model)) * 4 <= MAX_HELD_VAL_BYTES


def stopped_early(progress: dict, patience: int) -> bool:
    """Validation loss has not improved for ``patience`` fine-tuning epochs: no epoch follows (0: never)."""
    return patience > 0 and progress["bad_epochs"] >= patience


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    history: list[dict]
    best_epoch: int
    seconds: float


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0: the multiplier of each group's initial lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(
        nn.functional.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(labels)).item()
    )


def finetune_optimizer(
    model: nn.Module, config: TrainConfig
) -> tuple[torch.optim.Optimizer, list[nn.Module]]:
    """Stage 2's optimizer: every block trainable but the --frozen-blocks, with layer-wise lr groups.

    Returns it with the frozen modules, whose BatchNorms set_train_mode keeps in eval mode.
    """
    set_backbone_trainable(model, True)
    frozen = freeze_lowest_blocks(model, config.frozen_blocks)
    groups = layerwise_param_groups(model, config.lr, config.layer_decay, config.weight_decay)
    for group in groups:
        group["initial_lr"] = group["lr"]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True), frozen
    return torch.optim.AdamW(groups, lr=config.lr), frozen


def set_train_mode(
    network: nn.Module, model: nn.Module, config: TrainConfig, frozen: list[nn.Module]
) -> None:
    """Training mode, but BatchNorm keeps the source's statistics: everywhere under --bn frozen, and
    always in the frozen blocks (their layers are the source's, so must their statistics be)."""
    network.train()
    for module in [model] if config.bn == "frozen" else frozen:
        freeze_batchnorm(module)


def curves_due(last: tuple[float, int] | None, now: float, rows: int, complete: bool) -> bool:
    """Whether curves.png is redrawn now, ``last`` being (when, how many rows) of its last drawing: never
    twice for the same rows; always once the history is complete; else at most every CURVES_EVERY_S
    (history.csv itself is written after every epoch)."""
    if last is not None and last[1] == rows:
        return False
    return complete or last is None or now - last[0] >= CURVES_EVERY_S


def epoch_line(row: dict) -> str:
    """One line per epoch for the terminal and logs; stages without a value show '-'."""

    def number(key: str, spec: str) -> str:
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    step = f"lr {number('lr', '.2e')}" if row.get("lr") is not None else f"probe C {number('probe_c', 'g')}"
    speed = f"{number('images_per_s', '.1f')} img/s" + (" (features)" if row["stage"] == "head" else "")
    which = f" ({row['kept_weights']})" if row.get("kept_weights") else ""
    return (
        f"epoch {row['epoch']:>2} {row['stage']:<8} train loss {number('train_loss', '.4f')} "
        f"acc {number('train_acc', '.4f')} | val loss {number('val_loss', '.4f')} acc {number('val_acc', '.4f')}"
        f"{which} | {step} | {row['seconds']:.1f}s, {speed}"
    )


class Trainer:
    """One run. Built from a config (a new run) or from a run folder's saved config (resume)."""

    def __init__(self, config: TrainConfig, run_dir: Path, resuming: bool, say: Callable[[str], None]):
        self.config = config
        self.run_dir = run_dir
        self.folder = RunFolder(run_dir)
        self.resuming = resuming
        self.say = say
        self.started = time.perf_counter()
        self.dist = DistContext()
        self._weights_fingerprint: str | None = None
        self._content_fingerprints: dict[str, str] = {}  # per split: _feature_key hashes its files once
        self.ema = None  # the EMA of the weights (default; --no-ema: none), validated and kept
        self._validating = "average"  # with the EMA, which of the two kept_model is: "average" or "network"
        self.frozen_modules: list[nn.Module] = []  # --frozen-blocks, set with the optimizer
        self.scaler: torch.amp.GradScaler | None = (
            None  # fp16's loss scale, saved and resumed with the optimizer
        )
        self.tracking = Tracking.off()  # --log: opened on rank 0 once the run folder exists
        self._curves_drawn: tuple[float, int] | None = None  # curves.png's last drawing: when, how many rows
        # Validation outputs (logits, then normalised pooled features, val order): of the model validated last,
        # and of the kept model (the one model.safetensors holds); None where not held (see holds_val_output);
        # record() keeps the first as the second when its epoch is kept.
        self._val_output: np.ndarray | None = None
        self._kept_val_output: np.ndarray | None = None

    # -- set-up -------------------------------------------------------------------------------
    def prepare(self) -> None:
        config = self.config
        self._seed()  # before anything random: the split, the head's initialisation, the first batches
        # Under torchrun each process resolves its own GPU (its LOCAL_RANK's) before anything touches CUDA.
        self.runtime = resolve_runtime(process_device(config.device), config.precision)
        if config.sync_bn and self.runtime.device_type != "cuda":
            raise ConfigError(
                f"--sync-bn is for CUDA (SyncBatchNorm has no CPU implementation), and this run is on "
                f"{self.runtime.device}: drop --sync-bn"
            )
        self.dist = init_distributed(self.runtime.device)
        if self.dist.enabled:
            # Processes on one machine share its cores; only rank 0 talks and writes.
            cpu_threads = max(1, self.runtime.threads // self.dist.local_world_size)
            self.runtime = replace(self.runtime, threads=cpu_threads)
            if not self.dist.is_main:
                self.say = lambda _message: None
        apply_device(self.runtime)
        self.say(f"device: {self.runtime.describe()}")
        if self.dist.enabled:
            self.say(f"distributed: {self.dist.world_size} processes ({self.dist.backend})")
        # The first process of each node (LOCAL_RANK 0) scans first and fills that node's scan cache
        # ($RESFIT_CACHE is per machine); the node's other processes then read it. Global rank 0 alone
        # would leave the other nodes' processes all scanning at once into their own cache.
        first_on_node = self.dist.local_rank == 0
        if not first_on_node:
            barrier(self.dist)
        self.source, self.report = load_dataset(
            config.data,
            val_fraction=config.val_fraction,
            seed=config.seed,
            progress=not config.quiet,
            exclude_from=config.exclude_from,
        )
        if first_on_node:
            barrier(self.dist)
        self.say(self.report.summary_line())
        for note in self.source.notes:
            self.say(f"note: {note}")
        # The model-free audit (hashes, cached like the scan): leakage and label conflicts in one line.
        self.sharded = self.source.layout == "shards"
        if self.dist.is_main and self.source.layout not in ("cifar10", "shards"):
            warning = warning_line(hash_duplicates(self.source), config.data)
            if warning:
                self.say(warning)
        if self.sharded:
            self._shard_notes()
        self.pretrained = load_pretrained(config.model, config.weights)
        self.say(f"weights: {self.pretrained.description}")
        # Every "chosen for you" value is decided once and stored, so a resumed run uses the same ones.
        resolved = resolve_settings(
            config,
            self.runtime,
            self.pretrained,
            DataFacts(
                class_counts(self.source.splits["train"].labels, len(self.source.class_names)), self.sharded
            ),
            processes_per_node=self.dist.local_world_size,
            distributed=self.dist.enabled,
        )
        for note in resolved.notes:
            self.say(note)
        self.config = config = resolved.config
        self.preprocessing = resolved.preprocessing
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.folder.write_train_config(config.to_dict())
            self.folder.write_data_report(self.report.to_dict())
        self.model = build_model(config.model, len(self.source.class_names), config.dropout)
        apply_pretrained(self.model, self.pretrained)
        if config.sync_bn and self.dist.enabled:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        elif config.sync_bn:
            self.say(
                "note: --sync-bn has no effect in a single process (it syncs across torchrun's processes)"
            )
        self.model.to(self.runtime.device, memory_format=torch.channels_last)
        broadcast_module(self.dist, self.model)  # one starting point everywhere, even from scratch
        self.meta = build_model_meta(
            config.model,
            self.source.class_names,
            self.preprocessing,
            config.dropout,
            precision=self.runtime.precision,
            tta=config.tta,
            runtime=self.runtime.to_dict(),
            pretrained=self.pretrained.to_dict(),
            data={"path": str(Path(config.data).resolve()), "layout": self.source.layout},
            training_config=config.to_dict(),
        )
        for source in [self.pretrained, *self.pretrained.members]:
            source.state_dict = None  # the backbone is in the model now; free the copy
        self.say(
            f"model: {config.model}, {len(self.source.class_names)} classes, {config.img_size} px, batch {config.batch_size}, "
            f"{config.optimizer} lr {config.lr if config.lr == 'auto' else format(config.lr, 'g')} (layer decay {config.layer_decay}), {config.epochs} fine-tuning epochs"
        )
        # Under DDP the first process of each node builds the decoded images into that node's cache and
        # the node's others then map the same files; decoding is deterministic, so every process (and a
        # single-process run) trains on the same pixels.
        if not first_on_node:
            barrier(self.dist)
        self.decoded = decoded_caches(
            self.source, self.preprocessing, config.decoded_cache, say=self.say, progress=not config.quiet
        )
        if first_on_node:
            barrier(self.dist)

    def _shard_notes(self) -> None:
        """Say what streaming from shards changes, rather than diverge silently (and store the choice)."""
        count = len(train_shards(self.source))
        self.say(
            f"note: sharded data: each process streams its own train shards ({count} in all), shuffled in a "
            f"{SHUFFLE_BUFFER}-sample buffer seeded by seed and epoch; each DataLoader worker drops its last "
            "partial batch; no duplicate check and no decoded-image cache (they need every image by position)"
        )

    def _seed(self) -> None:
        seed = self.config.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # -- stage 1 --------------------------------------------------------------------------------
    def fit_head(self) -> dict:
        config, progress = self.config, not self.config.quiet
        t0 = time.perf_counter()
        train_x, train_y = self._features("train", progress)
        val_x, val_y = self._features("val", progress)
        extract_seconds = time.perf_counter() - t0
        head = self.model.fc
        head.to("cpu")
        probe = fit_probe_head(head, train_x, train_y, len(self.source.class_names), config.seed)
        train_logits, val_logits = head_logits(head, train_x), head_logits(head, val_x)
        head.to(self.runtime.device)
        broadcast_module(self.dist, head)  # every process continues from exactly rank 0's head
        # The head stage's model on val as a pass over the photos gives it: the head on the same device and
        # in the same precision as there (the pooled features are the pass's own, cached before the head).
        self._val_output = None
        if holds_val_output(self.model, len(val_x), len(self.source.class_names)):
            with torch.inference_mode(), self.runtime.autocast():
                held = WithFeatures(self.model).from_features(torch.from_numpy(val_x).to(self.runtime.device))
            self._val_output = held.cpu().numpy()
        return {
            "epoch": 0,
            "stage": "head",
            "lr": None,
            "train_loss": cross_entropy(train_logits, train_y),
            "train_acc": float((train_logits.argmax(1) == train_y).mean()),
            "val_loss": cross_entropy(val_logits, val_y),
            "val_acc": float((val_logits.argmax(1) == val_y).mean()),
            "seconds": time.perf_counter() - t0,
            "images_per_s": (len(train_y) + len(val_y)) / max(1e-9, extract_seconds),
            "probe_c": probe.regularisation,
        }

    def _shard(self, split: str) -> np.ndarray:
        """This process's share of a split for inference: every world_size-th item."""
        return np.arange(self.dist.rank, len(self.source.splits[split].items), self.dist.world_size)

    def _features(self, split: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """Pooled features of a split: from the feature cache when the same backbone saw the same images."""
        key = None
        if not self.dist.enabled and self.config.feature_cache:
            if self._weights_fingerprint is None:
                self._weights_fingerprint = weights_fingerprint(self.model)
            key = self._feature_key(self._weights_fingerprint, self.preprocessing, split)
            cached = FeatureCache().get(key)
            if cached is not None:
                self.say(f"features of {split}: from the cache")
                return cached
        features, labels = self._extract_features(split, progress)
        if key is not None:
            FeatureCache().put(key, features, labels)
        return features, labels

    def _feature_key(self, weights: str, preprocessing: Preprocessing, split: str) -> str:
        """The feature cache's key for a backbone's features of a split; the split's files are hashed once
        per run (the head stage, then calibration)."""
        if split not in self._content_fingerprints:
            self._content_fingerprints[split] = content_fingerprint(self.source, split)
        return feature_key(
            weights, preprocessing.to_dict(), self.runtime.precision, self._content_fingerprints[split]
        )

    def _outputs_from_feature_cache(
        self, model: nn.Module, preprocessing: Preprocessing
    ) -> Callable[[str, list[int] | None], np.ndarray | None] | None:
        """The kept model's outputs on a split (or its rows ``indices``) computed from the feature cache,
        without a pass over the photos, where its backbone is one whose features the cache holds: a run with
        --epochs 0, or one whose fine-tuning never beat the probe (the head stage's model was kept).

        None where it cannot be (distributed, --no-feature-cache, no single fc head); the function returns
        None for a split the cache does not hold. The backbone is hashed once here (it reads every weight).
        The same numbers as a pass over the photos up to float rounding: the head stage's features are the
        source backbone's on the same evaluation pixels, in the same precision."""
        network = model.network if isinstance(model, WithFeatures) else model
        if self.dist.enabled or not self.config.feature_cache or not hasattr(network, "fc"):
            return None
        weights = weights_fingerprint(network)
        head = model.from_features if isinstance(model, WithFeatures) else network.fc
        device = next(network.fc.parameters()).device

        def outputs(split: str, indices: list[int] | None = None) -> np.ndarray | None:
            cached = FeatureCache().get(self._feature_key(weights, preprocessing, split))
            if cached is None:
                return None
            features = cached[0]
            if features.shape != (len(self.source.splits[split].labels), network.fc.in_features):
                return None  # not this split's features after all: the pass over the photos decides
            if indices is not None:
                features = features[indices]
            with torch.inference_mode(), self.runtime.autocast():  # the head as a pass runs it (bf16 too)
                return head(torch.from_numpy(features).to(device)).float().cpu().numpy()

        return outputs

    def _extract_features(self, split: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        indices = self._shard(split)
        features, labels = extract_features(
            self.model,
            self.source,
            split,
            self.preprocessing,
            self.runtime,
            self.config.num_workers,
            progress,
            indices=indices.tolist() if self.dist.enabled else None,
            decoded=self.decoded.get(split),
        )
        combined = gather_rows(self.dist, np.column_stack([features, labels]), indices)
        return combined[:, :-1].astype(np.float32), combined[:, -1].astype(np.int64)

    # -- stage 2 --------------------------------------------------------------------------------
    def choose_lr(self) -> None:
        """``--lr auto``: the range test (train/lr_find.py) picks the lr; it is saved so a resume reuses it."""
        self.config = replace(self.config, lr=auto_lr(self))
        self.meta["training_config"] = self.config.to_dict()
        if self.dist.is_main:
            self.folder.write_train_config(self.config.to_dict())
            if self.folder.has_model:  # the head stage's model was kept before the lr was known
                self.folder.write_meta(self.folder.read_meta() | {"training_config": self.config.to_dict()})

    def make_optimizer(self, head_lr: float | None = None) -> torch.optim.Optimizer:
        """Stage 2's optimizer; ``head_lr`` in place of the run's lr (the range test builds it for 1)."""
        config = self.config if head_lr is None else replace(self.config, lr=head_lr)
        optimizer, self.frozen_modules = finetune_optimizer(self.model, config)
        return optimizer

    def train_mode(self, network: nn.Module) -> None:
        set_train_mode(network, self.model, self.config, self.frozen_modules)

    def epoch_plan(self, train_size: int) -> list[dict]:
        """Per fine-tuning epoch: its image size, batch size and batch sampler (fixed by seed and epoch)."""
        config = self.config
        if config.multi_scale or config.train_sizes:
            sizes = epoch_sizes(config.train_sizes or default_train_sizes(config.img_size), config.epochs)
        else:
            sizes = [config.img_size] * config.epochs
        weights = None
        if config.balance == "sampler":
            labels = self.source.splits["train"].labels
            weights = balanced_sample_weights(labels, class_counts(labels, len(self.source.class_names)))
        plan = []
        for epoch, size in enumerate(sizes, start=1):
            batch = batch_for_size(config.batch_size, config.img_size, size, self.dist.world_size)
            if self.sharded:  # a stream per process: batch is the per-process share of the global batch
                if batch % self.dist.world_size:
                    raise ConfigError(
                        f"batch size {batch} must be divisible by the {self.dist.world_size} processes"
                    )
                per_process = batch // self.dist.world_size
                shards = train_shards(self.source)
                sampler = ShardEpoch(shards, per_process, self.dist, config.seed, epoch, config.num_workers)
            else:
                sampler = GlobalBatchSampler(train_size, batch, self.dist, config.seed, epoch, weights)
            plan.append({"size": size, "batch": batch, "sampler": sampler})
        return plan

    def train_epoch(
        self, epoch: int, optimizer, scaler, network, train_set, criterion, plan: list[dict]
    ) -> tuple:
        config, runtime = self.config, self.runtime
        sampler = plan[epoch - 1]["sampler"]
        global_sizes = sampler.global_batch_sizes()
        if self.sharded:
            loader = sampler.loader(train_set, pin_memory(runtime))
        else:
            loader = torch.utils.data.DataLoader(
                train_set,
                batch_sampler=sampler,
                num_workers=config.num_workers,
                pin_memory=pin_memory(runtime),
            )
        # One warm-up + cosine schedule over every step of every epoch (epochs may differ in batch size).
        steps_before = sum(len(p["sampler"]) for p in plan[: epoch - 1])
        total, warmup = (
            sum(len(p["sampler"]) for p in plan),
            round(config.warmup_epochs * len(plan[0]["sampler"])),
        )
        mixing = batch_mixing(config.mixup, config.cutmix, len(self.source.class_names))
        self.train_mode(network)
        # Summed on the device: reading a number back every step would make the CPU wait for the GPU
        # instead of queueing the next step. float64, so the sums are those of Python floats.
        loss_total = torch.zeros((), dtype=torch.float64, device=runtime.device)
        correct_total = torch.zeros((), dtype=torch.int64, device=runtime.device)
        seen, lr = 0, 0.0
        started = time.perf_counter()
        bar = tqdm(
            loader, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=config.quiet, unit="batch"
        )
        for step, (images, labels) in enumerate(bar):
            factor = cosine_with_warmup(steps_before + step, total, warmup)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            lr = config.lr * factor
            # The mean over the *global* batch; DDP averages over processes, hence the world_size factor.
            done = training_step(
                network,
                optimizer,
                scaler,
                runtime,
                criterion,
                images,
                labels,
                mixing,
                loss_scale=self.dist.world_size / global_sizes[step],
            )
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            loss_total += done.summed_loss.double()
            # accuracy is counted against each image's own label, mixed batches included
            correct_total += (done.logits.argmax(1) == done.labels).sum()
            seen += len(done.labels)
            if not bar.disable and step % POSTFIX_EVERY == 0:
                bar.set_postfix(
                    loss=f"{loss_total.item() / seen:.3f}", acc=f"{correct_total.item() / seen:.3f}"
                )
        loss_sum, correct = loss_total.item(), int(correct_total.item())
        seconds = time.perf_counter() - started
        loss_sum, correct, seen = sum_across(self.dist, loss_sum, correct, seen)
        images_per_s = seen / max(1e-9, seconds)
        return loss_sum / max(1, seen), correct / max(1, seen), lr, images_per_s

    def validate(self) -> tuple[float, float]:
        """Validation loss and accuracy; under DDP each process scores a shard and all see the whole."""
        indices = self._shard("val")
        dataset = ImageDataset(
            self.source, "val", self.preprocessing.eval_transform(), decoded=self.decoded.get("val")
        )
        if self.dist.enabled:
            dataset = torch.utils.data.Subset(dataset, indices.tolist())
        loader = eval_loader(dataset, self.config.num_workers)
        num_classes = len(self.source.class_names)
        if self.dist.enabled or not holds_val_output(self.kept_model, len(dataset), num_classes):
            logits, labels = predict_logits(self.kept_model, loader, self.runtime)
            combined = gather_rows(self.dist, np.column_stack([logits, labels]), indices)
            logits, labels = combined[:, :-1], combined[:, -1].astype(np.int64)
            self._val_output = None
        else:  # the features too (free: the fc's input), held for calibration should this model be kept
            output, labels = predict_logits(WithFeatures(self.kept_model), loader, self.runtime)
            self._val_output = output
            logits = output[:, :num_classes]
        return cross_entropy(logits, labels), float((logits.argmax(1) == labels).mean())

    def write_history(self, history: list[dict], complete: bool = False) -> None:
        """history.csv after every epoch; curves.png when due (curves_due), so a long run's picture is at
        most a minute behind and a finished run's is whole."""
        self.folder.write_history(history)
        now = time.perf_counter()
        if curves_due(self._curves_drawn, now, len(history), complete):
            plot_training_curves(history, self.folder.curves_plot)
            self._curves_drawn = (now, len(history))

    @property
    def kept_model(self) -> nn.Module:
        """What is validated and saved: the EMA of the weights (or, under --ema-keep better, the default, the
        network itself where it stands for the epoch), else (--no-ema) the weights themselves."""
        if self.ema is None or self._validating == "network":
            return self.model
        return self.ema.module

    def validate_ema_or_network(self) -> tuple[float, float, dict]:
        """--ema-keep better: both the average and the network are validated and the better on val stands
        for the epoch (``ema_or_network``); kept_model is then that one. Returns its val loss and accuracy,
        and the history columns that say which it was and what each scored."""
        self._validating = "average"
        average_loss, average_acc = self.validate()
        average_output = self._val_output
        self._validating = "network"
        network_loss, network_acc = self.validate()
        self._validating = ema_or_network(average_acc, network_acc)
        columns = {
            "kept_weights": self._validating,
            "average_val_acc": average_acc,
            "network_val_acc": network_acc,
        }
        if self._validating == "average":
            self._val_output = average_output
            return average_loss, average_acc, columns
        return network_loss, network_acc, columns

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> RunResult | None:
        try:
            return self._run()
        except StorageError as error:
            self.tracking.close("FAILED")
            raise StorageError(error.path, error.free, then=self._after_disk_full()) from error
        except BaseException as error:
            self.tracking.close("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise

    def _after_disk_full(self) -> str:
        """What a user does once space is freed: resume from the last epoch saved, or start again."""
        folder = RunFolder(self.run_dir)
        if folder.state_file.is_file():
            return f"`resfit train --resume {self.run_dir}` continues from the last epoch it saved"
        return f"remove {self.run_dir} (no epoch was saved yet) and train again"

    def _run(self) -> RunResult | None:
        require_tracker_packages(self.config.log)  # on every process, before anything starts
        self.prepare()
        config = self.config  # resolved: every "chosen for you" value decided
        if self.dist.is_main and config.log:
            self.tracking = open_tracking(
                config.log, config.mlflow_uri, self.run_dir, self.resuming, self.say
            )
        progress = {
            "history": [],
            "best_val_acc": -1.0,
            "best_epoch": -1,
            "best_val_loss": math.inf,
            "bad_epochs": 0,
            "done": False,
        }
        state = tensors = None
        if self.resuming:
            state, tensors = load_state(self.run_dir)
            progress = {k: state[k] for k in progress}
            self.say(f"resuming {self.run_dir} after epoch {state['epoch']}")
        history = progress["history"]
        for row in history:  # a resumed run's trackers get every epoch before the kill, each once
            self.tracking.log_epoch(row)
        # A resumed run's clock continues from where the interrupted one stopped.
        elapsed_before = history[-1]["elapsed"] if history else 0.0

        state_saved = time.perf_counter()  # when the resume state was last written (or the run began)

        def record(row: dict, optimizer) -> None:
            nonlocal state_saved
            row["elapsed"] = elapsed_before + time.perf_counter() - self.started
            history.append(row)
            head_stage_kept = progress["best_epoch"] == 0 and history[0]["stage"] == "head"
            improved = replaces_kept_model(
                row["val_acc"],
                progress["best_val_acc"],
                history[0]["val_acc"] if head_stage_kept and row["stage"] == "finetune" else None,
                len(self.source.splits["val"].labels),
                config.keep,
            )
            if improved:
                progress.update(best_val_acc=row["val_acc"], best_epoch=row["epoch"])
            # Early stopping watches fine-tuning only: the probe's loss (no label smoothing, a convex fit)
            # is not comparable, and fine-tuning must get its warm-up before it is judged.
            if row["stage"] == "finetune":
                if row["val_loss"] < progress["best_val_loss"] - 1e-4:
                    progress.update(best_val_loss=row["val_loss"], bad_epochs=0)
                else:
                    progress["bad_epochs"] += 1
            if improved:
                self._kept_val_output = self._val_output
            if self.dist.is_main:
                if improved:
                    best = {"best": {"epoch": row["epoch"], "val_accuracy": row["val_acc"]}}
                    self.folder.write_model(self.kept_model, self.meta | best)
                if row["epoch"] == 0 and config.wise_ft < 1:
                    save_start_weights(self.run_dir, self.kept_model)
                last = row["epoch"] >= config.epochs or stopped_early(progress, config.patience)
                if saves_resume_state(time.perf_counter() - state_saved, config.resume_every, last):
                    save_state(
                        self.run_dir, row["epoch"], self.model, optimizer, progress, self.ema, self.scaler
                    )
                    state_saved = time.perf_counter()
                self.write_history(history)
                self.tracking.log_epoch(row)
            barrier(self.dist)
            self.say(epoch_line(row) + ("  *best" if progress["best_epoch"] == row["epoch"] else ""))

        if state is None and config.head_stage:
            set_backbone_trainable(self.model, False)
            record(self.fit_head(), None)
        elif state is None:
            val_loss, val_acc = self.validate()
            record(
                {
                    "epoch": 0,
                    "stage": "start",
                    "lr": None,
                    "train_loss": None,
                    "train_acc": None,
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "seconds": 0.0,
                },
                None,
            )

        if config.lr == "auto":  # the range test runs where fine-tuning starts: after the head stage
            if state is not None:  # killed during the test: run it again from the saved head
                restore(self.model, None, state, tensors)
            self.choose_lr()
            config = self.config
        self.tracking.log_params(config.to_dict())  # every "auto" resolved, the lr included
        optimizer = self.make_optimizer()
        self.scaler = self.runtime.grad_scaler()
        plan = self.epoch_plan(len(self.source.splits["train"].items)) if config.epochs else []
        if config.ema and plan:
            decay = ema_decay_for(len(plan[0]["sampler"]), config.ema_decay)
            self.ema = make_ema(self.model, decay)
            half_life = math.log(0.5) / math.log(decay)
            beside = (
                "beside the network, the better on val standing for each epoch"
                if config.ema_keep == "better"
                else "alone"
            )
            self.say(
                f"EMA of the weights validated {beside}: half-life {half_life:.0f} steps (decay {decay:.4f})"
            )
        if state is not None:
            # fp16's loss scale too: a fresh scaler would re-learn it, skipping steps the run did take.
            restore(self.model, optimizer, state, tensors, self.ema, self.scaler)
            self.model.to(self.runtime.device, memory_format=torch.channels_last)
        start = (state["epoch"] if state else 0) + 1
        if not progress["done"] and start <= config.epochs:
            self.fine_tune(optimizer, start, progress, record, plan)
        if config.wise_ft < 1 and config.epochs and history[-1]["stage"] == "finetune":
            self.keep_interpolation(progress, history)
        progress["done"] = True
        if self.dist.is_main:
            self.write_history(history, complete=True)
        barrier(self.dist)
        result = self.finish(history, progress) if self.dist.is_main else None
        self.tracking.log_final(self.run_dir)
        self.tracking.close()
        barrier(self.dist)
        shutdown(self.dist)
        return result

    def fine_tune(self, optimizer, start: int, progress: dict, record, plan: list[dict]) -> None:
        config = self.config
        train_transform = self.preprocessing.train_transform(config.augment, config.min_crop_scale)
        if self.sharded:
            train_set = StreamedShards(train_transform, self.source.max_pixels)
        else:
            train_set = ImageDataset(self.source, "train", train_transform, decoded=self.decoded.get("train"))
        criterion = fine_tuning_loss(
            config, self.source.splits["train"].labels, len(self.source.class_names), self.runtime.device
        )
        network = training_network(self.model)
        if self.dist.enabled:
            device = torch.device(self.runtime.device)
            device_ids = [device.index] if device.type == "cuda" else None
            network = nn.parallel.DistributedDataParallel(network, device_ids=device_ids)
        for epoch in range(start, config.epochs + 1):
            if stopped_early(progress, config.patience):
                break
            t0 = time.perf_counter()
            # Batches and each image's augmentation derive from (seed, epoch): a resumed epoch, or N
            # processes sharing it, see exactly what one uninterrupted process would.
            train_set.set_epoch(config.seed, epoch)
            size = plan[epoch - 1]["size"]
            if size != config.img_size or config.multi_scale or config.train_sizes:
                train_set.transform = Preprocessing.for_size(
                    size, self.preprocessing.mean, self.preprocessing.std
                ).train_transform(config.augment, config.min_crop_scale)
                self.say(f"epoch {epoch}: training at {size} px, batch {plan[epoch - 1]['batch']}")
            train_loss, train_acc, lr, images_per_s = self.train_epoch(
                epoch, optimizer, self.scaler, network, train_set, criterion, plan
            )
            if self.ema is not None and config.ema_keep == "better":
                val_loss, val_acc, which = self.validate_ema_or_network()
            else:
                (val_loss, val_acc), which = self.validate(), {}
            record(
                {
                    "epoch": epoch,
                    "stage": "finetune",
                    "lr": lr,
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "seconds": time.perf_counter() - t0,
                    "images_per_s": images_per_s,
                    **which,
                },
                optimizer,
            )
            if stopped_early(progress, config.patience) and epoch < config.epochs:
                self.say(f"early stop: validation loss has not improved for {config.patience} epochs")

    def keep_interpolation(self, progress: dict, history: list[dict]) -> None:
        """--wise-ft: keep the point between the head stage and the last fine-tuned weights, whatever the
        epochs scored on val (a choice made on a few dozen photos favours the epoch that fits them by luck)."""
        t0, share, last = time.perf_counter(), self.config.wise_ft, history[-1]["epoch"]
        model = self.kept_model
        end = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        model.load_state_dict(interpolate_weights(load_start_weights(self.run_dir), end, share))
        val_loss, val_acc = self.validate()
        row = {
            "epoch": last,
            "stage": "wise-ft",
            "lr": None,
            "train_loss": None,
            "train_acc": None,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "seconds": time.perf_counter() - t0,
        }
        row["elapsed"] = history[-1]["elapsed"] + row["seconds"]
        history.append(row)
        progress.update(best_val_acc=val_acc, best_epoch=last)
        self._kept_val_output = self._val_output
        if self.dist.is_main:
            best = {"best": {"epoch": last, "val_accuracy": val_acc, "wise_ft": share}}
            self.folder.write_model(model, self.meta | best)
            self.write_history(history)
        barrier(self.dist)
        self.say(
            epoch_line(row) + f"  kept: {share:g} x epoch {last} + {1 - share:g} x the head stage (--wise-ft)"
        )

    def calibrate(self) -> tuple[dict, dict, np.ndarray]:
        """Fit the kept model's temperature on the validation split, then its "unknown" rule; both go into
        model.json (calibration.calibrate_run, rejection.choose_and_store_rule). Returns both fits and the
        uncalibrated val logits they were fitted on.

        The val outputs are the ones held since the kept model was validated where they are held (no TTA);
        else one pass over val. The knn score also needs the validation photos' features and a bank of
        training features; a run with TTA falls back to msp (its views have no one feature vector) and says so.
        """
        target, score = self.config.reject_target, self.config.reject_score
        tta = self.folder.read_meta().get("tta", "none") != "none"
        val_labels = self.source.splits["val"].labels
        wants_features = (
            score in FEATURE_SCORES and parse_reject_target(target) and not why_no_rule(val_labels)
        )
        if wants_features and tta:
            self.say(f"unknown answers: {score} needs the features of one view, not TTA's; using msp")
            score, wants_features = "msp", False
        # The uncalibrated logits on val, and the features after them where the rule needs them.
        model, meta = self.folder.load_model(calibrated=False, features=wants_features)
        model.to(self.runtime.device, memory_format=torch.channels_last)
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        transform, decoded = preprocessing.eval_transform(), holding(self.decoded, preprocessing)
        output, labels = (self._kept_val_output if not tta else None), np.asarray(val_labels)
        from_cache = None  # the bank's source too: hashing the backbone reads every weight, so only if used
        if output is None or wants_features:
            from_cache = self._outputs_from_feature_cache(model, preprocessing)
        if output is None and from_cache is not None:
            output = from_cache("val")
            if output is not None:
                self.say(
                    "calibration: the head stage's model was kept, so its cached features are read again"
                )
        if output is None:
            val = ImageDataset(self.source, "val", transform, decoded=decoded.get("val"))
            output, labels = predict_logits(model, eval_loader(val, self.config.num_workers), self.runtime)
        raw, features = split_output(output, len(self.source.class_names))
        fit = calibrate_run(self.folder, raw, labels, self.say)
        bank = None
        if wants_features:
            bank = self.feature_bank(model, transform, decoded.get("train"), from_cache)
        else:
            features = None  # held outputs carry them whatever the rule; msp has no use for them
        logits = scaled_logits(raw, fit["temperature"])
        rule = choose_and_store_rule(self.folder, logits, labels, target, score, self.say, features, bank)
        return fit, rule, raw

    def feature_bank(
        self, model: nn.Module, transform, decoded: DecodedImages | None, from_cache=None
    ) -> np.ndarray:
        """The knn rule's bank: the kept model's normalised pooled features of at most MAX_BANK_IMAGES
        training photos (a seeded sample), through the evaluation transform (or from the feature cache:
        ``from_cache``, _outputs_from_feature_cache's function)."""
        dataset = ImageDataset(self.source, "train", transform, decoded=decoded)
        keep = None
        if len(dataset) > MAX_BANK_IMAGES:
            sample = np.random.default_rng(self.config.seed).permutation(len(dataset))[:MAX_BANK_IMAGES]
            keep = sorted(sample.tolist())
        output = from_cache("train", keep) if from_cache else None
        if output is None:
            if keep is not None:
                dataset = torch.utils.data.Subset(dataset, keep)
            output, _ = predict_logits(model, eval_loader(dataset, self.config.num_workers), self.runtime)
        return split_output(output, len(self.source.class_names))[1]

    def finish(self, history: list[dict], progress: dict) -> RunResult:
        """Calibrate the kept (best) model, evaluate it as `resfit evaluate` would (val from the logits the
        temperature was fitted on: the same numbers), write the reports."""
        calibration, rejection, raw_val_logits = self.calibrate()
        results = self.folder.evaluate_and_report(
            self.source,
            self.runtime,
            calibration,
            rejection,
            self.config.num_workers,
            self.decoded,
            raw_val_logits,
        )
        metrics = results["val"]
        seconds = time.perf_counter() - self.started
        self.say(format_metrics_table(metrics))
        self.say(
            f"best epoch {progress['best_epoch']} (val acc {metrics['accuracy']:.4f}); run took {seconds:.0f}s; "
            f"saved to {self.run_dir}"
        )
        return RunResult(self.run_dir, metrics, history, progress["best_epoch"], seconds)


def default_run_dir(model: str) -> Path:
    return Path("runs") / f"{model}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def train(config: TrainConfig, say: Callable[[str], None] | None = None) -> RunResult | None:
    """Train a new run described by ``config``; returns its metrics and folder (None on DDP ranks > 0)."""
    config.validate()
    run_dir = Path(config.out) if config.out else default_run_dir(config.model)
    if RunFolder(run_dir).train_config_file.exists():
        raise RunFolderError(
            f"{run_dir} already holds a run: resume it with --resume {run_dir} or choose another --out"
        )
    return Trainer(config, run_dir, resuming=False, say=say or _print).run()


def resume(run_dir: str | Path, say: Callable[[str], None] | None = None) -> RunResult | None:
    """Continue an interrupted run from the last epoch it saved, with the same schedule and randomness."""
    run_dir = Path(run_dir)
    config = replace(TrainConfig.from_dict(RunFolder(run_dir).read_train_config()), out=str(run_dir))
    return Trainer(config, run_dir, resuming=True, say=say or _print).run()


def lr_find_config(run_or_data: str | Path, overrides: dict | None = None) -> TrainConfig:
    """`resfit lr-find`'s config: an existing run's (a folder with train_config.json), or a new one for a
    dataset, with ``overrides`` (the flags a user gave) on top. The run folder itself is only read."""
    folder = RunFolder(run_or_data)
    if folder.is_started:
        config = replace(TrainConfig.from_dict(folder.read_train_config()), out=None)
        if not Path(config.data).exists() and folder.has_model:
            # The run's data path was relative to where it was trained; model.json holds it resolved.
            config = replace(config, data=folder.read_meta().get("data", {}).get("path", config.data))
    else:
        config = TrainConfig(data=str(run_or_data))
    return replace(config, **(overrides or {}))


def find_lr(
    config: TrainConfig,
    out: str | Path | None = None,
    say: Callable[[str], None] | None = None,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
    steps: int = STEPS,
) -> tuple[RangeTest, Path]:
    """Prepare a run as ``train`` would (scan, weights, head stage), run the range test, write it to ``out``.

    Nothing is trained or kept but the test's json and plot; returns the test and its folder.
    """
    say = say or _print
    config = replace(config, lr="auto")  # the sweep decides; this also refuses a run under torchrun
    config.validate()
    out = Path(out) if out else Path("runs") / f"lr-find-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    # prepare() writes a run's config files; they go to a scratch folder, so `out` never looks like a run.
    with tempfile.TemporaryDirectory(prefix="resfit-lr-find-") as scratch:
        trainer = Trainer(config, Path(scratch), resuming=False, say=say)
        trainer.prepare()
        if config.head_stage:
            set_backbone_trainable(trainer.model, False)
            row = trainer.fit_head()
            say(f"head stage: train loss {row['train_loss']:.4f}, val acc {row['val_acc']:.4f}")
        result = range_test(trainer, start_lr, end_lr, steps)
    write_range_test(result, out)
    return result, out


def _print(message: str) -> None:
    print(message, flush=True)

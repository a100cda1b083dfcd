"""TrainConfig: one dataclass that the CLI and the Python API both build; its defaults are the tested recipe."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..data.decoded_cache import MODES as DECODED_CACHE_MODES
from ..data.splits import SPLIT_SEED, VAL_FRACTION
from ..data.transforms import AUGMENTATIONS
from ..errors import ConfigError
from ..hardware import PRECISIONS, parse_device
from ..model_wrappers import TTA_MODES
from ..models import check_architecture
from ..rejection import DEFAULT_SCORE as DEFAULT_REJECT_SCORE
from ..rejection import DEFAULT_TARGET as DEFAULT_REJECT_TARGET
from ..rejection import SCORES as REJECT_SCORES
from ..rejection import parse_target as parse_reject_target
from .recipe import BALANCE_MODES
from .tracking import check_trackers

OPTIMIZERS = ("adamw", "sgd")
BN_MODES = ("frozen", "train")
DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-2}
MAX_FROZEN_BLOCKS = 5  # stem, layer1..layer4: 5 trains the head alone, on augmented images


@dataclass
class TrainConfig:
    """Two stages: the head on the frozen backbone (a probe fitted on cached features), then full fine-tuning.

    ``lr`` is the head's learning rate in stage 2; each backbone block below gets ``layer_decay`` times less.
    ``None`` means "chosen for you": image size from the weights, batch size from the device, lr per optimizer.
    ``lr="auto"`` runs a learning-rate range test after the head stage and records the lr it suggests.
    """

    data: str = ""
    model: str = "resnet50"
    weights: str = "imagenet"
    epochs: int = 6
    img_size: int | None = None
    batch_size: int | None = None
    lr: float | str | None = None  # a number, None (the optimizer's default) or "auto" (a range test)
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    layer_decay: float = 0.5
    # the lowest backbone blocks fine-tuning leaves as the source trained them; None: 2 (stem + layer1,
    # as detectron2's FREEZE_AT=2) from pretrained weights, 0 from scratch (see default_frozen_blocks)
    frozen_blocks: int | None = None
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    dropout: float = 0.0
    augment: str = "standard"
    min_crop_scale: float = 0.35
    bn: str = "frozen"
    # under torchrun on CUDA with --bn train: BatchNorm statistics over the global batch (CUDA only)
    sync_bn: bool = False
    head_stage: bool = True
    feature_cache: bool = (
        True  # reuse the head stage's pooled features across runs (see data/feature_cache.py)
    )
    decoded_cache: str = "auto"  # auto | on | off: pre-resized images in a memory map (data/decoded_cache.py)
    patience: int = 3
    multi_scale: bool = False  # progressive resizing over --train-sizes (default 0.75x, 0.875x, 1x img-size)
    train_sizes: list[int] | None = None
    ema: bool = False  # validate and keep an exponential moving average of the weights
    ema_decay: float | None = None  # None: a half-life of one epoch
    # WiSE-FT: the kept weights are this share of the last fine-tuned ones plus the rest of the head
    # stage's (1 = the fine-tuned weights alone; 0.5 = the midpoint); below 1 no epoch is picked on val
    wise_ft: float = 1.0
    mixup: float = 0.0  # Beta alpha; 0 = off
    cutmix: float = 0.0  # Beta alpha; 0 = off
    # auto: class-balanced batches when the largest class has >= 3x the smallest's images, else none;
    # sampler (class-balanced batches) | loss (inverse-frequency weights) | none
    balance: str = "auto"
    tta: str = "none"  # stored with the model: predict, evaluate, export and the service all apply it
    # the "unknown" answer, chosen on validation after calibration (coverage:X | precision:X | none)
    reject_target: str = DEFAULT_REJECT_TARGET
    reject_score: str = DEFAULT_REJECT_SCORE  # msp (calibrated top-1 probability) | energy (logsumexp)
    seed: int = SPLIT_SEED
    val_fraction: float = VAL_FRACTION
    exclude_from: str | None = None  # an audit.json (its "exclude" list) or a file of paths to leave out
    device: str = "auto"
    precision: str = "auto"
    num_workers: int | None = None
    out: str | None = None
    quiet: bool = False
    # experiment tracking (train/tracking.py): "tensorboard" and/or "mlflow"; empty = off
    log: list[str] = field(default_factory=list)
    mlflow_uri: str | None = None  # default $MLFLOW_TRACKING_URI, else a SQLite store in the run folder

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("no dataset given")
        check_architecture(self.model)
        parse_device(self.device)
        checks = [
            (self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}"),
            (self.img_size is None or self.img_size >= 32, f"img-size must be >= 32, got {self.img_size}"),
            (
                self.batch_size is None or self.batch_size >= 1,
                f"batch-size must be >= 1, got {self.batch_size}",
            ),
            (
                self.lr in (None, "auto") or (isinstance(self.lr, int | float) and self.lr > 0),
                f"lr must be > 0 or 'auto', got {self.lr!r}",
            ),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.tta in TTA_MODES, f"tta must be one of {TTA_MODES}, got {self.tta!r}"),
            (self.balance in BALANCE_MODES, f"balance must be one of {BALANCE_MODES}, got {self.balance!r}"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix alphas must be >= 0"),
            (
                self.ema_decay is None or 0 < self.ema_decay < 1,
                f"ema-decay must be in (0, 1), got {self.ema_decay}",
            ),
            (
                not self.train_sizes or all(int(s) >= 32 for s in self.train_sizes),
                f"train-sizes must all be >= 32, got {self.train_sizes}",
            ),
            (self.bn in BN_MODES, f"bn must be one of {BN_MODES}, got {self.bn!r}"),
            (self.augment in AUGMENTATIONS, f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (
                self.decoded_cache in DECODED_CACHE_MODES,
                f"decoded-cache must be one of {DECODED_CACHE_MODES}, got {self.decoded_cache!r}",
            ),
            (
                self.frozen_blocks is None or 0 <= self.frozen_blocks <= MAX_FROZEN_BLOCKS,
                f"frozen-blocks must be in 0..{MAX_FROZEN_BLOCKS}, got {self.frozen_blocks}",
            ),
            (0 < self.layer_decay <= 1, f"layer-decay must be in (0, 1], got {self.layer_decay}"),
            (0 <= self.label_smoothing < 1, f"label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.wise_ft <= 1, f"wise-ft must be in [0, 1], got {self.wise_ft}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (0 < self.val_fraction < 1, f"val-fraction must be in (0, 1), got {self.val_fraction}"),
            (0 < self.min_crop_scale <= 1, f"min-crop-scale must be in (0, 1], got {self.min_crop_scale}"),
            (
                not (self.sync_bn and self.device == "cpu"),
                "--sync-bn is for CUDA (SyncBatchNorm has no CPU implementation): drop it with --device cpu",
            ),
            (
                self.epochs > 0 or self.head_stage,
                "with --epochs 0 the head stage is the whole run: keep it on",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        parse_reject_target(self.reject_target)
        if self.reject_score not in REJECT_SCORES:
            raise ConfigError(f"reject-score must be one of {REJECT_SCORES}, got {self.reject_score!r}")
        check_trackers(self.log, self.mlflow_uri)

    @property
    def head_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

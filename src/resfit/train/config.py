"""TrainConfig: one dataclass that the CLI and the Python API both build; its defaults are the tested recipe."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..data.decoded_cache import MODES as DECODED_CACHE_MODES
from ..data.splits import SPLIT_SEED, VAL_FRACTION
from ..data.transforms import AUGMENTATIONS
from ..errors import ConfigError
from ..hardware import PRECISION_HELP, PRECISIONS, parse_device
from ..model_wrappers import TTA_MODES
from ..models import check_architecture
from ..rejection import DEFAULT_SCORE as DEFAULT_REJECT_SCORE
from ..rejection import DEFAULT_TARGET as DEFAULT_REJECT_TARGET
from ..rejection import SCORES as REJECT_SCORES
from ..rejection import parse_target as parse_reject_target
from ..settings import check_choices, int_list, number_or_auto, setting
from .recipe import BALANCE_MODES, EMA_KEEP_RULES, KEEP_RULES
from .tracking import check_trackers, tracker_names

OPTIMIZERS = ("adamw", "sgd")
BN_MODES = ("frozen", "train")
DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-2}
MAX_FROZEN_BLOCKS = 5  # stem, layer1..layer4: 5 trains the head alone, on augmented images


@dataclass(frozen=True)
class TrainConfig:
    """Two stages: the head on the frozen backbone (a probe fitted on cached features), then full fine-tuning.

    ``lr`` is the head's learning rate in stage 2; each backbone block below gets ``layer_decay`` times less.
    ``None`` means "chosen for you": image size from the weights, batch size from the device, lr per optimizer.
    ``lr="auto"`` runs a learning-rate range test after the head stage and records the lr it suggests.
    Frozen: a run decides its defaults into a new config (train/resolve.py) and never changes the caller's.
    """

    data: str = ""  # the command's positional DATA
    model: str = setting("resnet50", help="resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d")
    weights: str = setting("imagenet", help="imagenet (torchvision's weights), none, or a state-dict FILE")
    epochs: int = setting(6, help="fine-tuning epochs after the head stage")
    img_size: int | None = setting(
        None, help="training crop in px (default: what the weights were trained at)"
    )
    batch_size: int | None = setting(None, help="default: chosen for the device")
    lr: float | str | None = setting(
        None,
        parse=number_or_auto,
        help="head learning rate in fine-tuning (default 1e-3 AdamW, 1e-2 SGD); "
        "auto: a range test after the head stage picks it (see resfit lr-find)",
    )
    optimizer: str = setting("adamw", choices=OPTIMIZERS, help="the fine-tuning optimizer")
    weight_decay: float = setting(0.05, help="weight decay in fine-tuning (not on biases and BatchNorm)")
    layer_decay: float = setting(0.5, help="lr factor per block towards the input")
    # None: 2 (stem + layer1, as detectron2's FREEZE_AT=2) from pretrained weights, 0 from scratch
    # (see resolve.default_frozen_blocks)
    frozen_blocks: int | None = setting(
        None,
        help="lowest backbone blocks left untrained in fine-tuning: 0 none, 1 the stem, 2 stem + layer1 "
        "(default from pretrained weights: no backward pass through them, level accuracy in the suite; "
        f"0 from scratch), up to {MAX_FROZEN_BLOCKS}",
    )
    warmup_epochs: float = setting(1.0, help="epochs of linear lr warm-up before the cosine decay")
    label_smoothing: float = setting(0.1, help="label smoothing of the fine-tuning loss")
    dropout: float = setting(0.0, help="dropout before the final layer")
    augment: str = setting(
        "standard",
        choices=AUGMENTATIONS,
        const="trivialaugment",
        help="standard = random resized crop + flip; --augment alone adds TrivialAugment",
    )
    min_crop_scale: float = setting(0.35, help="smallest share of the image a random resized crop keeps")
    bn: str = setting("frozen", choices=BN_MODES, help="BatchNorm statistics in fine-tuning")
    sync_bn: bool = setting(
        False,
        help="CUDA only, under torchrun with --bn train: BatchNorm over the global batch (refused elsewhere)",
    )
    head_stage: bool = setting(True, negate="--no-head-stage", help="skip the frozen-backbone head fit")
    feature_cache: bool = setting(  # see data/feature_cache.py
        True,
        negate="--no-feature-cache",
        help="always recompute the head stage's features (default: cached by weights, preprocessing, image bytes)",
    )
    decoded_cache: str = setting(  # see data/decoded_cache.py
        "auto",
        choices=DECODED_CACHE_MODES,
        help="decode and resize each image once into a memory-mapped cache (auto: at img-size <= 128)",
    )
    # None: 0 with the EMA (the default), 3 with --no-ema (see resolve.default_patience)
    patience: int | None = setting(
        None,
        metavar="N",
        help="early stopping: fine-tuning ends after N epochs without a lower val loss; 0 never "
        "(default 0 with the EMA, whose loss can stay flat while the network beneath still improves; "
        "3 with --no-ema)",
    )
    resume_every: float = setting(
        60.0,
        metavar="SECONDS",
        help="write the resume state at the end of an epoch at most every SECONDS (and after the last epoch); "
        "0: after every epoch",
    )
    multi_scale: bool = setting(
        False, help="progressive resizing: early epochs at smaller sizes, the last at --img-size"
    )
    train_sizes: list[int] | None = setting(
        None,
        parse=int_list,
        metavar="S1,S2,...",
        help="the multi-scale sizes, run small to large (default 0.75x, 0.875x, 1x --img-size)",
    )
    ema: bool = setting(
        True,
        negate="--no-ema",
        help="no exponential moving average of the weights: validate and keep the network alone "
        "(default: an EMA is validated beside it every epoch, see --ema-keep)",
    )
    ema_decay: float | None = setting(
        None, help="the EMA's decay per step (default: a half-life of one epoch, at least 72 steps)"
    )
    ema_keep: str = setting(
        "better",
        choices=EMA_KEEP_RULES,
        help="what each epoch validates: both the EMA and the network, the better on val standing for the "
        "epoch (default; one more pass over val an epoch), or the EMA alone",
    )
    wise_ft: float = setting(
        1.0,
        metavar="SHARE",
        help="keep SHARE x the last fine-tuned weights + (1 - SHARE) x the head stage's (WiSE-FT); "
        "1 keeps the best epoch on val",
    )
    keep: str = setting(
        "best",
        choices=KEEP_RULES,
        help="which validated model the run keeps: best (highest val accuracy) or one-se (the head stage "
        "unless a fine-tuned epoch beats it on val by more than one standard error)",
    )
    mixup: float = setting(0.0, metavar="ALPHA", help="mixup Beta alpha (0 = off)")
    cutmix: float = setting(0.0, metavar="ALPHA", help="cutmix Beta alpha (0 = off)")
    balance: str = setting(
        "auto",
        choices=BALANCE_MODES,
        help="unequal classes: class-balanced batches or inverse-frequency loss weights "
        "(auto: batches balanced when the largest class has >= 3x the smallest's images)",
    )
    tta: str = setting(
        "none",
        choices=TTA_MODES,
        help="test-time augmentation stored with the model (predict, evaluate, export, serve apply it)",
    )
    reject_target: str = setting(
        DEFAULT_REJECT_TARGET,
        metavar="coverage:X|precision:X|none",
        help='the "unknown" answer, its threshold chosen on validation: answer the share X of validation '
        "photos (coverage) or the most confident share whose accuracy is X (precision); none: always answer",
    )
    reject_score: str = setting(
        DEFAULT_REJECT_SCORE,
        choices=REJECT_SCORES,
        help="the score the rule thresholds: distance to the nearest training photos' features (knn), "
        "calibrated top-1 probability (msp) or logsumexp (energy)",
    )
    seed: int = setting(SPLIT_SEED, help="seeds the held-out split, the head's fit and the batch order")
    val_fraction: float = setting(VAL_FRACTION, help="held out when there is no val split")
    exclude_from: str | None = setting(
        None,
        metavar="FILE",
        help="leave out the files listed in FILE: an audit.json (its reviewed 'exclude' list, see "
        "resfit audit) or one path per line, relative to DATA; the files are not touched",
    )
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N (a GPU index)")
    precision: str = setting("auto", choices=PRECISIONS, help=PRECISION_HELP)
    num_workers: int | None = setting(
        None,
        names=("--workers",),
        help="DataLoader workers (default: none on 2 cores, where loading in-process is faster)",
    )
    out: str | None = setting(None, help="run folder (default runs/<model>-<timestamp>)")
    quiet: bool = setting(False, help="no progress bars: one line per epoch, for logs")
    # experiment tracking (train/tracking.py)
    log: list[str] = setting(
        default_factory=list,
        names=("--log", "--track"),
        parse=tracker_names,
        metavar="TRACKERS",
        help="experiment tracking, comma-separated: tensorboard (RUN_DIR/tensorboard), mlflow "
        "(needs pip install 'resfit[track]'; default off); spell it --track under torchrun",
    )
    mlflow_uri: str | None = setting(
        None,
        metavar="URI",
        help="MLflow tracking URI (a server http://HOST:5000 or sqlite:///FILE); default $MLFLOW_TRACKING_URI, "
        "else sqlite in RUN_DIR/mlflow",
    )

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("no dataset given")
        check_architecture(self.model)
        parse_device(self.device)
        check_choices(self)
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
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix alphas must be >= 0"),
            (
                self.ema_decay is None or 0 < self.ema_decay < 1,
                f"ema-decay must be in (0, 1), got {self.ema_decay}",
            ),
            (
                not self.train_sizes or all(int(s) >= 32 for s in self.train_sizes),
                f"train-sizes must all be >= 32, got {self.train_sizes}",
            ),
            (
                self.frozen_blocks is None or 0 <= self.frozen_blocks <= MAX_FROZEN_BLOCKS,
                f"frozen-blocks must be in 0..{MAX_FROZEN_BLOCKS}, got {self.frozen_blocks}",
            ),
            (0 < self.layer_decay <= 1, f"layer-decay must be in (0, 1], got {self.layer_decay}"),
            (0 <= self.label_smoothing < 1, f"label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.resume_every >= 0, f"resume-every must be >= 0 seconds, got {self.resume_every}"),
            (
                self.patience is None or self.patience >= 0,
                f"patience must be >= 0 (0: never), got {self.patience}",
            ),
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

"""Building torchvision ResNets, loading pretrained weights, replacing the head, freezing, param groups."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data.transforms import MIN_SIZE, Preprocessing
from .errors import ConfigError, WeightsError
from .torchvision_import import models as tv_models

ARCHITECTURES: dict[str, str] = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "resnet152": "ResNet152_Weights",
    "resnext50_32x4d": "ResNeXt50_32X4D_Weights",
    "resnext101_32x8d": "ResNeXt101_32X8D_Weights",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Backbone blocks from input to output: the order layer-wise learning rates decay along.
BLOCKS = ("stem", "layer1", "layer2", "layer3", "layer4")


@dataclass
class PretrainedSource:
    """What the starting weights were, and the preprocessing they were trained with."""

    kind: str  # "imagenet" | "file" | "none"
    description: str
    state_dict: dict[str, torch.Tensor] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_size: int | None = None  # resolution the weights were trained at, when known
    resize_size: int | None = None
    card: dict = field(default_factory=dict)
    members: list[PretrainedSource] = field(default_factory=list)  # a fused model: one source per backbone

    def to_dict(self) -> dict:
        if self.members:
            return {
                "kind": "fused",
                "description": self.description,
                "crop_size": self.crop_size,
                "members": [member.to_dict() for member in self.members],
            }
        return {
            "kind": self.kind,
            "description": self.description,
            "crop_size": self.crop_size,
            "card": {
                k: self.card[k] for k in ("file", "sha256", "val_top1", "architecture") if k in self.card
            },
        }


def fused_members(arch: str) -> list[str]:
    """The backbones of a fused architecture ("resnet50+resnet101"), or [arch] for a single one."""
    return arch.split("+")


def check_architecture(arch: str) -> None:
    members = fused_members(arch)
    for member in members:
        if member not in ARCHITECTURES:
            raise ConfigError(
                f"unknown model {member!r}: choose one of {', '.join(ARCHITECTURES)}, "
                "or two joined by '+' (e.g. resnet50+resnet101) for one network holding both"
            )
    if len(members) > 1 and len(set(members)) != len(members):
        raise ConfigError(f"a fused model needs distinct backbones, got {arch!r}")


class FusedResNet(nn.Module):
    """Several ResNet backbones side by side: their pooled features, concatenated, feed one linear head.

    Unlike a late-fusion ensemble, the head learns how to weigh each backbone's features per class, and
    fine-tuning trains all of it end to end. State-dict keys are ``backbones.<i>.<torchvision key>`` and ``fc.*``.
    """

    def __init__(self, archs: list[str], num_classes: int, dropout: float = 0.0):
        super().__init__()
        backbones, in_features = [], 0
        for arch in archs:
            backbone = getattr(tv_models, arch)(weights=None)
            in_features += backbone.fc.in_features
            backbone.fc = nn.Identity()
            backbones.append(backbone)
        self.archs = list(archs)
        self.backbones = nn.ModuleList(backbones)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([backbone(images) for backbone in self.backbones], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(images)))


def build_model(arch: str, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """A torchvision ResNet with an N-class head; dropout sits in the pooling so state-dict keys stay torchvision's.

    ``"resnet50+resnet101"`` builds a FusedResNet: both backbones, one head on their concatenated features.
    """
    check_architecture(arch)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    if len(fused_members(arch)) > 1:
        return FusedResNet(fused_members(arch), num_classes, dropout)
    model = getattr(tv_models, arch)(weights=None, num_classes=num_classes)
    if dropout > 0:
        model.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Dropout(dropout))
    return model


def imagenet_weights_enum(arch: str):
    """torchvision's best ImageNet weights for ``arch``: IMAGENET1K_V2 where it exists, else V1."""
    check_architecture(arch)
    weights_cls = getattr(tv_models, ARCHITECTURES[arch])
    return getattr(weights_cls, "IMAGENET1K_V2", None) or weights_cls.IMAGENET1K_V1


def imagenet_cache_path(arch: str) -> Path:
    """Where torchvision's weights API caches the file: $TORCH_HOME/hub/checkpoints/<name from the URL>."""
    url = imagenet_weights_enum(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _load_imagenet(arch: str) -> PretrainedSource:
    weights = imagenet_weights_enum(arch)
    cached = imagenet_cache_path(arch)
    if cached.is_file():
        state_dict = _load_state_file(cached)
    else:
        try:
            state_dict = weights.get_state_dict(progress=True)  # downloads into the same cache
        except Exception as error:  # noqa: BLE001 - urllib/ssl/OS errors alike mean "no download"
            raise WeightsError(
                f"ImageNet weights for {arch} ({weights}) are not cached at {cached} and could not be "
                f"downloaded ({type(error).__name__}: {error}). Download {weights.url} and save it as {cached} "
                f"(or set TORCH_HOME), or pass --weights FILE / --weights none"
            ) from error
    preprocess = weights.transforms()
    return PretrainedSource(
        kind="imagenet",
        description=f"torchvision {arch} {weights} ({cached.name})",
        state_dict=state_dict,
        mean=tuple(preprocess.mean),
        std=tuple(preprocess.std),
        crop_size=int(preprocess.crop_size[0]),
        resize_size=int(preprocess.resize_size[0]),
    )


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only: .safetensors, or a .pth read with weights_only=True, which refuses pickled code."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:  # noqa: BLE001 - safetensors raises several types for bad files
            raise WeightsError(f"{path}: not a readable safetensors file ({error})") from error
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise WeightsError(
                f"{path}: refused to load: it holds pickled objects, not just tensors "
                f"(only weights_only checkpoints are loaded; {str(error).splitlines()[0]})"
            ) from error
        except Exception as error:  # noqa: BLE001 - a malformed file makes the unpickler raise any type
            raise WeightsError(
                f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})"
            ) from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _read_card(path: Path) -> dict:
    """A JSON card beside the weights (same stem) may state the resolution and normalisation they were trained at.

    A card that is there but unreadable, or states impossible values, is refused: silently ignoring it
    would train with the wrong normalisation.
    """
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        return {}
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"weights card {card_path}: not readable JSON ({error})") from None
    if not isinstance(card, dict):
        raise WeightsError(f"weights card {card_path}: expected a JSON object, got {type(card).__name__}")
    return card


def _card_preprocessing(card: dict, card_path: Path) -> tuple[tuple | None, tuple | None, int | None]:
    """(mean, std, train size) the card states, each None where it says nothing; values are range-checked."""
    recipe = card.get("recipe", {})
    if not isinstance(recipe, dict):
        raise WeightsError(f"weights card {card_path}: recipe must be an object")
    key = "normalisation" if "normalisation" in recipe else "normalization"
    norm = recipe.get(key) or {}
    size = recipe.get("train_size_px")
    if not isinstance(norm, dict):
        raise WeightsError(f"weights card {card_path}: recipe.{key} must be an object with mean and std")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
        raise WeightsError(f"weights card {card_path}: recipe.train_size_px must be an integer, got {size!r}")
    mean, std = norm.get("mean"), norm.get("std")
    if (mean is None) != (std is None):
        raise WeightsError(f"weights card {card_path}: recipe.{key} needs both mean and std")
    try:
        Preprocessing.from_dict(
            {
                "crop_size": MIN_SIZE if size is None else size,
                "resize_size": MIN_SIZE if size is None else size,
                "mean": mean if mean is not None else IMAGENET_MEAN,
                "std": std if std is not None else IMAGENET_STD,
            }
        )
    except ConfigError as error:
        field = f"recipe.{key}." if not str(error).startswith(("crop_size", "resize_size")) else ""
        message = str(error).replace("crop_size", "recipe.train_size_px", 1)
        raise WeightsError(f"weights card {card_path}: {field}{message}") from None
    as_tuple = (lambda values: tuple(float(v) for v in values)) if mean is not None else (lambda _: None)
    return as_tuple(mean), as_tuple(std), size


def _load_file(path: Path) -> PretrainedSource:
    state_dict = _load_state_file(path)
    card = _read_card(path)
    source = PretrainedSource(kind="file", description=str(path), state_dict=state_dict, card=card)
    mean, std, size = _card_preprocessing(card, path.with_suffix(".json"))
    if mean is not None:
        source.mean, source.std = mean, std
    if size is not None:
        source.crop_size = size
    # A previous resfit run's weights (model.safetensors) have its model.json as their card (the same
    # stem), and that states the preprocessing they were trained with: reuse it.
    if path.suffix == ".safetensors" and "preprocessing" in card:
        card_path = path.with_suffix(".json")
        try:
            prep = Preprocessing.from_dict(card["preprocessing"])
        except (KeyError, TypeError, AttributeError) as error:
            raise WeightsError(f"{card_path}: its preprocessing cannot be read ({error})") from None
        except ConfigError as error:
            raise WeightsError(f"{card_path}: preprocessing.{error}") from None
        source.mean, source.std, source.crop_size = prep.mean, prep.std, prep.crop_size
    return source


def load_pretrained(arch: str, weights: str) -> PretrainedSource:
    """Resolve ``--weights``: 'imagenet' (torchvision's API and cache), 'none', or a state-dict file.

    A fused model takes one source per backbone, comma-separated in backbone order ("A.pth,B.pth"), or
    one word ('imagenet', 'none') for all of them.
    """
    check_architecture(arch)
    if len(fused_members(arch)) > 1:
        return _load_fused(fused_members(arch), weights)
    if weights == "imagenet":
        return _load_imagenet(arch)
    if weights in ("none", "scratch", ""):
        return PretrainedSource(kind="none", description="none (trained from scratch)")
    return _load_file(Path(weights).expanduser())


def _load_fused(archs: list[str], weights: str) -> PretrainedSource:
    parts = [part.strip() for part in weights.split(",")]
    if len(parts) == 1:
        parts = parts * len(archs)
    if len(parts) != len(archs):
        raise ConfigError(
            f"{'+'.join(archs)} needs {len(archs)} weights, one per backbone (--weights A,B), got {weights!r}"
        )
    members = [load_pretrained(arch, part) for arch, part in zip(archs, parts, strict=True)]
    first = members[0]
    for arch, member in zip(archs[1:], members[1:], strict=True):
        if (member.mean, member.std) != (first.mean, first.std):
            raise WeightsError(
                f"the {archs[0]} and {arch} sources were trained with different normalisation "
                f"({first.mean}/{first.std} vs {member.mean}/{member.std}); one fused input cannot suit both"
            )
    sizes = [m.crop_size for m in members if m.crop_size]
    kinds = {m.kind for m in members}
    return PretrainedSource(
        kind=kinds.pop() if len(kinds) == 1 else "mixed",
        description=" + ".join(f"{arch}: {m.description}" for arch, m in zip(archs, members, strict=True)),
        mean=first.mean,
        std=first.std,
        crop_size=max(sizes) if sizes else None,
        resize_size=first.resize_size,
        members=members,
    )


def is_head_key(key: str) -> bool:
    return key.startswith("fc.")


def apply_pretrained(model: nn.Module, source: PretrainedSource) -> None:
    """Copy the backbone from ``source`` into ``model``; the head is new, whatever size the source's was."""
    if isinstance(model, FusedResNet):
        for backbone, member in zip(model.backbones, source.members, strict=True):
            apply_pretrained(backbone, member)
        return
    if source.state_dict is None:
        return
    own = model.state_dict()
    incoming = {k: v for k, v in source.state_dict.items() if not is_head_key(k)}
    expected = {k for k in own if not is_head_key(k)}
    missing = sorted(expected - incoming.keys())
    unexpected = sorted(incoming.keys() - expected)
    wrong_shape = sorted(k for k in expected & incoming.keys() if own[k].shape != incoming[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if wrong_shape:
            shapes = ", ".join(
                f"{k}: {tuple(incoming[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape[:3]
            )
            parts.append(f"{len(wrong_shape)} with other shapes ({shapes})")
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:5])})")
        raise WeightsError(
            f"the weights in {source.description} do not match the {type(model).__name__} backbone: "
            + "; ".join(parts)
        )
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in incoming.items()}})


def head(model: nn.Module) -> nn.Linear:
    return model.fc


def backbones(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, ResNet) for each backbone: the model itself, or each member of a fused model."""
    if isinstance(model, FusedResNet):
        return [(arch, backbone) for arch, backbone in zip(model.archs, model.backbones, strict=True)]
    return [("", model)]


def backbone_blocks(model: nn.Module) -> Iterator[tuple[str, int, list[nn.Module]]]:
    """Every backbone in order from input to output, as (block name, depth 0..4, modules): stem, layer1..layer4.

    In a fused model each backbone yields its own five blocks (named ``resnet50.layer3`` etc.), so each
    gets the same layer-wise learning-rate profile.
    """
    for prefix, backbone in backbones(model):
        name = f"{prefix}." if prefix else ""
        yield f"{name}stem", 0, [backbone.conv1, backbone.bn1]
        for depth, block in enumerate(BLOCKS[1:], start=1):
            yield f"{name}{block}", depth, [getattr(backbone, block)]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = trainable or is_head_key(name)


def freeze_lowest_blocks(model: nn.Module, count: int) -> list[nn.Module]:
    """Stop gradients in each backbone's ``count`` lowest blocks (1 = the stem, 2 = stem and layer1, ...).

    Those blocks hold generic edges and textures, and layer-wise decay gives them a tiny lr anyway; with
    nothing below them to train, autograd also skips their backward pass, a large share of a step's
    compute at full resolution. Returns the frozen modules, whose BatchNorms must stay in eval mode.
    """
    frozen = [module for _, depth, modules in backbone_blocks(model) if depth < count for module in modules]
    for module in frozen:
        for param in module.parameters():
            param.requires_grad = False
    return frozen


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm in eval mode: running statistics from the source stay fixed while weights train."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def layerwise_param_groups(
    model: nn.Module, head_lr: float, layer_decay: float, weight_decay: float
) -> list[dict]:
    """Discriminative learning rates: the head gets ``head_lr``, each block below it ``layer_decay`` times less.

    Norm weights and biases get no weight decay: decaying them only fights the normalisation.
    """
    groups: list[dict] = []
    head_depth = len(BLOCKS)
    named_blocks = list(backbone_blocks(model)) + [("head", head_depth, [model.fc])]
    for name, depth, modules in named_blocks:
        lr = head_lr * layer_decay ** (head_depth - depth)
        decay, no_decay = [], []
        for module in modules:
            for param_name, param in module.named_parameters():
                if not param.requires_grad:
                    continue
                (no_decay if param.ndim <= 1 or param_name.endswith(".bias") else decay).append(param)
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "block": name})
    return groups


def feature_dim(model: nn.Module) -> int:
    return model.fc.in_features


def forward_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled backbone features (the head's input), for the cached head-training stage."""
    if isinstance(model, FusedResNet):
        return model.features(images)
    x = model.conv1(images)
    x = model.maxpool(model.relu(model.bn1(x)))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)

"""The one preprocessing definition: stored in model.json, used by training, evaluation, predict and export."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from PIL import Image

from ..errors import ConfigError
from ..torchvision_import import transforms as T

INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
AUGMENTATIONS = ("none", "standard", "trivialaugment", "randaugment")
# The usual ImageNet ratio of crop to resize (224/256): evaluation sees the centre, as the weights did.
CROP_RATIO = 0.875
# The longest image resized whole, in short sides; a longer one is centre-cropped to this first (the centre
# crop needs 0.875 of a short side). Memory then no longer depends on the aspect ratio: a 1x20000 strip
# resized to a 128 px short side would otherwise be 2.5 million px long. Below the cap nothing changes.
MAX_ASPECT = 8
MIN_SIZE = 32
MAX_CROP = 2048  # px; 4x the largest crop torchvision's ImageNet weights use
MAX_RESIZE_RATIO = 4


def _three_finite(values) -> bool:
    return (
        isinstance(values, tuple)
        and len(values) == 3
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )


def _as_floats(values) -> tuple:
    """Numbers as floats (1 and 1.0 alike); anything else left for the range check to name."""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return tuple(float(v) for v in values) if numbers else tuple(values)


def _whole_number(value):
    """An int (or a float with no fraction, as JSON writers sometimes give) as int; anything else unchanged."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class CentreCropToAspect:
    """The centre of an image at most ``max_aspect`` times as long as it is wide (a no-op for most photos)."""

    def __init__(self, max_aspect: float = MAX_ASPECT):
        self.max_aspect = max_aspect

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        limit = max(1, math.ceil(min(width, height) * self.max_aspect))
        if max(width, height) <= limit:
            return image
        if width > height:
            left = (width - limit) // 2
            return image.crop((left, 0, left + limit, height))
        top = (height - limit) // 2
        return image.crop((0, top, width, top + limit))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_aspect={self.max_aspect})"


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to ``resize_size``, centre-crop ``crop_size``, scale to [0, 1], normalise."""

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        """Values that would make every prediction NaN, allocate without bound or fail at the first image."""
        problems = [
            (
                isinstance(self.crop_size, int) and MIN_SIZE <= self.crop_size <= MAX_CROP,
                f"crop_size must be an integer from {MIN_SIZE} to {MAX_CROP}, got {self.crop_size!r}",
            ),
            (
                isinstance(self.resize_size, int)
                and self.resize_size >= MIN_SIZE
                # a resize far above the crop wastes memory and time on pixels the crop throws away
                and (
                    not isinstance(self.crop_size, int)
                    or self.resize_size <= MAX_RESIZE_RATIO * self.crop_size
                ),
                f"resize_size must be an integer from {MIN_SIZE} to {MAX_RESIZE_RATIO}x crop_size, "
                f"got {self.resize_size!r}",
            ),
            (
                _three_finite(self.mean),
                f"mean must be 3 finite numbers (R, G, B), got {list(self.mean)!r}",
            ),
            (
                _three_finite(self.std) and all(v > 0 for v in self.std),
                f"std must be 3 finite numbers above 0 (R, G, B), got {list(self.std)!r}",
            ),
            (
                isinstance(self.interpolation, str) and self.interpolation in INTERPOLATIONS,
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}",
            ),
        ]
        for ok, message in problems:
            if not ok:
                raise ConfigError(message)  # starts with the field's name: callers say where it came from

    @classmethod
    def for_size(cls, crop_size: int, mean, std, interpolation: str = "bilinear") -> Preprocessing:
        if not MIN_SIZE <= crop_size <= MAX_CROP:
            raise ConfigError(f"image size must be from {MIN_SIZE} to {MAX_CROP} px, got {crop_size}")
        return cls(crop_size, round(crop_size / CROP_RATIO), tuple(mean), tuple(std), interpolation)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        """From model.json's "preprocessing"; a missing or wrong-typed field is a ConfigError that starts
        with the field's name."""
        if not isinstance(data, dict):
            raise ConfigError(f"must be an object, got {type(data).__name__}")
        for name in ("crop_size", "resize_size", "mean", "std"):
            if name not in data:
                raise ConfigError(f"{name} is missing")
        for name in ("mean", "std"):
            if not isinstance(data[name], list | tuple):
                raise ConfigError(f"{name} must be a list of 3 numbers, got {data[name]!r}")
        return cls(
            crop_size=_whole_number(data["crop_size"]),
            resize_size=_whole_number(data["resize_size"]),
            mean=_as_floats(data["mean"]),
            std=_as_floats(data["std"]),
            interpolation=data.get("interpolation", "bilinear"),
        )

    def to_dict(self) -> dict:
        return asdict(self) | {
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": "RGB",
            "scale": "1/255",
        }

    def _interpolation(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"unknown interpolation {self.interpolation!r}")
        return INTERPOLATIONS[self.interpolation]

    def eval_transform(self) -> T.Compose:
        return T.Compose(
            [
                CentreCropToAspect(),
                T.Resize(self.resize_size, interpolation=self._interpolation(), antialias=True),
                T.CenterCrop(self.crop_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def train_transform(self, augment: str = "standard", min_scale: float = 0.35) -> T.Compose:
        """Random-resized crop + flip; optionally TrivialAugment or RandAugment on top."""
        if augment not in AUGMENTATIONS:
            raise ConfigError(f"unknown augmentation {augment!r}: choose one of {', '.join(AUGMENTATIONS)}")
        if augment == "none":
            return self.eval_transform()
        steps = [
            T.RandomResizedCrop(
                self.crop_size, scale=(min_scale, 1.0), interpolation=self._interpolation(), antialias=True
            ),
            T.RandomHorizontalFlip(),
        ]
        if augment == "trivialaugment":
            steps.append(T.TrivialAugmentWide(interpolation=self._interpolation()))
        elif augment == "randaugment":
            steps.append(T.RandAugment(interpolation=self._interpolation()))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

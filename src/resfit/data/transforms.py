"""The one preprocessing definition: stored in model.json, used by training, evaluation, predict and export."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError
from ..vision import transforms as T

INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
AUGMENTATIONS = ("none", "standard", "trivialaugment", "randaugment")
# The usual ImageNet ratio of crop to resize (224/256): evaluation sees the centre, as the weights did.
CROP_RATIO = 0.875


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to ``resize_size``, centre-crop ``crop_size``, scale to [0, 1], normalise."""

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def for_size(cls, crop_size: int, mean, std, interpolation: str = "bilinear") -> Preprocessing:
        if crop_size < 32:
            raise ConfigError(f"image size must be at least 32 px, got {crop_size}")
        return cls(crop_size, round(crop_size / CROP_RATIO), tuple(mean), tuple(std), interpolation)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            crop_size=int(data["crop_size"]),
            resize_size=int(data["resize_size"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
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

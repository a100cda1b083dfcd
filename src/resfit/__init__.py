"""resfit: fine-tune ImageNet ResNet-50/101 on a folder of images, evaluate, predict and ship the result.

import resfit
result = resfit.train(resfit.TrainConfig(data="photos/", weights="imagenet"))
resfit.load(result.run_dir).predict("cat.jpg")
"""

__version__ = "0.1.0"

from .predict import Classifier, load  # noqa: E402
from .train import RunResult, TrainConfig, resume, train  # noqa: E402

__all__ = ["Classifier", "RunResult", "TrainConfig", "load", "resume", "train", "__version__"]

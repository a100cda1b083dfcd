"""resfit: fine-tune ImageNet ResNet-50/101 on a folder of images, evaluate, predict and ship the result.

import resfit
result = resfit.train(resfit.TrainConfig(data="photos/", weights="imagenet"))
resfit.load(result.run_dir).predict("cat.jpg")
"""

from .inference.classifier import Classifier, load
from .train import RunResult, TrainConfig, resume, train
from .version import __version__

__all__ = ["Classifier", "RunResult", "TrainConfig", "load", "resume", "train", "__version__"]

"""Inference: a run folder becomes a Classifier (classifier.py) running on the fastest engine this machine has
(engines.py: eager PyTorch, ONNX Runtime, OpenVINO), from exports made once and cached (export_cache.py) in
the formats an engine reads (formats.py). The weights are read once per load."""

from .classifier import Classifier, InferenceConfig, load

__all__ = ["Classifier", "InferenceConfig", "load"]

"""Import torchvision cleanly, even against a CPU torch wheel its compiled extension was not built for.

torchvision 0.28's `_C` extension fails to load against the CPU build of torch 2.13, and its Python
code then dies registering fake kernels for ``torchvision::nms``/``qnms``. resfit uses only the
models, transforms and weights API (never ``torchvision.io`` or ``torchvision.ops``), so when that
import fails we declare the two operator schemas ourselves and import again. Everything in resfit
imports torchvision from here.
"""

from __future__ import annotations

import sys
import warnings

import torch

_MISSING_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _import_torchvision():
    with warnings.catch_warnings():
        # The image/video extension warnings concern torchvision.io, which resfit never uses.
        warnings.filterwarnings("ignore", message=r".*(image|video).*extension.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*torchvision.*_C.*", category=UserWarning)
        try:
            import torchvision
        except RuntimeError as error:
            if "torchvision::" not in str(error):
                raise
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
            library = torch.library.Library("torchvision", "DEF")
            for schema in _MISSING_OPS:
                library.define(schema)
            import torchvision
        else:
            library = None
        from torchvision import models, transforms  # noqa: F401 - import-time side effects happen here
    return torchvision, library


# The Library object must stay referenced: torch drops its definitions when it is garbage collected.
torchvision, _op_schemas = _import_torchvision()
models = torchvision.models
transforms = torchvision.transforms

__all__ = ["torchvision", "models", "transforms"]

"""Resume state: tensors in safetensors, everything else in JSON; never a pickle.

What a run needs to continue after an epoch (model, optimizer, EMA, loss scale, every RNG) packed into
tensors and plain values; RunFolder writes them (``write_resume``: the JSON last, so a kill at any moment
leaves the last complete epoch resumable) and reads them back.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..run_folder import RunFolder


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    py_version, py_internal, py_gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {
        "rng.torch": torch.get_rng_state(),
        "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64)),
    }
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict[str, torch.Tensor]]:
    if optimizer is None:
        return {}, {}
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    return {"param_groups": state["param_groups"], "scalars": scalars}, tensors


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, meta: dict, tensors: dict[str, torch.Tensor]
) -> None:
    per_param: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, param_id, key = name.split(".", 2)
            per_param.setdefault(int(param_id), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        param_id, key = name.split(".", 1)
        per_param.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


def saves_resume_state(seconds_since_saved: float, every_s: float, last_epoch: bool) -> bool:
    """Whether the end of this epoch writes the resume state (TrainConfig.resume_every).

    A state is the model and the optimizer's moments (268 MB for ResNet-50): after every epoch of a
    30-second run its writes were 8% of the run (README, "Where the time goes"), while a crash loses at most
    ``every_s`` plus one epoch of training. The last epoch's is always written: a run killed while it
    evaluates resumes without training again.
    """
    return last_epoch or every_s <= 0 or seconds_since_saved >= every_s


def save_state(
    run_dir: Path,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    progress: dict,
    ema: nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Save everything needed to continue after ``epoch`` (0 = after the head stage).

    ``scaler``: fp16's GradScaler; its loss scale and growth counter are plain numbers, kept in the JSON.
    """
    rng_meta, rng_tensors = rng_state()
    optim_meta, optim_tensors = _optimizer_tensors(optimizer)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    tensors.update(optim_tensors)
    tensors.update(rng_tensors)
    state = {
        "optimizer": optim_meta,
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": rng_meta,
        **progress,
    }
    RunFolder(run_dir).write_resume(epoch, tensors, state)


def load_state(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return RunFolder(run_dir).read_resume()


def restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
    tensors: dict,
    ema: nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None and any(k.startswith("ema.") for k in tensors):
        ema.load_state_dict({k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")})
    if optimizer is not None and state.get("optimizer"):
        _restore_optimizer(optimizer, state["optimizer"], tensors)
    # A disabled scaler (fp32, bf16) saves {}; a state from before scalers were saved has none.
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], tensors)


def save_start_weights(run_dir: Path, model: nn.Module) -> None:
    """The weights after the head stage (where fine-tuning starts): --wise-ft's other end."""
    RunFolder(run_dir).write_start_weights(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    )


def load_start_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return RunFolder(run_dir).read_start_weights()

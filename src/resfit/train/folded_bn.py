"""The network fine-tuning runs: the model with every frozen BatchNorm folded into the convolution before it.

A BatchNorm in eval mode (resfit's default ``--bn frozen``, and always in ``--frozen-blocks``) is an affine
map per channel, so ``bn(conv(x, W))`` equals ``conv(x, W * s) + (beta - mean * s)`` with
``s = gamma / sqrt(var + eps)``. Computing the folded weight each step costs a few kilobytes of arithmetic;
it saves BatchNorm's forward and backward passes over every activation, which are memory-bound and about a
tenth of a ResNet-50 step on a CPU without native bf16 (issue #17). Gradients still reach the convolution's
weight and BatchNorm's gamma and beta through the fold, so the optimizer, the saved weights, EMA and DDP see
the same parameters as before; only float rounding differs.

The view shares every parameter and buffer with the model (nothing is copied), keeps torchvision's own
``forward`` methods (a shallow copy of each container, with each conv/BatchNorm pair swapped for one
module), and falls back to ``bn(conv(x))`` whenever a BatchNorm is in training mode, so it is correct under
``--bn train`` as well.
"""

from __future__ import annotations

import copy
from itertools import pairwise

import torch
from torch import nn


class FoldedConvBN(nn.Module):
    """``bn(conv(x))`` as one convolution while ``bn`` is in eval mode with running statistics."""

    def __init__(self, conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        if bn.training or bn.running_var is None:
            return bn(conv(x))
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        return conv._conv_forward(x, conv.weight * scale.reshape(-1, 1, 1, 1), shift)


def _pairs(module: nn.Module) -> dict[str, str]:
    """{conv child name: BatchNorm child name} for each BatchNorm registered right after a conv feeding it.

    torchvision's ResNet, Bottleneck, BasicBlock and downsample Sequential register each BatchNorm right
    after the convolution whose output it normalises, and their ``forward`` applies it right after.
    """
    children = list(module.named_children())
    pairs = {}
    for (conv_name, conv), (bn_name, bn) in pairwise(children):
        if (
            isinstance(conv, nn.Conv2d)
            and isinstance(bn, nn.BatchNorm2d)
            and conv.out_channels == bn.num_features
        ):
            pairs[conv_name] = bn_name
    return pairs


def folded_view(module: nn.Module) -> nn.Module:
    """``module`` with each conv -> BatchNorm pair computed as one FoldedConvBN; parameters are shared."""
    children = dict(module.named_children())
    if not children:
        return module
    view = copy.copy(module)  # the same parameters, buffers and forward; its own table of children
    view._modules = {}
    pairs = _pairs(module)
    folded_bns = set(pairs.values())
    for name, child in children.items():
        if name in pairs:
            view._modules[name] = FoldedConvBN(child, children[pairs[name]])
        elif name in folded_bns:
            view._modules[name] = nn.Identity()
        else:
            view._modules[name] = folded_view(child)
    return view


def training_network(model: nn.Module) -> nn.Module:
    """What fine-tuning runs forward and backward through: ``model`` with its frozen BatchNorms folded."""
    return folded_view(model)

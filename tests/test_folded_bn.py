"""Fine-tuning's folded-BatchNorm network computes what the model computes, with the model's own parameters."""

import pytest
import torch
from torch import nn

from resfit.models import build_model, freeze_batchnorm, freeze_lowest_blocks
from resfit.train.folded_bn import FoldedConvBN, training_network


def _model_with_real_statistics(arch: str) -> nn.Module:
    """A float64 model whose BatchNorms are far from identity maps, so a wrong fold cannot hide."""
    torch.manual_seed(0)
    model = build_model(arch, 5).double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.3, 3)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model


def _output_and_grads(network: nn.Module, model: nn.Module, images: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = network(images)
    (logits * torch.linspace(-1, 1, logits.shape[1], dtype=logits.dtype)).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d", "resnet18+resnet34"])
def test_folded_network_matches_the_model_in_outputs_and_gradients(arch):
    model = _model_with_real_statistics(arch)
    model.train()
    freeze_batchnorm(model)
    network = training_network(model)
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert batchnorms > 0
    assert sum(isinstance(m, FoldedConvBN) for m in network.modules()) == batchnorms
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected, expected_grads = _output_and_grads(model, model, images)
    got, got_grads = _output_and_grads(network, model, images)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert expected_grads.keys() == got_grads.keys() and len(got_grads) > 10
    for name, grad in expected_grads.items():  # conv weights, BN gamma/beta and the head
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-8, atol=1e-9, msg=name)


def test_folded_network_shares_the_model_parameters_and_saves_nothing_of_its_own():
    model = _model_with_real_statistics("resnet18")
    network = training_network(model)
    assert {id(p) for p in network.parameters()} == {id(p) for p in model.parameters()}
    assert list(model.state_dict()) == list(build_model("resnet18", 5).state_dict())
    with torch.no_grad():  # an optimizer step on the network's parameters is a step on the model's
        next(network.parameters()).add_(1.0)
    assert torch.equal(next(network.parameters()), next(model.parameters()))


def test_batchnorm_in_training_mode_is_not_folded_and_still_updates_its_statistics():
    model = _model_with_real_statistics("resnet18")
    model.train()
    freeze_lowest_blocks(model, 1)
    freeze_batchnorm(model.conv1)
    freeze_batchnorm(model.bn1)  # the stem's BatchNorm frozen, every other one in training mode
    reference = _model_with_real_statistics("resnet18")
    reference.load_state_dict(model.state_dict())
    reference.train()
    freeze_batchnorm(reference.bn1)
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    got = training_network(model)(images)
    torch.testing.assert_close(got, reference(images), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model.layer1[0].bn1.running_mean, reference.layer1[0].bn1.running_mean)
    assert not torch.equal(
        model.layer1[0].bn1.running_mean, _model_with_real_statistics("resnet18").layer1[0].bn1.running_mean
    )

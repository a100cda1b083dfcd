"""Weights: torchvision's ImageNet API and cache, state-dict files, safety, head replacement, param groups."""

from __future__ import annotations

import os

import pytest
import torch

from resfit.errors import WeightsError
from resfit.models import (
    apply_pretrained,
    build_model,
    freeze_lowest_blocks,
    imagenet_cache_path,
    layerwise_param_groups,
    load_pretrained,
    set_backbone_trainable,
)
from resfit.torchvision_import import torchvision


def test_imagenet_weights_come_from_torchvision_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = imagenet_cache_path("resnet18")
    assert expected == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    reference = build_model("resnet18", 1000)
    expected.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), expected)
    source = load_pretrained("resnet18", "imagenet")
    assert source.kind == "imagenet" and source.crop_size == 224 and source.resize_size == 256
    model = build_model("resnet18", 3)
    apply_pretrained(model, source)
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.fc.out_features == 3


def test_resnet50_imagenet_uses_v2_weights_file_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert imagenet_cache_path("resnet50").name == "resnet50-11ad3fa6.pth"  # IMAGENET1K_V2
    assert imagenet_cache_path("resnet101").name == "resnet101-cd907fc2.pth"


def test_missing_imagenet_file_offline_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    asked = []

    def refuse_download(url, *args, **kwargs):
        asked.append(url)
        raise OSError("network is unreachable")

    # torchvision's weights API downloads through this function (offline here: it must fail cleanly).
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse_download)
    with pytest.raises(WeightsError) as error:
        load_pretrained("resnet18", "imagenet")
    assert asked == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    message = str(error.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "download.pytorch.org" in message


def test_weights_only_refuses_pickled_objects(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": os.system}, evil)
    with pytest.raises(WeightsError, match="refused"):
        load_pretrained("resnet18", str(evil))


def test_file_weights_any_head_size_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    source_model = build_model("resnet18", 10)
    save_file(source_model.state_dict(), str(tmp_path / "w.safetensors"))
    model = build_model("resnet18", 4, dropout=0.2)
    apply_pretrained(model, load_pretrained("resnet18", str(tmp_path / "w.safetensors")))
    assert torch.equal(model.conv1.weight, source_model.conv1.weight)
    assert model.fc.out_features == 4
    assert set(model.state_dict()) == set(source_model.state_dict())  # dropout adds no keys


def test_backbone_mismatch_lists_keys(tmp_path):
    torch.save(build_model("resnet18", 10).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match=r"do not match.*layer"):
        apply_pretrained(build_model("resnet34", 2), load_pretrained("resnet34", str(tmp_path / "r18.pth")))


def test_real_source_loads_and_card_sets_resolution(shared_dir):
    source = load_pretrained("resnet50", str(shared_dir / "weights" / "resnet50-imagenette.pth"))
    assert source.crop_size == 112  # from the JSON card beside the file
    model = build_model("resnet50", 2)
    apply_pretrained(model, source)
    assert model.conv1.weight.dtype == torch.float32


def test_layerwise_groups_decay_towards_the_input():
    model = build_model("resnet18", 2)
    set_backbone_trainable(model, True)
    groups = layerwise_param_groups(model, head_lr=1e-3, layer_decay=0.5, weight_decay=0.05)
    lr_by_block = {g["block"]: g["lr"] for g in groups}
    assert lr_by_block["head"] == pytest.approx(1e-3)
    assert lr_by_block["layer4"] == pytest.approx(5e-4)
    assert lr_by_block["stem"] == pytest.approx(1e-3 * 0.5**5)
    for group in groups:
        if group["weight_decay"] > 0:
            assert all(p.ndim > 1 for p in group["params"])  # no decay on norm weights and biases
    counted = sum(len(g["params"]) for g in groups)
    assert counted == len(list(model.parameters()))


def test_frozen_backbone_trains_only_the_head():
    model = build_model("resnet18", 2)
    set_backbone_trainable(model, False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]


def test_frozen_blocks_leave_the_param_groups():
    model = build_model("resnet18", 2)
    set_backbone_trainable(model, True)
    frozen = freeze_lowest_blocks(model, 2)
    assert frozen == [model.conv1, model.bn1, model.layer1]
    groups = layerwise_param_groups(model, head_lr=1e-3, layer_decay=0.5, weight_decay=0.05)
    assert {g["block"] for g in groups} == {"layer2", "layer3", "layer4", "head"}
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4", "fc"}

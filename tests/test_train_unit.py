"""The training run on tiny synthetic images: class order, run folder contents, learnability, reproducibility."""

from __future__ import annotations

import csv
import importlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from resfit.data.transforms import Preprocessing
from resfit.errors import RunFolderError
from resfit.train import TrainConfig, train
from resfit.train.loop import CURVES_EVERY_S, cosine_with_warmup, curves_due


@pytest.fixture(scope="module")
def unordered_classes(module_tmp):
    """Three classes whose creation order differs from their sorted order, each a distinct colour."""
    root = module_tmp("colours")
    rng = np.random.default_rng(0)
    colours = {"zebra": (200, 30, 30), "Apple": (30, 200, 30), "mango": (30, 30, 200)}
    for split, count in (("train", 10), ("val", 5)):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.integers(-40, 40, size=(36, 36, 3)), 0, 255).astype(
                    np.uint8
                )
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def small_config(data, out, **overrides) -> TrainConfig:
    settings = dict(
        model="resnet18", weights="none", epochs=1, img_size=32, batch_size=8, num_workers=0, quiet=True
    )
    settings.update(overrides)
    return TrainConfig(data=str(data), out=str(out), **settings)


@pytest.fixture
def saved_resume_epochs(monkeypatch) -> list[int]:
    """The epochs whose resume state the loop writes, in order (each is still written)."""
    loop = importlib.import_module("resfit.train.loop")
    saved, save_state = [], loop.save_state
    monkeypatch.setattr(
        loop,
        "save_state",
        lambda run_dir, epoch, *rest: saved.append(epoch) or save_state(run_dir, epoch, *rest),
    )
    return saved


def test_run_folder_class_order_and_learning(unordered_classes, tmp_path):
    result = train(small_config(unordered_classes, tmp_path / "run"), say=lambda _: None)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["class_names"] == ["Apple", "mango", "zebra"]  # sorted like torchvision's ImageFolder
    assert meta["architecture"] == "resnet18" and meta["num_classes"] == 3
    assert meta["training_config"]["img_size"] == 32 and meta["runtime"]["precision"] in ("bf16", "fp32")
    metrics = result.metrics
    assert list(metrics["per_class"]) == ["Apple", "mango", "zebra"]
    assert metrics["accuracy"] >= 0.8  # three flat colours: far above the 1/3 of chance
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert [row["stage"] for row in rows] == ["head", "finetune"]
    assert {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"} <= set(rows[0])

    import resfit

    classifier = resfit.load(tmp_path / "run")
    red = Image.new("RGB", (36, 36), (200, 30, 30))
    assert classifier.predict(red, top_k=1)[0][0] == "zebra"


def test_same_seed_same_metrics(unordered_classes, tmp_path):
    first = train(small_config(unordered_classes, tmp_path / "a", epochs=2), say=lambda _: None)
    second = train(small_config(unordered_classes, tmp_path / "b", epochs=2), say=lambda _: None)
    assert first.metrics == second.metrics
    assert [r["val_loss"] for r in first.history] == [r["val_loss"] for r in second.history]


def test_refuses_to_overwrite_a_run(unordered_classes, tmp_path):
    train(small_config(unordered_classes, tmp_path / "run", epochs=0), say=lambda _: None)
    with pytest.raises(RunFolderError, match="--resume"):
        train(small_config(unordered_classes, tmp_path / "run", epochs=0), say=lambda _: None)


def test_warmup_then_cosine_schedule():
    factors = [cosine_with_warmup(step, total_steps=100, warmup_steps=10) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(
        a >= b for a, b in zip(factors[9:], factors[10:], strict=False)
    )  # non-increasing after warm-up
    assert factors[-1] < 0.01


@pytest.mark.parametrize("frozen_blocks", [2, 0])
def test_frozen_blocks_keep_the_source_weights_and_statistics(unordered_classes, tmp_path, frozen_blocks):
    """--frozen-blocks 2 leaves stem + layer1 (weights and BatchNorm statistics) as they started, even with
    --bn train, while the blocks above change; --frozen-blocks 0 trains them all."""
    from safetensors.torch import load_file

    from resfit.train.loop import Trainer

    config = small_config(
        unordered_classes,
        tmp_path / "run",
        bn="train",
        frozen_blocks=frozen_blocks,
        head_stage=False,
        lr=0.01,
    )
    train(config, say=lambda _: None)
    start = Trainer(
        small_config(unordered_classes, tmp_path / "start", bn="train", frozen_blocks=frozen_blocks),
        tmp_path / "start",
        resuming=False,
        say=lambda _: None,
    )
    start.prepare()  # seeded first thing: the same initial model as the run's
    initial = start.model.state_dict()
    trained = load_file(tmp_path / "run" / "resume" / "epoch-1.safetensors")

    def unchanged(prefix: str) -> bool:
        keys = [k for k in initial if k.startswith(prefix) and initial[k].is_floating_point()]
        assert keys
        return all(torch.equal(initial[k], trained[f"model.{k}"]) for k in keys)

    for block in ("conv1.", "bn1.", "bn1.running_mean", "layer1."):
        assert unchanged(block) == (frozen_blocks == 2), block
    assert not unchanged("layer2.0.conv1.") and not unchanged("layer2.0.bn1.running_mean")


def test_wise_ft_keeps_the_midpoint_of_the_head_stage_and_the_last_epoch(unordered_classes, tmp_path):
    """--wise-ft 0.5: model.safetensors is exactly halfway between the head stage's weights and the last
    epoch's (not the best epoch on val), history.csv says so, and the run still evaluates and predicts."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    # --no-ema: the last epoch's weights are the network's (with the EMA they are the model that stood for it)
    config = small_config(unordered_classes, run, epochs=2, wise_ft=0.5, ema=False)
    result = train(config, say=lambda _: None)
    start = load_file(run / "resume" / "start.safetensors")
    last = load_file(run / "resume" / "epoch-2.safetensors")
    kept = load_file(run / "model.safetensors")
    floats = [k for k in kept if kept[k].is_floating_point()]
    moved = [k for k in floats if not torch.equal(start[k], last[f"model.{k}"])]
    assert len(moved) > 10  # fine-tuning changed the backbone, so the midpoint is a real third point
    for key in floats:
        torch.testing.assert_close(kept[key], (start[key] + last[f"model.{key}"]) / 2, rtol=0, atol=1e-6)
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [row["stage"] for row in rows] == ["head", "finetune", "finetune", "wise-ft"]
    meta = json.loads((run / "model.json").read_text())
    assert meta["best"]["wise_ft"] == 0.5 and result.best_epoch == 2
    assert float(rows[-1]["val_acc"]) == pytest.approx(result.metrics["accuracy"], abs=1e-6)


def test_wise_ft_share_is_checked():
    from resfit.errors import ConfigError

    with pytest.raises(ConfigError, match="wise-ft"):
        TrainConfig(data="x", wise_ft=1.5).validate()


def test_the_one_se_rule_keeps_the_head_stage_unless_beaten_by_more_than_one_standard_error():
    """On 53 validation photos a one-photo lead over the head stage is luck, a five-photo lead is not; on
    5,000 photos two points is far more than one standard error. Once a fine-tuned epoch is kept, the best
    one is (no head stage to beat)."""
    from resfit.errors import ConfigError
    from resfit.train.recipe import replaces_kept_model

    head = 40 / 53
    assert replaces_kept_model(41 / 53, head, None, 53, "best")
    assert not replaces_kept_model(41 / 53, head, head, 53, "one-se")  # +1 photo: one SE is ~2.9 photos here
    assert not replaces_kept_model(42 / 53, head, head, 53, "one-se")  # +2 photos
    assert replaces_kept_model(43 / 53, head, head, 53, "one-se")  # +3 photos
    assert replaces_kept_model(0.80, 0.78, 0.78, 5000, "one-se")
    assert replaces_kept_model(0.80, 0.79, None, 53, "one-se")  # a fine-tuned epoch kept: the best wins
    assert not replaces_kept_model(0.79, 0.79, None, 53, "best")  # a tie keeps the earlier model
    with pytest.raises(ConfigError, match="keep"):
        replaces_kept_model(0.9, 0.5, None, 53, "latest")
    with pytest.raises(ConfigError, match="keep"):
        TrainConfig(data="x", keep="latest").validate()


def test_the_loop_asks_the_keep_rule_with_the_head_stage_and_the_val_size(
    unordered_classes, tmp_path, monkeypatch
):
    """--keep one-se: each fine-tuned epoch is judged against the head stage's val accuracy on the whole val
    split while the head stage is kept, and an epoch the rule refuses leaves the head stage's model kept."""
    loop = importlib.import_module("resfit.train.loop")
    asked = []

    def refuse_fine_tuned(val_acc, kept_val_acc, head_stage_val_acc, n_val, rule):
        asked.append((kept_val_acc, head_stage_val_acc, n_val, rule))
        return kept_val_acc < 0  # only the first model (the head stage) is kept

    monkeypatch.setattr(loop, "replaces_kept_model", refuse_fine_tuned)
    run = tmp_path / "run"
    result = train(small_config(unordered_classes, run, epochs=2, keep="one-se"), say=lambda _: None)
    head_val = result.history[0]["val_acc"]
    assert asked == [(-1.0, None, 15, "one-se")] + [(head_val, head_val, 15, "one-se")] * 2
    assert result.best_epoch == 0 and json.loads((run / "model.json").read_text())["best"]["epoch"] == 0


def test_resume_state_is_written_at_most_every_resume_every_seconds_and_after_the_last_epoch(
    unordered_classes, tmp_path, saved_resume_epochs
):
    """A run shorter than --resume-every writes one resume state, the last epoch's (a crash then costs a run
    this short, not 8% of every run); --resume-every 0 writes one after every epoch, the head stage's too."""
    from resfit.train.state import saves_resume_state

    train(small_config(unordered_classes, tmp_path / "default", epochs=3), say=lambda _: None)
    assert saved_resume_epochs == [3]
    saved_resume_epochs.clear()
    train(small_config(unordered_classes, tmp_path / "every", epochs=3, resume_every=0), say=lambda _: None)
    assert saved_resume_epochs == [0, 1, 2, 3]
    assert not saves_resume_state(59.0, 60.0, last_epoch=False) and saves_resume_state(
        60.0, 60.0, last_epoch=False
    )
    assert saves_resume_state(0.1, 60.0, last_epoch=True)


def test_early_stop_ends_fine_tuning_after_patience_epochs_without_a_lower_val_loss(
    unordered_classes, tmp_path, monkeypatch, saved_resume_epochs
):
    """A val loss that never falls again stops fine-tuning after --patience epochs, says so, and still
    writes the resume state of the epoch it stopped at (a resume then does not train on)."""
    loop = importlib.import_module("resfit.train.loop")
    validate = loop.Trainer.validate
    monkeypatch.setattr(loop.Trainer, "validate", lambda self: (1.0, validate(self)[1]))
    said = []
    result = train(small_config(unordered_classes, tmp_path / "run", epochs=6, patience=2), say=said.append)
    assert [row["epoch"] for row in result.history] == [0, 1, 2, 3]  # epoch 1 sets the loss, 2 and 3 miss
    assert sum("early stop: validation loss has not improved for 2 epochs" in line for line in said) == 1
    assert saved_resume_epochs == [3]
    # --patience 0 is "never": the same flat loss runs every epoch (it once ended fine-tuning before epoch 1).
    said.clear()
    never = train(small_config(unordered_classes, tmp_path / "never", epochs=4, patience=0), say=said.append)
    assert [row["epoch"] for row in never.history] == [0, 1, 2, 3, 4]
    assert not any("early stop" in line for line in said)


def test_damaged_resume_weights_are_a_run_folder_error(unordered_classes, tmp_path):
    """A truncated start.safetensors (--wise-ft) or epoch file stops a resume with one clear error, not a
    safetensors traceback; an interpolation between weights of different shapes is refused the same way."""
    from resfit.train import resume
    from resfit.train.recipe import interpolate_weights

    run = tmp_path / "run"
    train(small_config(unordered_classes, run, epochs=1, wise_ft=0.5), say=lambda _: None)
    start = run / "resume" / "start.safetensors"
    start.write_bytes(start.read_bytes()[:100])
    with pytest.raises(RunFolderError, match="start.safetensors"):
        resume(run, say=lambda _: None)
    epoch = run / "resume" / "epoch-1.safetensors"
    epoch.write_bytes(b"")
    with pytest.raises(RunFolderError, match="epoch-1.safetensors"):
        resume(run, say=lambda _: None)
    with pytest.raises(RunFolderError, match="fc.weight"):
        interpolate_weights({"fc.weight": torch.zeros(2, 3)}, {"fc.weight": torch.zeros(3, 3)}, 0.5)


@pytest.mark.parametrize("pretrained", [True, False])
def test_frozen_blocks_default_to_stem_and_layer1_from_pretrained_weights_only(
    unordered_classes, tmp_path, pretrained
):
    """Without --frozen-blocks, a run from pretrained weights leaves stem + layer1 untrained (level accuracy
    in the suite, faster steps) and a run from scratch trains every block; the resolved value is stored
    for --resume."""
    from resfit.models import build_model

    weights = "none"
    if pretrained:
        weights = str(tmp_path / "source-resnet18.pth")
        torch.save(build_model("resnet18", 3).state_dict(), weights)
    config = small_config(unordered_classes, tmp_path / "run", weights=weights, epochs=0)
    assert config.frozen_blocks is None
    train(config, say=lambda _: None)
    stored = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert stored["frozen_blocks"] == (2 if pretrained else 0)


def test_curves_are_redrawn_at_most_once_a_minute_and_always_complete_at_the_end():
    assert curves_due(None, now=5.0, rows=1, complete=False)  # the first epoch's picture at once
    drawn = (5.0, 1)
    assert not curves_due(drawn, now=5.0 + CURVES_EVERY_S / 2, rows=2, complete=False)  # not every epoch
    assert curves_due(drawn, now=5.0 + CURVES_EVERY_S, rows=2, complete=False)
    assert curves_due(drawn, now=6.0, rows=3, complete=True)  # a finished run's picture holds every row
    assert not curves_due((6.0, 3), now=7.0, rows=3, complete=True)  # but is not drawn twice


def test_val_outputs_are_held_from_validation_not_computed_again(unordered_classes, tmp_path, monkeypatch):
    """Calibration and val's metrics read the kept model's outputs from its validation: two passes over val
    per fine-tuning epoch (the EMA and the network, the default) and no more; the numbers are those of a
    fresh pass of the saved model."""
    import importlib

    from resfit.evaluate import evaluate_split
    from resfit.hardware import resolve_runtime
    from resfit.run_folder import RunFolder

    passes: list[str] = []

    def counting(original):
        def predict_logits(model, loader, *args, **kwargs):
            passes.append(loader.dataset.split)
            return original(model, loader, *args, **kwargs)

        return predict_logits

    for name in ("resfit.train.loop", "resfit.evaluate"):  # resfit.train is also the function's name
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "predict_logits", counting(module.predict_logits))
    run = train(small_config(unordered_classes, tmp_path / "run", epochs=2, lr=0.01), say=lambda _: None)
    assert passes == ["val"] * 4, passes  # the head stage's val outputs come from its features

    folder = RunFolder(run.run_dir)
    model, meta = folder.load_model()
    source, _ = folder.dataset(str(unordered_classes))
    fresh, _ = evaluate_split(
        model, source, "val", Preprocessing.from_dict(meta["preprocessing"]), resolve_runtime("cpu")
    )
    assert passes == ["val"] * 5  # the counter does see evaluate's passes
    saved = json.loads((run.run_dir / "metrics.json").read_text())
    assert saved["accuracy"] == fresh["accuracy"] and saved["confusion_matrix"] == fresh["confusion_matrix"]
    assert saved["loss"] == pytest.approx(fresh["loss"], abs=1e-5)


def test_whether_val_outputs_are_held_is_decided_from_their_size_before_the_pass():
    from torch import nn

    from resfit.models import build_model
    from resfit.train.loop import MAX_HELD_VAL_BYTES, holds_val_output

    model = build_model("resnet18", num_classes=10)  # 512 features + 10 logits per photo
    fits = MAX_HELD_VAL_BYTES // ((512 + 10) * 4)
    assert holds_val_output(model, fits, 10)
    assert not holds_val_output(model, fits + 1, 10)
    assert not holds_val_output(nn.Sequential(nn.Linear(4, 2)), 10, 2)  # no fc head: nothing to hold


def test_a_val_set_too_big_to_hold_is_validated_on_logits_alone(unordered_classes, tmp_path, monkeypatch):
    """Above the cap validation never builds the pooled features it could not keep, and the run's reports
    are still those of a fresh pass of the saved model."""
    import importlib

    from resfit.evaluate import evaluate_split
    from resfit.hardware import resolve_runtime
    from resfit.model_wrappers import WithFeatures
    from resfit.run_folder import RunFolder

    loop = importlib.import_module("resfit.train.loop")  # resfit.train is also the function's name
    monkeypatch.setattr(loop, "MAX_HELD_VAL_BYTES", 64)  # not one photo's outputs
    models: list = []
    real_pass = loop.predict_logits
    monkeypatch.setattr(loop, "predict_logits", lambda m, *a, **k: models.append(m) or real_pass(m, *a, **k))
    run = train(small_config(unordered_classes, tmp_path / "run", epochs=2, lr=0.01), say=lambda _: None)
    assert len(models) >= 2  # each fine-tuning epoch's validation
    assert not any(isinstance(model, WithFeatures) for model in models)

    folder = RunFolder(run.run_dir)
    model, meta = folder.load_model()
    source, _ = folder.dataset(str(unordered_classes))
    fresh, _ = evaluate_split(
        model, source, "val", Preprocessing.from_dict(meta["preprocessing"]), resolve_runtime("cpu")
    )
    saved = json.loads((run.run_dir / "metrics.json").read_text())
    assert saved["accuracy"] == fresh["accuracy"] and saved["confusion_matrix"] == fresh["confusion_matrix"]
    assert saved["loss"] == pytest.approx(fresh["loss"], abs=1e-5)


def test_in_bf16_the_head_stages_held_outputs_are_a_passs_numbers(tmp_path):
    """--epochs 0 keeps the head stage's model, whose val outputs come from its cached features: in bf16
    (emulated here where the CPU has none) the head must run as a pass runs it, or val's loss in metrics.json
    moves from `resfit evaluate`'s by about 1e-4 (measured before the head ran under autocast)."""
    from conftest import _write_learnable_images

    from resfit.calibration import calibration_scores
    from resfit.evaluate import evaluate_split
    from resfit.hardware import resolve_runtime
    from resfit.run_folder import RunFolder

    data = tmp_path / "data"
    _write_learnable_images(data / "train", per_class=12, size=40, seed=0)
    _write_learnable_images(data / "val", per_class=12, size=40, seed=1)
    config = small_config(data, tmp_path / "run", epochs=0, precision="bf16", device="cpu")
    run = train(config, say=lambda _: None)
    folder = RunFolder(run.run_dir)
    model, meta = folder.load_model()
    assert meta["precision"] == "bf16"
    source, _ = folder.dataset(str(data))
    runtime = resolve_runtime("cpu", "bf16")
    _, probs = evaluate_split(model, source, "val", Preprocessing.from_dict(meta["preprocessing"]), runtime)
    fresh = calibration_scores(probs, np.asarray(source.splits["val"].labels))
    saved = json.loads((run.run_dir / "metrics.json").read_text())["calibration"]
    assert saved["nll"] == pytest.approx(fresh["nll"], rel=1e-9, abs=1e-12)


def test_ema_or_network_picks_the_higher_val_accuracy_and_a_tie_goes_to_the_average():
    from resfit.errors import ConfigError
    from resfit.train.recipe import ema_or_network

    assert ema_or_network(0.60, 0.62) == "network"
    assert ema_or_network(0.62, 0.60) == "average"
    assert ema_or_network(0.61, 0.61) == "average"
    with pytest.raises(ConfigError, match="ema-keep"):
        TrainConfig(data="x", ema=True, ema_keep="network").validate()


def test_the_default_validates_an_ema_beside_the_network_with_a_half_life_of_at_least_72_steps():
    """The measured default (benchmarks/results/ema-better-hl72-fixed-rule.md): on a few hundred photos (7
    steps an epoch) a one-epoch half-life followed the network into its dip; 72 steps is one epoch of all
    of flowers5, where one epoch removed it."""
    from resfit.train.recipe import ema_decay_for

    config = TrainConfig(data="x")
    assert config.ema and config.ema_keep == "better"
    assert ema_decay_for(7, None) == pytest.approx(0.5 ** (1 / 72))  # half-life 72 steps, not 7
    assert ema_decay_for(72, None) == pytest.approx(0.5 ** (1 / 72))
    assert ema_decay_for(300, None) == pytest.approx(0.5 ** (1 / 300))  # one epoch when that is longer
    assert 0.5 ** (1 / 72) < ema_decay_for(300, None) < 1
    assert ema_decay_for(7, 0.9) == 0.9


@pytest.mark.parametrize("stands", ["network", "average"])
def test_ema_keep_better_validates_both_and_keeps_the_one_that_stood_for_the_epoch(
    unordered_classes, tmp_path, monkeypatch, stands
):
    """--ema --ema-keep better: each fine-tuned epoch validates the average and the network (two passes over
    val), history.csv says which stood for it and what each scored, and model.safetensors holds exactly
    that one's weights (here every epoch is kept, so the last)."""
    from safetensors.torch import load_file

    loop = importlib.import_module("resfit.train.loop")
    asked, passes = [], []
    monkeypatch.setattr(
        loop, "ema_or_network", lambda average, network: asked.append((average, network)) or stands
    )
    monkeypatch.setattr(loop, "replaces_kept_model", lambda *args: True)
    original = loop.predict_logits
    monkeypatch.setattr(
        loop,
        "predict_logits",
        lambda model, loader, *a, **k: passes.append(1) or original(model, loader, *a, **k),
    )
    run = tmp_path / "run"
    config = small_config(unordered_classes, run, epochs=2, lr=0.01, ema=True, ema_keep="better")
    result = train(config, say=lambda _: None)
    assert len(asked) == 2 and len(passes) == 4  # two fine-tuned epochs, each validated twice
    rows = list(csv.DictReader((run / "history.csv").open()))
    tuned = [row for row in rows if row["stage"] == "finetune"]
    assert [row["kept_weights"] for row in tuned] == [stands, stands]
    for row, (average, network) in zip(tuned, asked, strict=True):
        assert float(row["average_val_acc"]) == pytest.approx(average, abs=1e-6)
        assert float(row["network_val_acc"]) == pytest.approx(network, abs=1e-6)
        assert float(row["val_acc"]) == pytest.approx(network if stands == "network" else average, abs=1e-6)
    kept, last = load_file(run / "model.safetensors"), load_file(run / "resume" / "epoch-2.safetensors")
    prefix = "model." if stands == "network" else "ema.module."
    floats = [k for k in kept if kept[k].is_floating_point()]
    differ = [k for k in floats if not torch.equal(last[f"model.{k}"], last[f"ema.module.{k}"])]
    assert len(differ) > 10  # the two candidates really are different weights
    for key in floats:
        torch.testing.assert_close(kept[key], last[f"{prefix}{key}"], rtol=0, atol=0)
    assert result.best_epoch == 2


def test_the_ema_starts_from_the_head_stage_weights_not_the_network_after_its_first_step():
    """An EMA with a long half-life must stay near the weights fine-tuning started from: torch's AveragedModel
    copies the network at its first update, which made resfit's average start one AdamW step (every weight
    moved by about the lr) away from the head stage's weights."""
    from resfit.train.recipe import make_ema

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = make_ema(model, decay=0.9)
    for key, value in start.items():
        torch.testing.assert_close(ema.module.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # one step that moves every weight
    ema.update_parameters(model)
    weight = ema.module[0].weight
    torch.testing.assert_close(weight, 0.9 * start["0.weight"] + 0.1 * model[0].weight, rtol=0, atol=1e-6)
    assert (weight - start["0.weight"]).abs().max() < 0.11  # one tenth of the step, not all of it

"""The shared training loop: learning, exact resume, determinism and divergence handling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers_data import synthetic_split
from matekd.augment import to_device_tensor
from matekd.errors import TrainingDiverged
from matekd.models import build_model
from matekd.params import Recipe
from matekd.storage import safe_torch_load
from matekd.tracking import NullRun
from matekd.training.loop import FitJob, StepOutput, TrainingData, batch_slices, cross_entropy_step, fit, model_input

CPU = torch.device("cpu")


def _data(per_class: int, seed: int = 0):
    images, labels = synthetic_split(per_class)
    # texture on top of the flat class colour, so the task is not solved by one pixel
    noise = torch.Generator().manual_seed(seed)
    jitter = torch.randint(0, 40, images.shape, generator=noise).numpy().astype("uint8")
    images = (images // 2 + jitter).astype("uint8")
    return to_device_tensor(images, CPU), torch.as_tensor(labels)


def _fit(model, recipe, x, y, tmp_path=None, digest="d", **kw):
    (result,) = fit(FitJob(model, kw.pop("step_fn", cross_entropy_step(model)), recipe,
                           TrainingData(x, y, x[:20], y[:20]), seeds=[3], runs=[NullRun()],
                           checkpoint=(tmp_path / "ckpt.pt") if tmp_path else None, digest=digest, desc="t",
                           progress=False, **kw))
    return result


class Crash(Exception):
    """A process dying at an epoch end (the checkpoint of that epoch is written)."""


def crash_after_epoch(n: int):
    def hook(epoch, records):
        if epoch == n:
            raise Crash
    return hook


def _loss(model, x, y):
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(model_input(x, CPU)), y).item()


def test_one_teacher_epoch_on_256_images_lowers_the_loss():
    torch.manual_seed(0)
    x, y = _data(26)
    x, y = x[:256], y[:256]
    model = build_model("resnet56")
    before = _loss(model, x, y)
    _fit(model, Recipe(epochs=1, batch_size=32, lr=0.05), x, y)
    after = _loss(model, x, y)
    assert after < before - 0.1, (before, after)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    x, y = _data(6)
    recipe = Recipe(epochs=3, batch_size=16, lr=0.05)

    torch.manual_seed(1)
    reference = build_model("resnet20")
    ref_result = _fit(reference, recipe, x, y)

    torch.manual_seed(1)
    crashed = build_model("resnet20")
    with pytest.raises(Crash):
        _fit(crashed, recipe, x, y, tmp_path, epoch_hook=crash_after_epoch(2))
    assert safe_torch_load(tmp_path / "ckpt.pt")["epoch"] == 2

    torch.manual_seed(99)  # a fresh process would start from another init; resume must not care
    resumed = build_model("resnet20")
    result = _fit(resumed, recipe, x, y, tmp_path)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert [r["val_acc"] for r in result.history] == [r["val_acc"] for r in ref_result.history]
    assert [r["train_loss"] for r in result.history] == [r["train_loss"] for r in ref_result.history]


def test_a_checkpoint_with_another_digest_is_not_resumed(tmp_path):
    x, y = _data(3)
    recipe = Recipe(epochs=1, batch_size=16, lr=0.05)
    torch.manual_seed(0)
    _fit(build_model("resnet20"), recipe, x, y, tmp_path, digest="old")
    torch.manual_seed(0)
    result = _fit(build_model("resnet20"), Recipe(epochs=2, batch_size=16, lr=0.05), x, y, tmp_path, digest="new")
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_two_runs_with_the_same_seed_are_bit_identical():
    x, y = _data(4)
    recipe = Recipe(epochs=2, batch_size=16, lr=0.05)
    states = []
    for _ in range(2):
        torch.manual_seed(5)
        model = build_model("resnet20")
        _fit(model, recipe, x, y)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    x, y = _data(4)  # 40 images, batch 8 -> 5 steps per epoch
    recipe = Recipe(epochs=3, batch_size=8, lr=0.05)
    model = build_model("resnet20")
    plain = cross_entropy_step(model)
    calls = {"n": 0}

    def poisoned(batch, epoch):
        calls["n"] += 1
        out = plain(batch, epoch)
        if epoch == 1 and calls["n"] == 5 + 3:  # epoch 2, step 3
            return StepOutput(out.loss * float("nan"), out.logits, out.losses * float("nan"), out.terms)
        return out

    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 3"):
        _fit(model, recipe, x, y, tmp_path, step_fn=poisoned, log_every=100)
    assert safe_torch_load(tmp_path / "ckpt.pt")["epoch"] == 1


def test_batch_slices_drop_only_a_trailing_singleton():
    assert batch_slices(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_slices(9, 4) == [(0, 4), (4, 8)]
    assert batch_slices(1, 4) == [(0, 1)]


def test_learning_rate_schedule_warms_up_linearly_then_decays_by_cosine():
    from matekd.training.loop import lr_factor

    assert [lr_factor(s, 10, "cosine", warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, "cosine", warmup_steps=4) == 1.0
    assert abs(lr_factor(7, 10, "cosine", warmup_steps=4) - 0.5) < 1e-12  # half-way through the decay
    assert lr_factor(10, 10, "cosine", warmup_steps=4) < 1e-12
    assert lr_factor(3, 10, "constant") == 1.0 and lr_factor(0, 10, "constant", warmup_steps=2) == 0.5
    assert abs(lr_factor(5, 10, "cosine") - 0.5) < 1e-12


def test_sgd_uses_multi_tensor_kernels_with_the_same_numbers():
    """foreach on the CPU (fused on CUDA): other kernels, the same update as the per-tensor loop."""
    from types import SimpleNamespace

    from matekd.training.loop import make_optimizer, optimizer_kernels

    recipe = Recipe(epochs=1, batch_size=8, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    models = []
    for kernels in ({"foreach": False}, None):
        torch.manual_seed(0)
        model = build_model("resnet20").double()
        optimizer = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                     **kernels) if kernels else make_optimizer(model, recipe))
        x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(x), torch.arange(4)).backward()
            optimizer.step()
        models.append(model)
    assert make_optimizer(models[1], recipe).defaults["foreach"] is True
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    cuda = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    assert optimizer_kernels([cuda, cuda]) == {"fused": True}
    assert optimizer_kernels([cuda, torch.zeros(1)]) == {"foreach": True}   # mixed devices: no fused kernel


def test_term_sums_add_every_term_weighted_by_batch_size():
    from matekd.training.loop import TermSums

    sums = TermSums()
    first = sums.add({"loss": torch.tensor([1.0, 2.0]), "ce": torch.tensor([0.5, 0.25])}, 4)
    assert first.tolist() == [[1.0, 2.0], [0.5, 0.25]]
    sums.add({"loss": torch.tensor([3.0, 1.0]), "ce": torch.tensor([1.0, 1.0])}, 2)
    assert sums.keys == ["loss", "ce"] and sums.total.tolist() == [[10.0, 10.0], [4.0, 3.0]]
    sums.add({"ce": torch.tensor([1.0, 0.0]), "kd": torch.tensor([2.0, 2.0])}, 1)   # another set: by name
    assert sums.keys == ["loss", "ce", "kd"] and sums.total.tolist() == [[10.0, 10.0], [5.0, 3.0], [2.0, 2.0]]

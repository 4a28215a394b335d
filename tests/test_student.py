"""Teacher caches and student distillation: every method trains and logs its terms, cached
signals are exact under augmentation, stale caches are refused."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers_data import write_image_folder
from matekd import runtime
from matekd.attribution import grad_cam
from matekd.augment import crop_flip, sample_crop_flip, shift_maps, variant_index
from matekd.cache import load_cache, run_cache, variant_logits
from matekd.data import load_prepared, run_prepare
from matekd.errors import CacheError, MatekdError
from matekd.models import build_model
from matekd.params import load_params
from matekd.storage import save_tensors
from matekd.student import run_distill
from matekd.teachers import load_teacher, teacher_paths
from matekd.tracking import NullRun
from matekd.train import PAD, model_input

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
METHODS = ("ce", "kd", "mtkd_equal", "mate_kd_noattr", "mate_kd")


class RecordingRun(NullRun):
    active = True

    def __init__(self):
        self.metrics: list[tuple[int | None, dict]] = []
        self.images: list[tuple[str, int]] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_image(self, image, key, step):
        self.images.append((key, step))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """prepared/ data, two randomly initialised teachers and their CAM caches in a temp cwd."""
    root = tmp_path_factory.mktemp("ws")
    old = Path.cwd()
    import os

    os.chdir(root)
    try:
        (root / "data").mkdir()
        write_image_folder(root / "data" / "mini.tar.gz", train_per_class=8, test_per_class=2)
        params = load_params(ROOT / "profiles" / "tiny.yaml",
                             {"data.train_per_class": 6, "data.val_per_class": 2, "data.test_per_class": 2,
                              "distill.recipe.batch_size": 16, "tracking.enabled": False})
        run_prepare(params)
        torch.manual_seed(0)
        for name in params.teachers:
            save_tensors(teacher_paths(name)["weights"], build_model(name).state_dict(), {"architecture": name})
            run_cache(params, name)
        yield root, params
    finally:
        os.chdir(old)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_one_epoch_and_logs_its_terms(workspace, method, monkeypatch):
    root, params = workspace
    recorder = RecordingRun()

    @contextlib.contextmanager
    def fake_start_run(**kwargs):
        yield recorder

    monkeypatch.setattr(runtime, "start_run", fake_start_run)
    metrics = run_distill(params, method=method, seed=0, output_name=f"{method}-seed0", progress=False)
    assert metrics["method"] == method and 0 <= metrics["test_acc"] <= 1
    steps = [m for step, m in recorder.metrics if any(k.startswith("step/") for k in m)]
    epochs = [m for step, m in recorder.metrics if "val_acc" in m]
    assert steps and len(epochs) == 1
    for term in ("total", "ce", "kd", "attr"):
        assert f"step/{term}" in steps[-1] and f"train_{term}" in epochs[0], term
    if method == "ce":
        assert epochs[0]["train_kd"] == 0 and epochs[0]["train_attr"] == 0
    else:
        assert epochs[0]["train_kd"] > 0
    if method == "mate_kd":
        assert epochs[0]["train_attr"] > 0
        for name in params.teachers:
            assert f"train_weight_mean/{name}" in epochs[0]
        assert recorder.images == [("teacher_weight_histogram", 1)]
    elif method == "mate_kd_noattr":
        assert epochs[0]["train_attr"] == 0
    assert (root / "models" / "student" / f"{method}-seed0.safetensors").exists()


def test_cached_logits_are_exact_for_every_augmentation():
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    cached, mask = variant_logits(model, images, batch_size=400, device=CPU)
    assert bool(mask.all())
    offsets, flips = sample_crop_flip(3, PAD, torch.Generator().manual_seed(1), CPU)
    with torch.no_grad():
        online = model(model_input(crop_flip(images, offsets, flips, PAD), CPU))
    gathered = cached[torch.arange(3), variant_index(offsets, flips, PAD)].float()
    torch.testing.assert_close(gathered, online, atol=2e-2, rtol=2e-3)  # fp16 storage


class EquivariantToy(nn.Module):
    """Convolutions at full resolution then GAP + linear: translation-equivariant CAMs. The
    kernels are made left-right symmetric, so the maps are flip-equivariant too (a general
    CNN is not, which is why cached maps of flipped images are an approximation)."""

    cam_layer = "conv2 output"

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.linear = nn.Linear(8, 10)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)

    @property
    def cam_linear(self):
        return self.linear

    def forward_cam(self, x):
        a = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.linear(a.mean((2, 3))), a

    def forward(self, x):
        return self.forward_cam(x)[0]


def test_shifted_cached_maps_match_maps_of_the_augmented_image_in_the_interior():
    torch.manual_seed(0)
    model = EquivariantToy()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(6)
    cached = grad_cam(model, model_input(images, CPU), labels)
    offsets, flips = sample_crop_flip(6, PAD, torch.Generator().manual_seed(3), CPU)
    shifted = shift_maps(cached, offsets, flips, PAD, image_size=32)
    direct = grad_cam(model, model_input(crop_flip(images, offsets, flips, PAD), CPU), labels)
    # two 3x3 convs see 2 pixels beyond a cell; padding moves content by up to PAD pixels
    margin = PAD + 2
    inner = (slice(None), slice(margin, 32 - margin), slice(margin, 32 - margin))
    scale = float(direct[inner].abs().amax())
    torch.testing.assert_close(shifted[inner], direct[inner], atol=1e-5 * scale, rtol=1e-4)
    assert float((cached[inner] - direct[inner]).abs().amax()) > 0.1 * scale  # the shift mattered


def test_cache_metadata_and_refusal_of_stale_or_corrupt_caches(workspace):
    root, params = workspace
    data = load_prepared()
    cache = load_cache("resnet20", data.manifest_hash)
    assert cache.train_maps.shape == (len(data.train_labels), 8, 8)
    assert cache.val_maps.shape == (len(data.val_labels), 8, 8)
    assert cache.train_maps.dtype == torch.float16
    assert cache.metadata["layer"] == build_model("resnet20").cam_layer
    assert float(cache.train_maps.float().amax()) <= 1.0
    with pytest.raises(CacheError, match="prepared data changed"):
        load_cache("resnet20", "0" * 64)
    with pytest.raises(CacheError, match="no cached logits"):
        load_cache("resnet20", data.manifest_hash, need_logits=True)
    weights = teacher_paths("resnet20")["weights"]
    original = weights.read_bytes()
    try:
        torch.manual_seed(7)
        save_tensors(weights, build_model("resnet20").state_dict(), {"architecture": "resnet20"})
        with pytest.raises(CacheError, match="teacher weights changed"):
            load_cache("resnet20", data.manifest_hash)
    finally:
        weights.write_bytes(original)
    path = root / "cams" / "resnet56.safetensors"
    blob = path.read_bytes()
    try:
        path.write_bytes(blob[: len(blob) // 2])
        with pytest.raises(CacheError, match="corrupt"):
            load_cache("resnet56", data.manifest_hash)
    finally:
        path.write_bytes(blob)


def test_missing_teacher_weights_fail_with_the_command_to_run(workspace):
    with pytest.raises(MatekdError, match=r"dvc repro train_teacher@vgg19_bn"):
        load_teacher("vgg19_bn", CPU)


def test_cached_teacher_logits_train_like_online_ones(workspace, monkeypatch, tmp_path):
    """`teacher_signals: cached` gathers the per-variant logits that the cache stage stored; the
    KD term it yields matches teachers run online on the same augmented batches."""
    root, params = workspace
    cached_params = params.model_copy(deep=True)
    cached_params.distill.teacher_signals = "cached"
    cached_params.cache.logit_variants = "used"  # only the variants seed 0 will gather
    cams = root / "cams"
    saved = {p.name: p.read_bytes() for p in cams.glob("*.safetensors")}
    try:
        run_cache(cached_params, "resnet56")  # kd_teacher of the tiny profile
        terms = {}
        for label, p in (("online", params), ("cached", cached_params)):
            recorder = RecordingRun()

            @contextlib.contextmanager
            def fake_start_run(**kwargs):
                yield recorder

            monkeypatch.setattr(runtime, "start_run", fake_start_run)
            run_distill(p, method="kd", seed=0, output_name=f"kd-{label}", progress=False)
            terms[label] = [m["step/kd"] for _, m in recorder.metrics if "step/kd" in m]
        assert len(terms["online"]) == len(terms["cached"]) >= 1
        torch.testing.assert_close(torch.tensor(terms["cached"]), torch.tensor(terms["online"]),
                                   rtol=2e-2, atol=1e-3)
        other_seed = cached_params.model_copy(deep=True)
        with pytest.raises(CacheError, match="do not cover seed 5"):
            run_distill(other_seed, method="kd", seed=5, output_name="kd-seed5", progress=False)
    finally:
        for name, blob in saved.items():
            (cams / name).write_bytes(blob)


def test_used_variants_are_exactly_those_the_training_loop_draws():
    from matekd.augment import num_variants
    from matekd.cache import used_variants
    from matekd.train import epoch_augmentation

    params = load_params(ROOT / "profiles" / "tiny.yaml", {"distill.seed": 1, "ablation.seeds": [1, 2],
                                                           "distill.recipe.epochs": 2})
    n = 50
    mask = used_variants(params, n)
    expected = torch.zeros(n, num_variants(PAD), dtype=torch.bool)
    for seed in (1, 2):
        for epoch in range(2):
            order, offsets, flips = epoch_augmentation(seed, epoch, n)
            for position in range(n):  # the loop gives image order[p] the p-th draw
                expected[order[position], variant_index(offsets[position:position + 1],
                                                        flips[position:position + 1], PAD)] = True
    assert torch.equal(mask, expected)
    assert 0 < int(mask.sum()) <= n * 2 * 2

"""Teacher caches and student distillation: every method trains and logs its own terms, students
trained together equal students trained alone, cached signals are exact under augmentation,
stale caches are refused, tuned values are each method's own."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers_data import write_image_folder
from matekd import methods as method_table
from matekd.attribution import grad_cam
from matekd.augment import crop_flip, sample_crop_flip, shift_maps, variant_index
from matekd.cache import load_cache, variant_logits
from matekd.data.prepared import load_prepared
from matekd.errors import CacheError, MatekdError, ParamsError
from matekd.models import build_model
from matekd.params import load_params
from matekd.paths import teacher_paths
from matekd.stages import context as stage_context
from matekd.stages import distill as distill_stage
from matekd.stages.cache import run_cache
from matekd.stages.distill import run_distill
from matekd.stages.prepare import run_prepare
from matekd.storage import load_tensors, read_json, save_tensors
from matekd.teachers import load_teacher
from matekd.tracking import NullRun
from matekd.training import groups as training_groups
from matekd.training.groups import plan_groups
from matekd.training.loop import PAD, model_input
from matekd.training.step import logged_terms
from matekd.training.students import logged_params, resolve_spec, run_name, spec_teachers, train_students
from matekd.tuned import write_tuned_values

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
METHODS = tuple(method_table.METHODS)


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
            teacher = build_model(name)
            with torch.no_grad():  # untrained deep ResNets give logits beyond fp16; trained ones do not
                teacher.linear.weight.mul_(1e-3)
            save_tensors(teacher_paths(name)["weights"], teacher.state_dict(), {"architecture": name})
            run_cache(params, name)
        yield root, params
    finally:
        os.chdir(old)


def _recording(monkeypatch) -> list[tuple[dict, RecordingRun]]:
    """Replace the stage's tracker: every run opened gets a RecordingRun (with its kwargs)."""
    opened: list[tuple[dict, RecordingRun]] = []

    @contextlib.contextmanager
    def fake_start_run(**kwargs):
        recorder = RecordingRun()
        opened.append((kwargs, recorder))
        yield recorder

    monkeypatch.setattr(stage_context, "start_run", fake_start_run)   # what stages.context.tracked_run opens
    return opened


def test_teacher_weight_figures_are_drawn_after_training(workspace):
    """The figures are drawn once training is over (not inside the epoch loop, where they keep the
    device idle): every epoch's, at the same key and step, from that epoch's counts."""
    import numpy as np

    from matekd.plotting import figure_to_array
    from matekd.report.weight_histograms import histogram_figure

    root, params = workspace
    params = params.model_copy(deep=True)
    params.distill.recipe.epochs = 2
    events: list[tuple] = []

    class OrderedRun(RecordingRun):
        def log_metrics(self, metrics, step=None):
            if "val_acc" in metrics:
                events.append(("epoch",))

        def log_image(self, image, key, step):
            events.append(("image", key, step, image))

    spec = resolve_spec(params, "mate_kd", 0, "figures")
    (student,) = train_students(params, [spec], load_prepared(root / "prepared"), CPU, [OrderedRun()], None,
                                progress=False, with_test=False)
    assert [e[0] for e in events] == ["epoch", "epoch", "image", "image"]
    names = spec_teachers(spec, params)
    for (_, key, step, image), entry in zip(events[2:], student.histograms, strict=True):
        assert (key, step) == ("teacher_weights", entry["epoch"] - 1)
        counts = torch.tensor([entry["counts"][n] for n in names])
        assert counts.sum() > 0
        np.testing.assert_array_equal(image, figure_to_array(histogram_figure(counts, names, entry["epoch"],
                                                                              "mate_kd")))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_one_epoch_and_logs_only_its_terms(workspace, method, monkeypatch):
    root, params = workspace
    opened = _recording(monkeypatch)
    metrics = run_distill(params, method=method, seed=0, ablation=True, progress=False)
    assert 0 <= metrics["test_acc"] <= 1 and metrics["seed"] == 0
    (kwargs, recorder), = opened
    row = method_table.get(method)
    steps = [m for step, m in recorder.metrics if any(k.startswith("step/") for k in m)]
    epochs = [m for step, m in recorder.metrics if "val_acc" in m]
    assert steps and len(epochs) == 1
    expected = logged_terms(row, spec_teachers(resolve_spec(params, method, 0, "x"), params))
    assert {k.removeprefix("step/") for k in steps[-1]} - {"lr", "loss"} == expected
    assert {k.removeprefix("train_") for k in epochs[0] if k.startswith("train_") and k != "train_acc"} \
        - {"loss"} == expected
    assert ("train_kd" in epochs[0]) == row.has_kd and ("train_attr" in epochs[0]) == ("attr" in row.terms)
    if row.has_kd:
        assert epochs[0]["train_kd"] > 0
    if "attr" in row.terms:
        assert epochs[0]["train_attr"] > 0
    if row.per_sample_weights:
        for name in params.teachers:
            assert f"train_weight_mean/{name}" in epochs[0]
        assert 0 <= epochs[0]["train_entropy_relative"] <= 1 + 1e-6
        assert recorder.images == [("teacher_weights", 0)]   # step = epoch index: the card opens on it
    else:
        assert recorder.images == []
    # the run logs the params this method used: the ce run has no attribution weight, no KD temperature
    logged = kwargs["params"]
    assert ("distill.attribution_weight" in logged) == ("attribution_weight" in row.hyperparameter_names)
    assert ("distill.kd_temperature" in logged) == row.has_kd
    assert kwargs["run_name"].startswith(f"ablation {method} seed0")
    weights = root / "models" / "student" / f"{method}-seed0.safetensors"
    assert load_tensors(weights)[1]["method"] == method
    assert all(isinstance(v, (int, float)) or isinstance(v, dict)
               for v in read_json(root / "metrics" / "student" / f"{method}-seed0.json").values())


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
            opened = _recording(monkeypatch)
            run_distill(p, method="kd", seed=0, output_name=f"kd-{label}", progress=False)
            (_, recorder), = opened
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
    from matekd.training.loop import epoch_augmentation

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


# --------------------------------------------------------------------------------------
# Students trained together


@pytest.fixture
def float64():
    """Compare together-vs-alone in float64: in float32 a 1e-6 difference between a grouped and a
    dense convolution can flip a ReLU and grow chaotically over SGD steps (rounding, not fusion)."""
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("signals", ["online", "cached"])
def test_students_trained_together_equal_students_trained_alone(workspace, float64, signals):
    """Every method, each with its own seed, trained as one network: after a few steps each
    student's weights, buffers and per-epoch metrics equal those of the same student alone."""
    root, params = workspace
    # One method per weighting rule (none, one teacher, attribution + attribution loss, confidence).
    chosen = ("ce", "kd", "mate_kd", "ca_mkd")
    p = params.model_copy(deep=True)
    p.distill.recipe.epochs = 1   # 4 steps of 16 images
    p.distill.teacher_signals = signals
    p.ablation.seeds = list(range(len(chosen)))
    cams = root / "cams"
    saved = {f.name: f.read_bytes() for f in cams.glob("*.safetensors")}
    try:
        if signals == "cached":
            p.cache.logit_variants = "used"   # the variants these seeds draw in one epoch
            torch.set_default_dtype(torch.float32)
            for name in p.teachers:
                run_cache(p, name)
            torch.set_default_dtype(torch.float64)
        data = load_prepared()
        specs = [resolve_spec(p, m, seed, f"{m}-seed{seed}") for seed, m in enumerate(chosen)]
        alone = [train_students(p, [spec], data, CPU, [NullRun()], None, progress=False)[0] for spec in specs]
        together = train_students(p, specs, data, CPU, [NullRun() for _ in specs], None, progress=False)
    finally:
        for name, blob in saved.items():
            (cams / name).write_bytes(blob)
    for a, g in zip(alone, together):
        sa, sg = a.model.state_dict(), g.model.state_dict()
        assert sa.keys() == sg.keys()
        for key in sa:
            torch.testing.assert_close(sg[key], sa[key], atol=1e-5, rtol=0, msg=f"{a.spec.output} {key}")
        assert len(a.result.history) == len(g.result.history) == 1
        for ra, rg in zip(a.result.history, g.result.history):
            assert ra.keys() == rg.keys(), a.spec.output
            for key in ra:
                if key != "images_per_second":
                    assert rg[key] == pytest.approx(ra[key], abs=1e-6), (a.spec.output, key)
        assert a.histograms == g.histograms


def test_plan_groups_keeps_the_table_order_and_never_mixes_recipes(workspace):
    _, params = workspace
    specs = [resolve_spec(params, m, s, f"{m}-seed{s}") for m in ("ce", "kd", "mate_kd") for s in (0, 1)]
    groups = plan_groups(specs, 4)
    assert [[s.output for s in g] for g in groups] == [
        ["ce-seed0", "ce-seed1", "kd-seed0", "kd-seed1"], ["mate_kd-seed0", "mate_kd-seed1"]]
    assert [[s.output for s in g] for g in plan_groups(specs, 1)] == [[s.output] for s in specs]
    other = specs[0].distill.model_copy(deep=True)
    other.recipe.lr = 0.5
    odd = type(specs[0])(specs[0].method, 7, "ce-seed7", other)
    assert [len(g) for g in plan_groups([*specs, odd], 10)] == [6, 1]
    with pytest.raises(ParamsError, match="group_size"):
        plan_groups(specs, 0)


def test_an_ablation_group_trains_once_and_each_stage_writes_its_member(workspace, monkeypatch):
    root, params = workspace
    p = params.model_copy(deep=True)
    p.ablation.methods = ["ce", "mtkd_equal", "ca_mkd"]
    p.ablation.group_size = 3
    calls = []
    real = training_groups.train_students

    def counting(params, specs, *args, **kwargs):
        calls.append([s.output for s in specs])
        return real(params, specs, *args, **kwargs)

    monkeypatch.setattr(training_groups, "train_students", counting)
    opened = _recording(monkeypatch)
    stores = root / "checkpoints" / "groups"
    first = run_distill(p, method="mtkd_equal", seed=0, ablation=True, progress=False)
    assert calls == [["ce-seed0", "mtkd_equal-seed0", "ca_mkd-seed0"]]
    assert len(opened) == 3 and len({kw["run_name"] for kw, _ in opened}) == 3   # one run per student
    assert {kw["tags"]["group.students"] for kw, _ in opened} == {3}
    assert len(list(stores.iterdir())) == 1
    for method in ("ce", "ca_mkd"):
        out = run_distill(p, method=method, seed=0, ablation=True, progress=False)
        assert out["seed"] == 0
    assert len(calls) == 1                       # the others were written from the store
    assert not list(stores.iterdir())            # every member written: the store is gone
    assert first == read_json(root / "metrics" / "student" / "mtkd_equal-seed0.json")
    meta = load_tensors(root / "models" / "student" / "ca_mkd-seed0.safetensors")[1]
    assert meta["method"] == "ca_mkd" and meta["group_students"] == "3"
    # rerunning one member (its outputs deleted, as DVC does) retrains the group once and leaves no store
    for path in (root / "models" / "student" / "ce-seed0.safetensors", root / "metrics" / "student" / "ce-seed0.json"):
        path.unlink()
    run_distill(p, method="ce", seed=0, ablation=True, progress=False)
    assert len(calls) == 2 and not list(stores.iterdir())


def test_ablation_runs_outside_the_matrix_are_refused(workspace):
    _, params = workspace
    with pytest.raises(ParamsError, match="not in the ablation matrix"):
        run_distill(params, method="kd", seed=3, ablation=True, progress=False)


# --------------------------------------------------------------------------------------
# Tuned values, run names, the method table


def test_ablation_tuned_uses_each_methods_own_file_and_refuses_a_missing_one(workspace, monkeypatch, tmp_path):
    _, params = workspace
    monkeypatch.chdir(tmp_path)
    kd, mate = method_table.get("kd"), method_table.get("mate_kd")
    write_tuned_values(kd, {"distill.kd_temperature": 5.5, "distill.recipe.lr": 0.02}, {"trials": 7})
    write_tuned_values(mate, {"distill.kd_temperature": 2.5, "distill.attribution_weight": 0.7}, {"trials": 9})
    kd_spec = resolve_spec(params, "kd", 0, "kd-seed0", tuned=True)
    mate_spec = resolve_spec(params, "mate_kd", 0, "mate_kd-seed0", tuned=True)
    assert kd_spec.distill.kd_temperature == 5.5 and kd_spec.distill.recipe.lr == 0.02
    assert kd_spec.distill.attribution_weight == params.distill.attribution_weight   # not kd's to set
    assert mate_spec.distill.kd_temperature == 2.5 and mate_spec.distill.attribution_weight == 0.7
    assert mate_spec.distill.recipe.lr == params.distill.recipe.lr                   # never inherited from kd
    assert kd_spec.tuned_trials == 7 and "tuned" in run_name(kd_spec, "ablation")
    shared = resolve_spec(params, "kd", 0, "kd-seed0", tuned=False)
    assert shared.distill.kd_temperature == params.distill.kd_temperature and shared.tuned_from is None
    with pytest.raises(ParamsError, match=r"matekd tune --method ca_mkd"):
        resolve_spec(params, "ca_mkd", 0, "ca_mkd-seed0", tuned=True)
    with pytest.raises(ParamsError, match="refusing to write distill.attribution_weight as tuned values of kd"):
        write_tuned_values(kd, {"distill.attribution_weight": 0.3}, {})


def test_run_names_are_unique_and_logged_params_are_the_methods_own(workspace):
    _, params = workspace
    names = {run_name(resolve_spec(params, m, s, "x"), kind)
             for m in METHODS for s in (0, 1) for kind in ("distill", "ablation")}
    assert len(names) == len(METHODS) * 2 * 2
    ce = resolve_spec(params, "ce", 0, "ce-seed0")
    logged = logged_params(ce, params, [])
    assert not any(k.startswith("distill.") and k.split(".")[1] in ("kd_temperature", "ce_weight",
                   "attribution_weight", "similarity_temperature") for k in logged)
    assert logged["distill.method"] == "ce" and "distill.recipe.lr" in logged


@pytest.fixture
def dummy_method():
    """A method registered only here: the rest of the code must pick it up from the table."""
    kd = method_table.get("mtkd_equal")
    row = method_table.register(method_table.Method(
        name="dummy_equal2", teachers="all", weighting="equal", weigh=kd.weigh, loss=kd.loss, terms=kd.terms,
        hyperparameters=kd.hyperparameters, summary="test-only: equal weights"))
    try:
        yield row
    finally:
        method_table.unregister(row.name)


def test_a_registered_method_needs_no_edit_outside_the_table(workspace, dummy_method, monkeypatch):
    root, params = workspace
    p = load_params(ROOT / "profiles" / "tiny.yaml", {"ablation.methods": ["ce", "dummy_equal2"],
                                                      "tracking.enabled": False})
    p.data = params.data
    opened = _recording(monkeypatch)
    metrics = run_distill(p, method="dummy_equal2", seed=0, ablation=True, progress=False)
    assert 0 <= metrics["val_acc"] <= 1
    (kwargs, recorder), = opened
    assert kwargs["run_name"] == "ablation dummy_equal2 seed0" and kwargs["tags"]["hyperparameters"].startswith("T=")
    epoch = next(m for _, m in recorder.metrics if "val_acc" in m)
    assert epoch["train_kd"] > 0 and "train_attr" not in epoch


def test_round_robin_assignment_of_groups_to_devices():
    from matekd.training.loop import assign_round_robin

    plan = assign_round_robin(["g0", "g1", "g2", "g3", "g4"], ["cuda:0", "cuda:1"])
    assert plan == [("cuda:0", ["g0", "g2", "g4"]), ("cuda:1", ["g1", "g3"])]
    assert assign_round_robin(["g0"], ["cuda:0", "cuda:1", "cuda:2"])[1:] == [("cuda:1", []), ("cuda:2", [])]
    assert assign_round_robin([1, 2], ["cpu", "cpu"]) == [("cpu", [1]), ("cpu", [2])]   # a device may repeat
    with pytest.raises(ValueError):
        assign_round_robin([1], [])


def test_matekd_ablation_spreads_groups_over_processes_and_writes_every_student(workspace, monkeypatch):
    """Two groups on two worker processes (two `cpu` devices stand in for two GPUs): every
    student's outputs are written, the same as training its group in this process."""
    root, params = workspace
    monkeypatch.setenv("MATEKD_TRACKING", "off")
    p = params.model_copy(deep=True)
    p.ablation.methods = ["ce", "mtkd_equal"]
    p.ablation.seeds = [0, 1]
    p.ablation.group_size = 2
    written = distill_stage.run_ablation(p, devices=["cpu", "cpu"], progress=False)
    assert len(written) == 4
    for method in ("ce", "mtkd_equal"):
        for seed in (0, 1):
            meta = load_tensors(root / "models" / "student" / f"{method}-seed{seed}.safetensors")[1]
            assert meta["method"] == method and meta["seed"] == str(seed) and meta["group_students"] == "2"
    assert not list((root / "checkpoints" / "groups").iterdir())


def test_a_student_trained_twice_writes_byte_identical_files_and_its_run_is_kept_apart(workspace, monkeypatch,
                                                                                         tmp_path):
    """Two tracked trainings of one student (different run ids) write the same bytes: the run
    that made the weights is a tag of the run and an index entry outside the DVC outputs."""
    import csv
    import io

    from matekd.paths import student_paths
    from matekd.stages.train_teacher import TIMING_KEYS
    from matekd.storage import read_safetensors_metadata, sha256_file
    from matekd.tracking import producing_run, read_folder
    from matekd.tracking.provenance import OUTPUT_TAG

    root, params = workspace
    monkeypatch.setenv("MATEKD_TRACKING", "offline")
    monkeypatch.setenv("MATEKD_OFFLINE_DIR", str(tmp_path / "offline"))
    paths = student_paths("twice")

    def outputs() -> dict[str, object]:
        metrics = read_json(paths["metrics"])
        rows = list(csv.DictReader(io.StringIO(paths["plots"].read_text())))
        return {"weights": paths["weights"].read_bytes(), "histograms": paths["histograms"].read_bytes(),
                "metrics": {k: v for k, v in metrics.items() if k not in TIMING_KEYS},
                "plots": [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]}

    run_distill(params, method="ce", seed=0, output_name="twice", progress=False)
    first, first_run = outputs(), producing_run(paths["weights"])
    run_distill(params, method="ce", seed=0, output_name="twice", progress=False)
    second, second_run = outputs(), producing_run(paths["weights"])
    assert first == second
    assert first["plots"] and "images_per_second" in paths["plots"].read_text()  # the timing column was dropped
    meta = read_safetensors_metadata(paths["weights"])
    assert not any("run" in key and key != "run_kind" for key in meta), meta
    runs = read_folder(tmp_path / "offline")
    assert len(runs) == 2 and first_run["run_id"] != second_run["run_id"] and second_run["mode"] == "offline"
    tag = OUTPUT_TAG.format(name="weights")
    assert {r.meta["tags"][tag] for r in runs.values()} == {sha256_file(paths["weights"])}
    assert second_run["run_id"] in runs and first_run["run_id"] in runs

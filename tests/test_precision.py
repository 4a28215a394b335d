"""The precision param: what `auto` picks, that bf16 really runs, and that bf16 CPU training
stays deterministic and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from matekd import precision
from matekd.errors import MatekdError
from matekd.models import build_model
from matekd.params import Recipe
from matekd.precision import active_precision, autocast, cpu_supports_bf16, resolve_precision, use_precision
from matekd.training.loop import model_input, prepare_model
from test_train import Crash, _data, _fit, crash_after_epoch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_cpu_bf16 = pytest.mark.skipif(not cpu_supports_bf16(),
                                    reason="this CPU has no native bf16 (no avx512_bf16/amx_bf16 or Arm bf16 flag)")


@pytest.mark.parametrize("native, device, choice, expected", [
    (True, CPU, "auto", "bf16"), (False, CPU, "auto", "fp32"), (False, CUDA, "auto", "bf16"),
    (True, CPU, "fp32", "fp32"), (True, CUDA, "fp32", "fp32"), (False, CPU, "bf16", "bf16"),
])
def test_auto_picks_bf16_on_cuda_and_on_cpus_with_native_bf16(monkeypatch, native, device, choice, expected):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native)
    assert resolve_precision(choice, device) == expected


def test_an_unknown_precision_is_refused_with_its_name():
    with pytest.raises(MatekdError, match="'fp16'"):
        resolve_precision("fp16", CPU)


def test_cpu_flags_are_read_from_proc_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "Path", lambda _: info)
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    for flags, expected in (("fpu sse avx512f", False), ("fpu avx512f avx512_bf16", True), ("amx_bf16 sse", True)):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        precision.cpu_supports_bf16.cache_clear()
        assert precision.cpu_supports_bf16() is expected, flags
    precision.cpu_supports_bf16.cache_clear()


def test_the_library_default_is_fp32_on_the_cpu_until_a_stage_resolves_the_param():
    assert active_precision(CPU) == "fp32" and active_precision(CUDA) == "bf16"
    model = prepare_model(nn.Conv2d(3, 4, 3), CPU)
    x = model_input(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), CPU)
    with autocast(CPU):
        assert model(x).dtype == torch.float32
    assert x.is_contiguous()


@needs_cpu_bf16
def test_bf16_really_runs_on_the_cpu_in_channels_last():
    use_precision("auto", CPU)
    model = prepare_model(nn.Conv2d(3, 4, 3), CPU)
    x = model_input(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), CPU)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    with autocast(CPU):
        assert model(x).dtype == torch.bfloat16


@needs_cpu_bf16
def test_bf16_cpu_training_is_bit_identical_and_resumes_exactly(tmp_path):
    use_precision("bf16", CPU)
    x, y = _data(4)
    recipe = Recipe(epochs=2, batch_size=16, lr=0.05)
    states, losses = [], []
    for _ in range(2):
        torch.manual_seed(5)
        model = prepare_model(build_model("resnet20"), CPU)
        losses.append([r["train_loss"] for r in _fit(model, recipe, x, y).history])
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert losses[0] == losses[1]

    torch.manual_seed(5)
    with pytest.raises(Crash):
        _fit(prepare_model(build_model("resnet20"), CPU), recipe, x, y, tmp_path, epoch_hook=crash_after_epoch(1))
    torch.manual_seed(99)   # resume must not depend on the new process's initialisation
    resumed = prepare_model(build_model("resnet20"), CPU)
    _fit(resumed, recipe, x, y, tmp_path)
    for key, value in states[0].items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    # and bf16 is not fp32 under another name: the same run in fp32 ends elsewhere
    use_precision("fp32", CPU)
    torch.manual_seed(5)
    fp32 = prepare_model(build_model("resnet20"), CPU)
    _fit(fp32, recipe, x, y)
    assert not all(torch.equal(v, fp32.state_dict()[k]) for k, v in states[0].items())

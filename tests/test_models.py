"""The CIFAR model zoo: sizes, shapes and the CAM interface."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from matekd.errors import ParamsError
from matekd.models import MODEL_NAMES, build_model, count_parameters, model_size_mb

torch.set_num_threads(1)

RESNETS = ("resnet20", "resnet56", "resnet110")
# Published sizes (He et al. 2016 table 6; method.md; anchors.md).
PUBLISHED_PARAMS = {"resnet20": 0.27e6, "resnet56": 0.86e6, "resnet110": 1.73e6,
                    "vgg19_bn": 20.0e6, "densenet121": 6.96e6}


def _conv(cin: int, cout: int, k: int, bias: bool = False) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def _bn(c: int) -> int:
    return 2 * c


def _resnet_params(n: int, classes: int = 10) -> int:
    """Hand count: stem conv+BN, 3 stages of n BasicBlocks (option A: no shortcut params), head."""
    total = _conv(3, 16, 3) + _bn(16)
    cin = 16
    for planes in (16, 32, 64):
        for _ in range(n):
            total += _conv(cin, planes, 3) + _bn(planes) + _conv(planes, planes, 3) + _bn(planes)
            cin = planes
    return total + 64 * classes + classes


def _vgg19_params(classes: int = 10) -> int:
    total, cin = 0, 3
    for c in (64, 64, 128, 128) + (256,) * 4 + (512,) * 8:
        total += _conv(cin, c, 3, bias=True) + _bn(c)
        cin = c
    return total + 512 * classes + classes


def _densenet121_params(classes: int = 10) -> int:
    g, planes = 32, 64
    total = _conv(3, planes, 3)
    for i, n in enumerate((6, 12, 24, 16)):
        for _ in range(n):
            total += _bn(planes) + _conv(planes, 4 * g, 1) + _bn(4 * g) + _conv(4 * g, g, 3)
            planes += g
        if i < 3:
            total += _bn(planes) + _conv(planes, planes // 2, 1)
            planes //= 2
    return total + _bn(planes) + planes * classes + classes


HAND_COUNTS = {"resnet20": _resnet_params(3), "resnet56": _resnet_params(9),
               "resnet110": _resnet_params(18), "vgg19_bn": _vgg19_params(),
               "densenet121": _densenet121_params()}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build_model(name).eval() for name in MODEL_NAMES}


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_counts(models, name):
    n = count_parameters(models[name])
    assert n == HAND_COUNTS[name]
    assert abs(n - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.02


def test_model_size_mb_is_fp32_params_plus_float_buffers(models):
    m = models["resnet20"]
    bn_channels = sum(mod.num_features for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
    expected = (count_parameters(m) + 2 * bn_channels) * 4 / 1e6
    assert model_size_mb(m) == pytest.approx(expected)
    assert model_size_mb(m) == pytest.approx(1.1, abs=0.05)  # method.md: ResNet20 1.1MB


def test_unknown_model_lists_allowed_names():
    with pytest.raises(ParamsError) as err:
        build_model("resnet18")
    for name in MODEL_NAMES:
        assert name in str(err.value)


def test_num_classes():
    m = build_model("resnet20", num_classes=100).eval()
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


EXPECTED_CAM_CHANNELS = {"resnet20": 64, "resnet56": 64, "resnet110": 64, "vgg19_bn": 256, "densenet121": 1024}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_and_cam_shapes(models, batch, name):
    m = models[name]
    with torch.no_grad():
        logits = m(batch)
        logits_cam, acts = m.forward_cam(batch)
    assert logits.shape == (2, 10)
    assert acts.shape == (2, EXPECTED_CAM_CHANNELS[name], 8, 8)
    torch.testing.assert_close(logits_cam, logits, rtol=0, atol=0)
    assert isinstance(m.cam_layer, str) and m.cam_layer
    if name != "densenet121":
        # Post-ReLU CAM layers; DenseNet's block-3 output is a concatenation of conv outputs.
        assert acts.min() >= 0
        assert (acts == 0).any()  # a ReLU really was applied
    if name in RESNETS:
        assert m.cam_linear is m.linear and isinstance(m.cam_linear, nn.Linear)
    else:
        assert m.cam_linear is None


def test_resnet20_logits_are_linear_of_pooled_cam(models, batch):
    """The closed-form CAM precondition: logits = W . GAP(A) + b exactly."""
    m = models["resnet20"]
    with torch.no_grad():
        logits, acts = m.forward_cam(batch)
        torch.testing.assert_close(logits, m.cam_linear(acts.mean((2, 3))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cam_activations_take_gradients(models, batch, name):
    """Grad-CAM differentiates the logits w.r.t. the activations: in-place ops must not break it."""
    m = models[name]
    logits, acts = m.forward_cam(batch)
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), acts)
    assert grad.shape == acts.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", ("resnet20", "densenet121"))
def test_channels_last_and_bf16_autocast(models, batch, name):
    m = models[name]
    with torch.no_grad():
        ref = m(batch)
        m_cl = m.to(memory_format=torch.channels_last)
        x = batch.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(m_cl(x), ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, acts = m_cl.forward_cam(x)
    m.to(memory_format=torch.contiguous_format)
    assert logits.shape == (2, 10) and acts.shape[-2:] == (8, 8)
    assert torch.isfinite(logits.float()).all()
    # bf16 keeps ~3 significant digits: close to the fp32 logits, not equal.
    torch.testing.assert_close(logits.float(), ref, rtol=0.1, atol=0.1)


def test_resnet_training_step_updates_weights():
    torch.manual_seed(0)
    m = build_model("resnet20").train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    before = m.conv1.weight.detach().clone()
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    opt.step()
    assert not torch.equal(before, m.conv1.weight)

"""Grad-CAM: hand-computed values, autograd == closed form, side-effect freedom, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from matekd.attribution import (
    closed_form_cam,
    grad_cam,
    gradcam_from_activations,
    model_cam,
    normalize_maps,
    resize_maps,
)

torch.set_num_threads(1)


class HandNet(nn.Module):
    """1x1 conv (1->2 channels) + ReLU as the CAM layer, then a linear head on the flattened
    2x2 activations (not GAP), so alpha is a genuine spatial mean of varying gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=1)
        self.head = nn.Linear(8, 2)
        self.cam_linear = None
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([-2.0, 3.0]))
            # Flatten order: channel 0 cells (row-major), then channel 1 cells.
            self.head.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0, -2.0, 0.0, 0.0, 0.0],
                                                 [0.0, 0.0, 0.0, -4.0, 2.0, 2.0, 2.0, 2.0]]))
            self.head.bias.copy_(torch.tensor([0.5, -0.5]))

    def forward_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.relu(self.conv(x))
        return self.head(a.flatten(1)), a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_cam(x)[0]


class GapNet(nn.Module):
    """conv-BN-ReLU-conv-BN-ReLU CAM layer, GAP + linear head (closed form applies)."""

    def __init__(self, closed_form: bool = True, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.linear = nn.Linear(5, classes)
        self.cam_linear = self.linear if closed_form else None

    def forward_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.linear(a.mean(dim=(2, 3))), a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_cam(x)[0]


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics so eval and train mode give different outputs."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


# ---------------------------------------------------------------------------- hand values

def test_gradcam_matches_hand_computation() -> None:
    model = HandNet()
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[4.0, 3.0], [2.0, 1.0]]]])
    targets = torch.tensor([0, 1])
    # Image 0: A0 = relu(x-2) = [[0,0],[1,2]], A1 = relu(3-x) = [[2,1],[0,0]].
    #   class 0: alpha = (mean(1,1,1,1), mean(-2,0,0,0)) = (1, -0.5)
    #   M = relu(A0 - 0.5 A1) = relu([[-1,-0.5],[1,2]]) = [[0,0],[1,2]]
    # Image 1: A0 = [[2,1],[0,0]], A1 = [[0,0],[1,2]].
    #   class 1: alpha = (mean(0,0,0,-4), mean(2,2,2,2)) = (-1, 2)
    #   M = relu(-A0 + 2 A1) = relu([[-2,-1],[2,4]]) = [[0,0],[2,4]]
    expected = torch.tensor([[[0.0, 0.0], [1.0, 2.0]], [[0.0, 0.0], [2.0, 4.0]]])
    logits, acts = model.forward_cam(x)
    torch.testing.assert_close(gradcam_from_activations(acts, logits, targets), expected)
    torch.testing.assert_close(grad_cam(model, x, targets), expected)
    # Swapped targets: image 0 class 1 -> relu(-A0 + 2A1) = [[4,2],[0,0]];
    # image 1 class 0 -> relu(A0 - 0.5A1) = [[2,1],[0,0]] - [[0,0],[0.5,1]] -> [[2,1],[0,0]].
    swapped = torch.tensor([[[4.0, 2.0], [0.0, 0.0]], [[2.0, 1.0], [0.0, 0.0]]])
    torch.testing.assert_close(grad_cam(model, x, torch.tensor([1, 0])), swapped)


def test_gradcam_prediction_targets_default() -> None:
    model = HandNet()
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[4.0, 3.0], [2.0, 1.0]]]])
    predictions = model(x).argmax(1)
    torch.testing.assert_close(grad_cam(model, x), grad_cam(model, x, predictions))


def test_closed_form_hand_value() -> None:
    acts = torch.tensor([[[[1.0, 0.0], [2.0, 3.0]], [[0.0, 4.0], [1.0, 1.0]]]])  # [1,2,2,2]
    weight = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    # class 0: relu(2*A0 - A1)/4 = relu([[2,-4],[3,5]])/4
    expected = torch.tensor([[[0.5, 0.0], [0.75, 1.25]]])
    torch.testing.assert_close(closed_form_cam(acts, weight, torch.tensor([0])), expected)
    linear = nn.Linear(2, 2)
    with torch.no_grad():
        linear.weight.copy_(weight)
    torch.testing.assert_close(closed_form_cam(acts, linear, torch.tensor([0])), expected)


# ---------------------------------------------------------------- autograd == closed form

def test_autograd_equals_closed_form_on_gap_net() -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)   # GapNet's init draws from the global generator; some draws give an all-zero map
    model = GapNet().double().eval()
    _randomise_bn(model, gen)
    x = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64)
    logits, acts = model.forward_cam(x)
    for targets in (torch.tensor([0, 2, 1, 2]), logits.argmax(1)):
        auto = gradcam_from_activations(acts, logits, targets)
        closed = closed_form_cam(acts, model.linear, targets)
        assert auto.abs().sum() > 0
        torch.testing.assert_close(auto, closed)


def test_gradcam_autograd_equals_closed_form_resnet20() -> None:
    from matekd.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20").double().eval()
    assert model.cam_linear is not None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels = torch.tensor([3, 7, 0, 9])
    logits, acts = model.forward_cam(x)
    assert acts.shape == (4, 64, 8, 8)
    for targets in (labels, logits.argmax(1)):
        auto = gradcam_from_activations(acts, logits, targets)
        closed = closed_form_cam(acts, model.cam_linear, targets)
        assert (auto.flatten(1).amax(1) > 0).all(), "degenerate all-zero maps prove nothing"
        torch.testing.assert_close(auto, closed, rtol=1e-9, atol=1e-12)
        # The public entry point (fast path) agrees too.
        torch.testing.assert_close(grad_cam(model, x, targets), closed, rtol=1e-9, atol=1e-12)


def test_resnet20_create_graph_reaches_conv_weights() -> None:
    from matekd.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20")
    x = torch.randn(2, 3, 32, 32)
    logits, acts = model.forward_cam(x)
    maps = model_cam(model, acts, logits, torch.tensor([1, 2]), create_graph=True)
    maps.sum().backward()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


def test_model_cam_uses_closed_form_without_backward() -> None:
    model = GapNet().eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        logits, acts = model.forward_cam(x)       # no graph: autograd would be impossible
    targets = torch.tensor([0, 1])
    maps = model_cam(model, acts, logits, targets)
    torch.testing.assert_close(maps, closed_form_cam(acts, model.linear, targets))
    model.cam_linear = None
    with pytest.raises(ValueError, match="require grad"):
        model_cam(model, acts, logits, targets)


# ------------------------------------------------------------------------- side effects

def test_grad_cam_preserves_modes_bn_stats_and_grads() -> None:
    gen = torch.Generator().manual_seed(2)
    model = GapNet(closed_form=False)
    _randomise_bn(model, gen)
    model.train()
    model.bn1.eval()                               # a submodule set differently
    x = torch.randn(3, 3, 6, 6, generator=gen)
    model(x).sum().backward()                      # existing .grad tensors
    model.linear.bias.grad = None                  # and one parameter without .grad
    modes = {name: m.training for name, m in model.named_modules()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    grads = {name: (p.grad.clone() if p.grad is not None else None)
             for name, p in model.named_parameters()}

    for create_graph in (False, True):
        maps = grad_cam(model, x, torch.tensor([0, 1, 2]), create_graph=create_graph)
        assert maps.shape == (3, 6, 6)

    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.training and not model.bn1.training and model.bn2.training
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert model.bn2.num_batches_tracked.item() == buffers["bn2.num_batches_tracked"].item()
    for name, p in model.named_parameters():
        if grads[name] is None:
            assert p.grad is None, name
        else:
            assert torch.equal(p.grad, grads[name]), name


def test_grad_cam_runs_in_eval_mode() -> None:
    gen = torch.Generator().manual_seed(3)
    model = GapNet(closed_form=False)
    _randomise_bn(model, gen)
    x = torch.randn(4, 3, 6, 6, generator=gen)
    targets = torch.tensor([0, 1, 2, 0])
    model.eval()
    logits, acts = model.forward_cam(x)
    eval_maps = gradcam_from_activations(acts, logits, targets)
    twin = copy.deepcopy(model).train()          # a train-mode forward would move BN stats
    logits, acts = twin.forward_cam(x)
    train_maps = gradcam_from_activations(acts, logits, targets)
    model.train()
    assert not torch.allclose(eval_maps, train_maps)     # the check below can fail
    torch.testing.assert_close(grad_cam(model, x, targets), eval_maps)


def test_grad_cam_under_no_grad_inference_mode_and_frozen() -> None:
    model = HandNet()
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    target = torch.tensor([0])
    with torch.no_grad():
        torch.testing.assert_close(grad_cam(model, x, target), expected)
    with torch.inference_mode():
        xi = x.clone()
        torch.testing.assert_close(grad_cam(model, xi, target), expected)
    for p in model.parameters():
        p.requires_grad_(False)                    # a frozen teacher
    torch.testing.assert_close(grad_cam(model, x, target), expected)
    assert not x.requires_grad
    maps, logits = grad_cam(model, x, target, return_logits=True)
    torch.testing.assert_close(logits, model(x))
    assert not maps.requires_grad and not logits.requires_grad


def test_gradcam_from_activations_leaves_param_grads() -> None:
    model = HandNet()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    x = torch.randn(2, 1, 2, 2)
    logits, acts = model.forward_cam(x)
    gradcam_from_activations(acts, logits, torch.tensor([0, 1]), create_graph=True)
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
    # The graph is retained: the caller can still backpropagate a loss through the logits.
    logits.sum().backward()
    assert not torch.equal(model.head.weight.grad, torch.full_like(model.head.weight, 7.0))


# ---------------------------------------------------------------------------- gradients

def test_create_graph_map_reaches_conv_weights() -> None:
    torch.manual_seed(4)
    model = HandNet()
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    maps = grad_cam(model, x, torch.tensor([0]), create_graph=True)
    assert maps.requires_grad
    maps.sum().backward()
    # dM/dw_conv: M = relu(A0 - 0.5 A1), only cells (1,0),(1,1) active where A0 = x - 2 > 0
    # and A1 = 0, so d sum(M)/d w0 = x[1,0] + x[1,1] = 7 and d/d b0 = 2.
    assert model.conv.weight.grad[0].item() == pytest.approx(7.0)
    assert model.conv.bias.grad[0].item() == pytest.approx(2.0)
    # alpha depends on the head weights (second-order path through create_graph).
    assert model.head.weight.grad.abs().sum() > 0
    assert not grad_cam(model, x, torch.tensor([0])).requires_grad


def test_create_graph_gradients_match_closed_form() -> None:
    gen = torch.Generator().manual_seed(5)
    auto_model = GapNet(closed_form=False).double().eval()
    _randomise_bn(auto_model, gen)
    closed_model = copy.deepcopy(auto_model)
    closed_model.cam_linear = closed_model.linear
    x = torch.randn(3, 3, 6, 6, generator=gen, dtype=torch.float64)
    targets = torch.tensor([2, 0, 1])
    probe = torch.randn(3, 6, 6, generator=gen, dtype=torch.float64)
    results = []
    for model in (auto_model, closed_model):
        logits, acts = model.forward_cam(x)
        maps = model_cam(model, acts, logits, targets, create_graph=True)
        (maps * probe).sum().backward()
        results.append((maps.detach(), model.conv1.weight.grad.clone(),
                        model.linear.weight.grad.clone()))
    for a, b in zip(*results):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------ resize, norm

def test_resize_maps() -> None:
    gen = torch.Generator().manual_seed(6)
    maps = torch.rand(2, 3, 16, 16, generator=gen)
    assert resize_maps(maps, 16) is maps
    # Bilinear (align_corners=False) at exactly half size samples at 2i+0.5: the 2x2 mean.
    expected = F.avg_pool2d(maps, 2)
    torch.testing.assert_close(resize_maps(maps, 8), expected)
    torch.testing.assert_close(resize_maps(maps[0], (8, 8)), expected[0])
    assert resize_maps(torch.rand(5, 8, 8), 32).shape == (5, 32, 32)
    # Upsampling a constant map keeps it constant.
    torch.testing.assert_close(resize_maps(torch.full((1, 4, 4), 3.0), 8), torch.full((1, 8, 8), 3.0))


def test_normalize_maps() -> None:
    gen = torch.Generator().manual_seed(7)
    maps = torch.rand(2, 3, 4, 4, generator=gen) * 5
    maps[1, 2] = 0.0
    by_max = normalize_maps(maps, "max")
    by_l2 = normalize_maps(maps, "l2")
    torch.testing.assert_close(by_max[0].flatten(1).amax(1), torch.ones(3))
    torch.testing.assert_close(by_l2[0].flatten(1).norm(dim=1), torch.ones(3))
    torch.testing.assert_close(by_max[0, 1], maps[0, 1] / maps[0, 1].max())
    assert torch.equal(by_max[1, 2], torch.zeros(4, 4)) and torch.equal(by_l2[1, 2], torch.zeros(4, 4))
    with pytest.raises(ValueError):
        normalize_maps(maps, "sum")  # type: ignore[arg-type]

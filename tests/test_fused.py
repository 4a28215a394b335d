"""FusedCifarResNet: K students in one network compute exactly what each computes alone.

Tolerances. The fusion is exact in exact arithmetic; in float64 the fused and lone results
agree to ~1e-12 (on CPU here: bit for bit). In float32 the grouped CPU convolution may sum in
another order than the dense one (the 3-channel stem differs by ~7e-7), and twenty layers
amplify that to ~1e-6 of the activations' scale, so float32 comparisons use 1e-5 relative to
the tensor's largest magnitude. Training is compared in float64: after even one step a float32
rounding difference can flip a ReLU whose input is within ~1e-5 of zero, changing one
gradient entry by O(its size), and SGD at lr 0.1 amplifies that (seen here: 1e-3 in one
gradient after one step, 5e-2 in the stem weights after three); that is float32 sensitivity
to summation order, not a fusion error.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from matekd.attribution import closed_form_cam, gradcam_from_activations
from matekd.models.fused import FusedCifarResNet
from matekd.models.resnet import CifarResNet, resnet20, resnet56

torch.set_num_threads(1)

TOL = {"rtol": 1e-5, "atol": 1e-5}
TOL_64 = 1e-10


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5, msg: str = "") -> None:
    """max |got - want| <= tol * max(1, max |want|): absolute below unit scale, else relative
    to the tensor's scale (not per element: near-zero entries carry the scale's rounding)."""
    assert got.shape == want.shape, (msg, got.shape, want.shape)
    scale = max(1.0, want.detach().abs().max().item()) if want.numel() else 1.0
    diff = got.detach().double() - want.detach().double()
    err = diff.abs().max().item() if want.numel() else 0.0
    assert err <= tol * scale, f"{msg}: max abs error {err:.3g} > {tol:g} * scale {scale:.3g}"


def make_students(k: int, depth: int = 20, num_classes: int = 10, seed0: int = 0,
                  bn_hparams: bool = True) -> list[CifarResNet]:
    students = []
    for i in range(k):
        torch.manual_seed(seed0 + 101 * i)
        s = CifarResNet(depth, num_classes)
        # Non-trivial BN affine parameters and running stats, so copying them is tested.
        with torch.no_grad():
            for m in s.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(7 + i)
                    if bn_hparams:     # non-default: must be carried over
                        m.momentum, m.eps = 0.3, 1e-3
            s.linear.bias.uniform_(-0.1, 0.1)
        students.append(s)
    return students


def batches(k: int, b: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, b, 3, 32, 32, generator=g)


def assert_state_equal(got: dict, want: dict, tol: float) -> None:
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        assert got[name].dtype == value.dtype, name
        if value.is_floating_point():
            assert_close(got[name], value, tol, msg=name)
        else:
            assert torch.equal(got[name], value), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("train", [True, False])
def test_forward_matches_each_student(train: bool, dtype: torch.dtype) -> None:
    tol = 1e-5 if dtype == torch.float32 else TOL_64
    students = [s.to(dtype) for s in make_students(3)]
    fused = FusedCifarResNet.from_students(students)
    assert fused.num_students == 3 and fused.depth == 20 and fused.num_classes == 10
    for s in students:
        s.train(train)
    fused.train(train)
    x = batches(3, 6).to(dtype)
    with torch.no_grad():
        logits, acts = fused.forward_cam(x)
        assert logits.shape == (3, 6, 10) and acts.shape == (3, 6, 64, 8, 8)
        assert logits.dtype == dtype
        for k, s in enumerate(students):
            want_logits, want_acts = s.forward_cam(x[k])
            assert_close(logits[k], want_logits, tol, msg=f"logits {k}")
            assert_close(acts[k], want_acts, tol, msg=f"activations {k}")
    # BN running statistics and counters after one train-mode forward are each student's own
    # (in eval mode: unchanged, still equal).
    state_tol = 1e-6 if dtype == torch.float32 else TOL_64
    for k, sd in enumerate(fused.student_state_dicts()):
        assert_state_equal(sd, students[k].state_dict(), tol=state_tol)
    for k, plain in enumerate(fused.to_students()):
        assert plain.training == train and plain.layer2[1].bn1.eps == 1e-3
        assert plain.layer2[1].bn1.momentum == 0.3
        assert_state_equal(plain.state_dict(), students[k].state_dict(), tol=state_tol)


def test_forward_with_channels_last_and_bf16_autocast() -> None:
    students = make_students(2)
    fused = FusedCifarResNet.from_students(students).eval()
    x = batches(2, 4)
    with torch.no_grad():
        ref_logits, ref_acts = fused.forward_cam(x)
        assert torch.equal(fused(x), ref_logits)
        cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)
        logits, acts = cl.forward_cam(x)
        # The fused map stayed channels-last through every layer: channels innermost.
        assert acts.stride(2) == 1 and acts.stride(-1) == 2 * 64
        assert_close(logits, ref_logits)
        assert_close(acts, ref_acts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits16, acts16 = fused.forward_cam(x)
            maps16 = fused.cam(acts16, logits16.argmax(-1))
        assert logits16.dtype == torch.bfloat16 and maps16.shape == (2, 4, 8, 8)
        torch.testing.assert_close(logits16.float(), ref_logits, rtol=0.1, atol=0.2)


def test_channels_last_training_step_matches_contiguous() -> None:
    """Forward and backward of the channels-last layout (as train.prepare_model uses on CUDA)
    equal the contiguous one's, in float64 so the comparison is exact."""
    students = [s.double() for s in make_students(2)]
    plain = FusedCifarResNet.from_students(students).train()
    cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    assert cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = batches(2, 4, seed=11).double()
    y = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    grads = []
    for model in (plain, cl):
        logits, acts = model.forward_cam(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) + model.cam(acts, y).mean()
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for (name, _), g_plain, g_cl in zip(plain.named_parameters(), *grads):
        assert_close(g_cl, g_plain, TOL_64, msg=name)


def test_shortcut_pads_each_student_separately_channels_last() -> None:
    from matekd.models.fused import _FusedShortcutA
    from matekd.models.resnet import _ShortcutA

    x = torch.randn(2, 3 * 16, 8, 8)
    fused, single = _FusedShortcutA(3, 16, 32, 2), _ShortcutA(16, 32, 2)
    want = torch.cat([single(c) for c in x.chunk(3, dim=1)], dim=1)
    assert torch.equal(fused(x), want)
    out_cl = fused(x.contiguous(memory_format=torch.channels_last))
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out_cl, want)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def test_training_matches_students_trained_alone() -> None:
    k, b, steps = 3, 8, 3
    students = [s.double() for s in make_students(k)]
    fused = FusedCifarResNet.from_students(students).train()
    fused_opt = _sgd(fused.parameters())
    alone = [copy.deepcopy(s).train() for s in students]
    opts = [_sgd(s.parameters()) for s in alone]
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(k, b, 3, 32, 32, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (k, b), generator=g)
        logits, acts = fused.forward_cam(x)
        # Per-student losses, one of them with a CAM term, so cam() gradients are checked too.
        maps = fused.cam(acts, y)
        loss = sum(F.cross_entropy(logits[i], y[i]) + (i == 1) * maps[i].square().mean()
                   for i in range(k))
        fused_opt.zero_grad()
        loss.backward()
        fused_opt.step()
        for i, (s, opt) in enumerate(zip(alone, opts)):
            lg, a = s.forward_cam(x[i])
            lone_loss = F.cross_entropy(lg, y[i])
            if i == 1:
                lone_loss = lone_loss + closed_form_cam(a, s.linear, y[i]).square().mean()
            opt.zero_grad()
            lone_loss.backward()
            opt.step()
    for i, sd in enumerate(fused.student_state_dicts()):
        assert_state_equal(sd, alone[i].state_dict(), tol=TOL_64)
        # Training moved the students (so the comparison is not vacuous).
        assert not torch.allclose(sd["conv1.weight"], students[i].conv1.weight)
    # The fused momentum buffers are the students' concatenated (element-wise optimiser).
    for name in ("layer2.0.conv1.weight", "layer3.2.bn2.bias"):
        fused_buf = fused_opt.state[fused.get_parameter(name)]["momentum_buffer"]
        lone_bufs = [o.state[s.get_parameter(name)]["momentum_buffer"] for s, o in zip(alone, opts)]
        assert_close(fused_buf, torch.cat(lone_bufs), TOL_64, msg=name)
    head_buf = fused_opt.state[fused.linear.weight]["momentum_buffer"]
    lone_head = [o.state[s.linear.weight]["momentum_buffer"] for s, o in zip(alone, opts)]
    assert_close(head_buf, torch.stack(lone_head), TOL_64, msg="head")


def test_cam_matches_closed_form_and_gradcam() -> None:
    students = [s.eval() for s in make_students(3)]
    fused = FusedCifarResNet.from_students(students).eval()
    x = batches(3, 5, seed=3)
    targets = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(4))
    _, acts = fused.forward_cam(x)
    maps = fused.cam(acts, targets)
    assert maps.shape == (3, 5, 8, 8)
    for k, s in enumerate(students):
        torch.testing.assert_close(maps[k], closed_form_cam(acts[k], s.linear, targets[k]),
                                   **TOL)
        lone_logits, lone_acts = s.forward_cam(x[k])
        grad_maps = gradcam_from_activations(lone_acts, lone_logits, targets[k])
        assert_close(maps[k].detach(), grad_maps)
    # Differentiable w.r.t. activations and head weights, with closed_form_cam's gradients.
    leaf = acts.detach().requires_grad_(True)
    weight = fused.linear.weight
    g_acts, g_weight = torch.autograd.grad(fused.cam(leaf, targets).square().sum(),
                                           (leaf, weight))
    for k in range(3):
        leaf_k = acts[k].detach().requires_grad_(True)
        w_k = weight[k].detach().requires_grad_(True)
        lone_maps = closed_form_cam(leaf_k, w_k, targets[k])
        want = torch.autograd.grad(lone_maps.square().sum(), (leaf_k, w_k))
        assert_close(g_acts[k], want[0], msg="dcam/dA")
        assert_close(g_weight[k], want[1], msg="dcam/dW")
    maps.sum().backward()
    assert fused.linear.weight.grad is not None and fused.linear.weight.grad.abs().sum() > 0
    assert fused.layer3[-1].conv2.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        fused.cam(acts, targets[:, :4])


def test_student_state_dicts_round_trip() -> None:
    # Default BN eps/momentum: these are hyperparameters, not state, so a fresh resnet20
    # reproduces a student from its state dict alone exactly when they are the defaults.
    students = make_students(2, bn_hparams=False)
    fused = FusedCifarResNet.from_students(students).eval()
    x = batches(2, 3)
    sds = fused.student_state_dicts()
    plain_keys = resnet20().state_dict()
    for k, sd in enumerate(sds):
        assert {n: t.shape for n, t in sd.items()} == {n: t.shape for n, t in plain_keys.items()}
        assert int(sd["bn1.num_batches_tracked"]) == 7 + k
        fresh = resnet20()
        fresh.load_state_dict(sd)
        fresh.eval()
        with torch.no_grad():
            assert_close(fresh(x[k]), fused(x)[k])
            assert torch.equal(fresh(x[k]), students[k].eval()(x[k]))
    # Clones, not views: changing the fused model leaves the exported dicts alone.
    before = sds[0]["conv1.weight"].clone()
    with torch.no_grad():
        fused.conv1.weight.add_(1.0)
    assert torch.equal(sds[0]["conv1.weight"], before)
    # to_students gives plain models with the same outputs.
    with torch.no_grad():
        for k, s in enumerate(fused.to_students()):
            assert_close(s(x[k]), fused(x)[k])


def test_single_student() -> None:
    (student,) = make_students(1)
    fused = FusedCifarResNet.from_students([student]).train()
    student.train()
    x = batches(1, 4)
    logits, acts = fused.forward_cam(x)
    want_logits, want_acts = student.forward_cam(x[0])
    assert_close(logits[0], want_logits)
    assert_close(acts[0], want_acts)
    assert_state_equal(fused.student_state_dicts()[0], student.state_dict(), tol=1e-5)


def test_mismatched_students_raise() -> None:
    with pytest.raises(ValueError, match="depth"):
        FusedCifarResNet.from_students([resnet20(), resnet56()])
    with pytest.raises(ValueError, match="num_classes"):
        FusedCifarResNet.from_students([resnet20(10), resnet20(100)])
    odd = resnet20()
    odd.layer1[0].bn1.eps = 1e-3
    with pytest.raises(ValueError, match="eps"):
        FusedCifarResNet.from_students([resnet20(), odd])
    with pytest.raises(ValueError, match="dtype"):
        FusedCifarResNet.from_students([resnet20(), resnet20().double()])
    with pytest.raises(ValueError, match="at least one"):
        FusedCifarResNet.from_students([])
    fused = FusedCifarResNet.from_students([resnet20(), resnet20()])
    with pytest.raises(ValueError, match="input"):
        fused(torch.randn(3, 2, 3, 32, 32))


def test_resnet56_tiny_batch() -> None:
    k = 2
    students = [s.double() for s in make_students(k, depth=56, num_classes=100)]
    fused = FusedCifarResNet.from_students(students).train()
    assert fused.depth == 56
    x = batches(k, 2, seed=9).double()
    y = torch.tensor([[1, 2], [3, 4]])
    logits, acts = fused.forward_cam(x)
    loss = sum(F.cross_entropy(logits[i], y[i]) for i in range(k))
    loss.backward()
    for i, s in enumerate(students):
        s.train()
        lg, a = s.forward_cam(x[i])
        assert_close(logits[i], lg, TOL_64)
        assert_close(acts[i], a, TOL_64)
        F.cross_entropy(lg, y[i]).backward()
        fused_grad = fused.layer2[4].conv2.weight.grad.unflatten(0, (k, -1))[i]
        assert_close(fused_grad, s.layer2[4].conv2.weight.grad, TOL_64)
        assert_close(fused.linear.weight.grad[i], s.linear.weight.grad, TOL_64)
    for i, sd in enumerate(fused.student_state_dicts()):
        assert_state_equal(sd, students[i].state_dict(), tol=TOL_64)

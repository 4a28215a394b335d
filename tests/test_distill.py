"""MATE-KD maths: similarity, teacher weights, the loss (through losses.method_loss, as training
computes it), tau schedule, weight statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from matekd import methods as method_table
from matekd.attribution import model_cam
from matekd.losses import LossInputs, attribution_error, cross_entropy, distillation, method_loss
from matekd.params import Recipe, distill_params
from matekd.weighting import (
    WeightingInputs,
    confidence_weights,
    effective_tau,
    final_tau,
    histogram_edges,
    relative_entropy,
    similarity,
    tau_at_epoch,
    teacher_weights,
    weight_statistics,
)

torch.set_num_threads(1)
RECIPE = Recipe(epochs=3, batch_size=8, lr=0.1)


def mate_kd_loss(s, t, y, w, sm, tm, temp, alpha, beta, map_norm="max"):
    """MATE-KD's terms and total as 0-dim tensors {total, ce, kd, attr}, through the loss
    function training calls; a term the method does not compute (attr when beta = 0) is 0.
    Without teachers (t None) it is the `ce` method, which alpha = 1 means."""
    values = distill_params(recipe=RECIPE, kd_temperature=temp, ce_weight=alpha, attribution_weight=beta,
                            map_norm=map_norm)
    if t is None and alpha != 1:
        raise ValueError("teacher logits and weights are required unless ce_weight == 1")
    method = method_table.get("ce" if t is None else "mate_kd")
    means, total = method_loss(method, LossInputs(s, y, t, w, None, sm, tm), values)
    zero = total.new_zeros(())
    return {"total": total[0], **{k: means[k][0] if k in means else zero for k in ("ce", "kd", "attr")}}


class TinyStudent(nn.Module):
    """conv-ReLU-conv-ReLU CAM layer + GAP + linear; `closed_form` toggles cam_linear."""

    def __init__(self, closed_form: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.linear = nn.Linear(6, 5)
        self.cam_linear = self.linear if closed_form else None

    def forward_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.linear(a.mean(dim=(2, 3))), a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_cam(x)[0]


# ------------------------------------------------------------------------------ similarity

def test_similarity_identical_and_orthogonal() -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(3, 4, 4, generator=gen)
    other = torch.rand(3, 4, 4, generator=gen)
    sim = similarity(s, torch.stack([s, 2.5 * s, other]))
    assert sim.shape == (3, 3)
    torch.testing.assert_close(sim[0], torch.ones(3))
    torch.testing.assert_close(sim[1], torch.ones(3))      # scale invariant
    assert (sim[2] < 1 - 1e-3).all()
    # Disjoint supports are orthogonal.
    left = torch.zeros(2, 4, 4)
    left[:, :, :2] = torch.rand(2, 4, 2, generator=gen) + 0.1
    right = torch.zeros(2, 4, 4)
    right[:, :, 2:] = torch.rand(2, 4, 2, generator=gen) + 0.1
    torch.testing.assert_close(similarity(left, right[None]), torch.zeros(1, 2))
    # A zero map is guarded: similarity 0, finite.
    torch.testing.assert_close(similarity(torch.zeros(1, 4, 4), s[None, :1]), torch.zeros(1, 1))


def test_similarity_pearson_and_clip() -> None:
    gen = torch.Generator().manual_seed(1)
    s = torch.rand(2, 5, 5, generator=gen)
    t = torch.rand(2, 2, 5, 5, generator=gen)
    base = similarity(s, t, kind="pearson")
    torch.testing.assert_close(similarity(s + 3.0, t - 0.7, kind="pearson"), base)
    assert not torch.allclose(similarity(s + 3.0, t, kind="cosine"), similarity(s, t, kind="cosine"))
    # Pearson against an independent formula (numpy corrcoef).
    for k in range(2):
        for b in range(2):
            r = np.corrcoef(s[b].flatten().numpy(), t[k, b].flatten().numpy())[0, 1]
            assert base[k, b].item() == pytest.approx(r, abs=1e-5)
    # Anti-correlated map: -1, clipped to 0.
    anti = (1.0 - s)[None]
    torch.testing.assert_close(similarity(s, anti, kind="pearson"), -torch.ones(1, 2))
    torch.testing.assert_close(similarity(s, anti, kind="pearson", clip=True), torch.zeros(1, 2))
    mixed = similarity(s, torch.cat([anti, s[None]]), kind="pearson", clip=True)
    torch.testing.assert_close(mixed, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))


def test_similarity_resizes_teacher_maps() -> None:
    gen = torch.Generator().manual_seed(2)
    s = torch.rand(3, 8, 8, generator=gen)
    big = torch.rand(2, 3, 16, 16, generator=gen)
    # Bilinear halving (align_corners=False) is 2x2 average pooling.
    pooled = F.avg_pool2d(big, 2)
    torch.testing.assert_close(similarity(s, big), similarity(s, pooled))
    torch.testing.assert_close(similarity(s, big, kind="pearson"), similarity(s, pooled, kind="pearson"))
    # A nearest-upsampled copy of the student map is recovered exactly: similarity 1.
    up = s.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)[None]
    torch.testing.assert_close(similarity(s, up), torch.ones(1, 3))
    with pytest.raises(ValueError):
        similarity(s, torch.rand(2, 4, 8, 8))                # batch mismatch


# ------------------------------------------------------------------------ teacher weights

def test_teacher_weights_properties() -> None:
    gen = torch.Generator().manual_seed(3)
    sim = torch.rand(3, 6, generator=gen, requires_grad=True)
    w = teacher_weights(sim, 0.2)
    assert w.shape == (3, 6) and not w.requires_grad and w.grad_fn is None
    torch.testing.assert_close(w.sum(0), torch.ones(6))
    # tau -> 0: one-hot on the most similar teacher.
    sharp = teacher_weights(sim, 1e-4)
    torch.testing.assert_close(sharp, F.one_hot(sim.argmax(0), 3).T.float())
    # tau -> inf: uniform.
    torch.testing.assert_close(teacher_weights(sim, 1e4), torch.full((3, 6), 1 / 3), atol=1e-4, rtol=0)
    # Hand value: sims (0, ln 2 * tau) -> weights (1/3, 2/3).
    tau = 0.5
    hand = teacher_weights(torch.tensor([[0.0], [math.log(2.0) * tau]]), tau)
    torch.testing.assert_close(hand, torch.tensor([[1 / 3], [2 / 3]]))
    with pytest.raises(ValueError):
        teacher_weights(sim, 0.0)


def test_teacher_weights_rescale() -> None:
    sim = torch.tensor([[0.2, 0.9], [0.1, 0.3], [0.05, 0.6]])
    tau = 0.3
    rescaled = teacher_weights(sim, tau, rescale=True)
    # Defined as softmax over teachers of (sim / max_k sim) / tau.
    expected = torch.softmax(torch.tensor([[1.0, 1.0], [0.5, 1 / 3], [0.25, 2 / 3]]) / tau, dim=0)
    torch.testing.assert_close(rescaled, expected)
    # Scale invariance per sample with rescale, not without.
    scaled = sim * torch.tensor([[4.0, 0.5]])
    torch.testing.assert_close(teacher_weights(scaled, tau, rescale=True), rescaled)
    assert not torch.allclose(teacher_weights(scaled, tau), teacher_weights(sim, tau))
    torch.testing.assert_close(rescaled.sum(0), torch.ones(2))
    # An all-zero column stays finite (eps guard) and becomes uniform.
    zero_col = teacher_weights(torch.zeros(3, 1), tau, rescale=True)
    torch.testing.assert_close(zero_col, torch.full((3, 1), 1 / 3))


# ----------------------------------------------------------------------------------- loss

def test_kd_zero_when_student_matches_teacher_mix() -> None:
    gen = torch.Generator().manual_seed(4)
    k, b, c, temp = 3, 4, 5, 3.0
    t = torch.randn(k, b, c, generator=gen) * 3
    w = torch.softmax(torch.randn(k, b, generator=gen), 0)
    p = (w[..., None] * torch.softmax(t / temp, -1)).sum(0)
    s = temp * torch.log(p) + 1.7                 # softmax(s/T) == p (shift-invariant)
    y = torch.tensor([0, 1, 2, 3])
    out = mate_kd_loss(s, t, y, w, None, None, temp, 0.3, 0.0)
    assert abs(out["kd"].item()) < 1e-5
    other = mate_kd_loss(torch.randn(b, c, generator=gen), t, y, w, None, None, temp, 0.3, 0.0)
    assert other["kd"].item() > 1e-3


@pytest.mark.parametrize("closed_form", [True, False])
def test_attr_gradient_reaches_student_only(closed_form: bool) -> None:
    torch.manual_seed(5)
    student = TinyStudent(closed_form)
    x = torch.randn(4, 3, 6, 6)
    y = torch.tensor([0, 1, 2, 3])
    logits, acts = student.forward_cam(x)
    s_maps = model_cam(student, acts, logits, y, create_graph=True)
    assert s_maps.requires_grad
    t_maps = torch.rand(2, 4, 6, 6, requires_grad=True)
    t_logits = torch.randn(2, 4, 5, requires_grad=True)
    sim = similarity(s_maps, t_maps)
    w = teacher_weights(sim, 0.2)
    w_leaf = w.clone().requires_grad_(True)        # even a weights tensor with a graph is cut
    out = mate_kd_loss(logits, t_logits, y, w_leaf, s_maps, t_maps, 3.0, 0.3, 0.5)
    assert out["attr"].item() > 0
    out["attr"].backward(retain_graph=True)
    grad = student.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert student.conv2.weight.grad.abs().sum() > 0
    out["total"].backward()
    assert t_maps.grad is None and t_logits.grad is None and w_leaf.grad is None


def test_total_is_the_combination_and_beta_zero() -> None:
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(4, 5, generator=gen, requires_grad=True)
    t = torch.randn(2, 4, 5, generator=gen)
    y = torch.tensor([4, 3, 2, 1])
    w = torch.softmax(torch.randn(2, 4, generator=gen), 0)
    sm = torch.rand(4, 8, 8, generator=gen)
    tm = torch.rand(2, 4, 8, 8, generator=gen)
    out = mate_kd_loss(s, t, y, w, sm, tm, 4.0, 0.3, 0.25)
    for key in ("total", "ce", "kd", "attr"):
        assert out[key].dim() == 0
    torch.testing.assert_close(out["ce"], F.cross_entropy(s, y))
    expected = 0.3 * out["ce"] + 0.7 * out["kd"] + 0.25 * out["attr"]
    torch.testing.assert_close(out["total"], expected)
    assert out["attr"].item() > 0
    # beta = 0: attr is exactly zero and no map work happens (mismatched maps do not raise).
    bad_maps = torch.rand(2, 7, 3, 3)
    zero = mate_kd_loss(s, t, y, w, sm, bad_maps, 4.0, 0.3, 0.0)
    assert zero["attr"].dim() == 0 and zero["attr"].item() == 0.0
    torch.testing.assert_close(zero["total"], 0.3 * out["ce"] + 0.7 * out["kd"])
    with pytest.raises(ValueError, match="maps"):     # beta > 0 without maps: refused, not silently 0
        mate_kd_loss(s, t, y, w, None, None, 4.0, 0.3, 0.25)
    with pytest.raises(ValueError):
        mate_kd_loss(s, t, y, w, sm, bad_maps, 4.0, 0.3, 0.25)
    # Plain CE baseline: no teachers needed when ce_weight == 1.
    ce_only = mate_kd_loss(s, None, y, None, None, None, 4.0, 1.0, 0.0)
    torch.testing.assert_close(ce_only["total"], F.cross_entropy(s, y))
    with pytest.raises(ValueError):
        mate_kd_loss(s, None, y, None, None, None, 4.0, 0.5, 0.0)


def test_teacher_maps_resized_in_loss() -> None:
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(3, 5, generator=gen)
    t = torch.randn(2, 3, 5, generator=gen)
    y = torch.tensor([0, 1, 2])
    w = torch.softmax(torch.randn(2, 3, generator=gen), 0)
    sm = torch.rand(3, 8, 8, generator=gen)
    big = torch.rand(2, 3, 16, 16, generator=gen)
    for norm in ("max", "l2"):
        a = mate_kd_loss(s, t, y, w, sm, big, 3.0, 0.3, 0.1, map_norm=norm)
        b = mate_kd_loss(s, t, y, w, sm, F.avg_pool2d(big, 2), 3.0, 0.3, 0.1, map_norm=norm)
        torch.testing.assert_close(a["attr"], b["attr"])


# ------------------------------------------------- independent reference (method.md, loops)

def _reference(s_logits, t_logits, labels, s_maps, t_maps, kind, clip, tau, rescale, temp,
               alpha, beta, norm):
    """Straight from method.md with explicit loops over k and b, numpy float64."""
    k_n, b_n = t_maps.shape[:2]
    sim = np.zeros((k_n, b_n))
    for k in range(k_n):
        for b in range(b_n):
            u = s_maps[b].ravel().copy()
            v = t_maps[k, b].ravel().copy()
            if kind == "pearson":
                u -= u.mean()
                v -= v.mean()
            sim[k, b] = u @ v / (np.sqrt(u @ u) * np.sqrt(v @ v))
            if clip:
                sim[k, b] = max(sim[k, b], 0.0)
    w = np.zeros((k_n, b_n))
    for b in range(b_n):
        col = sim[:, b] / sim[:, b].max() if rescale else sim[:, b]
        e = [math.exp(col[k] / tau) for k in range(k_n)]
        for k in range(k_n):
            w[k, b] = e[k] / sum(e)

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    def n(m):
        return m / (m.max() if norm == "max" else np.sqrt((m * m).sum()))

    ce = kd = attr = 0.0
    for b in range(b_n):
        ce += -math.log(softmax(s_logits[b])[labels[b]])
        p = sum(w[k, b] * softmax(t_logits[k, b] / temp) for k in range(k_n))
        q = softmax(s_logits[b] / temp)
        kd += float((p * np.log(p / q)).sum())
        target = sum(w[k, b] * n(t_maps[k, b]) for k in range(k_n))
        attr += float(((n(s_maps[b]) - target) ** 2).mean())
    ce, kd, attr = ce / b_n, temp ** 2 * kd / b_n, attr / b_n
    return sim, w, {"ce": ce, "kd": kd, "attr": attr,
                    "total": alpha * ce + (1 - alpha) * kd + beta * attr}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("norm", ["max", "l2"])
@pytest.mark.parametrize("kind,clip,rescale", [("cosine", False, False), ("cosine", False, True),
                                               ("pearson", False, False), ("pearson", True, False),
                                               ("cosine", True, True)])
def test_matches_independent_reference(seed, norm, kind, clip, rescale) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    k_n, b_n, c_n, h = 3, 5, 4, 6
    s_logits = torch.randn(b_n, c_n, generator=gen, dtype=torch.float64) * 2
    t_logits = torch.randn(k_n, b_n, c_n, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, c_n, (b_n,), generator=gen)
    s_maps = torch.relu(torch.randn(b_n, h, h, generator=gen, dtype=torch.float64)) + 0.01
    t_maps = torch.relu(torch.randn(k_n, b_n, h, h, generator=gen, dtype=torch.float64)) + 0.01
    tau, temp, alpha, beta = 0.15 + 0.1 * seed, 2.0 + seed, 0.3, 0.4

    ref_sim, ref_w, ref = _reference(s_logits.numpy(), t_logits.numpy(), labels.numpy(),
                                     s_maps.numpy(), t_maps.numpy(), kind, clip, tau, rescale,
                                     temp, alpha, beta, norm)
    sim = similarity(s_maps, t_maps, kind=kind, clip=clip)
    w = teacher_weights(sim, tau, rescale=rescale)
    out = mate_kd_loss(s_logits, t_logits, labels, w, s_maps, t_maps, temp, alpha, beta,
                       map_norm=norm)
    np.testing.assert_allclose(sim.numpy(), ref_sim, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-10, atol=1e-12)
    for key in ("ce", "kd", "attr", "total"):
        assert out[key].item() == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key


# -------------------------------------------------------------------- schedule and stats

def test_tau_at_epoch() -> None:
    assert tau_at_epoch(0, 0.2) == 0.2 and tau_at_epoch(150, 0.2) == 0.2
    assert tau_at_epoch(0, 1.0, 0.2, 100) == pytest.approx(1.0)
    assert tau_at_epoch(25, 1.0, 0.2, 100) == pytest.approx(0.8)
    assert tau_at_epoch(50, 1.0, 0.2, 100) == pytest.approx(0.6)
    assert tau_at_epoch(100, 1.0, 0.2, 100) == pytest.approx(0.2)
    assert tau_at_epoch(180, 1.0, 0.2, 100) == pytest.approx(0.2)
    assert tau_at_epoch(10, 0.1, 0.5, 20) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        tau_at_epoch(3, 0.2, 0.1, None)
    with pytest.raises(ValueError):
        tau_at_epoch(-1, 0.2)


def test_weight_statistics_hand_values() -> None:
    w = torch.tensor([[0.9, 0.2, 0.5, 1.0], [0.1, 0.8, 0.5, 0.0]])
    sim = torch.tensor([[0.5, 0.1, 0.3, 0.7], [0.2, 0.6, 0.3, 0.0]])
    st = weight_statistics(w, sim, bins=4)
    torch.testing.assert_close(st["weight_mean"], torch.tensor([0.65, 0.35]))
    std0 = math.sqrt(((0.25 ** 2) + (0.45 ** 2) + (0.15 ** 2) + (0.35 ** 2)) / 4)
    torch.testing.assert_close(st["weight_std"], torch.tensor([std0, std0]))
    # argmax ties go to the first teacher (sample 2).
    torch.testing.assert_close(st["dominant_fraction"], torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(st["similarity_mean"], torch.tensor([0.4, 0.275]))
    h = lambda a: -sum(v * math.log(v) for v in a if v > 0)  # noqa: E731
    entropy = (h([0.9, 0.1]) + h([0.2, 0.8]) + h([0.5, 0.5]) + 0.0) / 4
    assert st["entropy"].dim() == 0 and st["entropy"].item() == pytest.approx(entropy, rel=1e-6)
    # bins over [0,1]: [0,.25) [.25,.5) [.5,.75) [.75,1]
    assert st["histogram"].tolist() == [[1, 0, 1, 2], [2, 0, 1, 1]]
    torch.testing.assert_close(histogram_edges(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    for value in st.values():
        assert isinstance(value, torch.Tensor)


def test_weight_statistics_histogram_matches_histc() -> None:
    gen = torch.Generator().manual_seed(8)
    w = torch.softmax(torch.randn(3, 200, generator=gen) * 2, 0)
    st = weight_statistics(w, torch.rand(3, 200, generator=gen), bins=20)
    for k in range(3):
        expected = torch.histc(w[k], bins=20, min=0.0, max=1.0)
        assert st["histogram"][k].tolist() == expected.long().tolist()
    assert st["histogram"].sum().item() == 600


# ------------------------------------------------------------------------------ CA-MKD weights

def _camkd_reference(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """CA-MKD (Zhang, Chen, Wang 2022), written out per sample in float64 with plain loops:
    CE_k = -log softmax(t_k)[y]; w_k = (1 - exp(CE_k) / sum_j exp(CE_j)) / (K - 1)."""
    k, b, _ = logits.shape
    out = np.zeros((k, b))
    for i in range(b):
        ce = []
        for t in range(k):
            z = logits[t, i] - logits[t, i].max()
            ce.append(-(z[labels[i]] - math.log(sum(math.exp(v) for v in z))))
        shift = max(ce)
        denom = sum(math.exp(c - shift) for c in ce)
        for t in range(k):
            out[t, i] = 1.0 if k == 1 else (1.0 - math.exp(ce[t] - shift) / denom) / (k - 1)
    return out


@pytest.mark.parametrize("teachers", [1, 2, 3, 5])
def test_confidence_weights_match_an_independent_float64_implementation(teachers) -> None:
    gen = torch.Generator().manual_seed(teachers)
    logits = torch.randn(teachers, 16, 10, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 10, (16,), generator=gen)
    if teachers > 1:
        logits[1, :4] = logits[0, :4]                     # ties: two teachers equally confident
        logits[0, 4:8] = -40.0                            # a teacher that is certain (and right) ...
        logits[0, torch.arange(4, 8), labels[4:8]] = 40.0
        logits[-1, 8:12] = -40.0                          # ... and one certain and wrong
        logits[-1, torch.arange(8, 12), (labels[8:12] + 1) % 10] = 40.0
    w = confidence_weights(logits, labels)
    expected = _camkd_reference(logits.numpy(), labels.numpy())
    np.testing.assert_allclose(w.double().numpy(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.sum(0), torch.ones(16, dtype=w.dtype))
    assert not w.requires_grad
    if teachers > 1:
        torch.testing.assert_close(w[0, :4], w[1, :4])                    # ties weigh the same
        assert bool((w[0, 4:8] >= w[1:, 4:8].max(0).values).all())        # certain and right weighs most
        assert bool((w[-1, 8:12] <= w[:-1, 8:12].min(0).values).all())    # certain and wrong weighs least
        assert bool((w[-1, 8:12] < 1e-6).all())


def test_confidence_weights_are_the_ca_mkd_method_rule() -> None:
    row = method_table.get("ca_mkd")
    assert row.teachers == "all" and row.weighting == "confidence" and "attr" not in row.terms and not row.maps
    logits = torch.randn(3, 5, 10)
    labels = torch.randint(0, 10, (5,))
    w, sim = row.weigh(WeightingInputs(logits, labels), distill_params(recipe=RECIPE), 0)
    torch.testing.assert_close(w, confidence_weights(logits, labels))
    assert sim is None
    assert all(m.weigh is not None for m in method_table.METHODS.values() if m.has_kd)


def test_loss_terms_are_the_per_sample_parts_of_the_loss() -> None:
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(6, 10, generator=gen), torch.randn(3, 6, 10, generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    w = torch.softmax(torch.randn(3, 6, generator=gen), 0)
    sm, tm = torch.rand(6, 8, 8, generator=gen), torch.rand(3, 6, 8, 8, generator=gen)
    per = {"ce": cross_entropy(s, y), "kd": distillation(s, t, w, 2.0), "attr": attribution_error(sm, tm, w)}
    loss = mate_kd_loss(s, t, y, w, sm, tm, 2.0, 0.3, 0.1)
    for key in ("ce", "kd", "attr"):
        assert per[key].shape == (6,)
        torch.testing.assert_close(per[key].mean(), loss[key])


def test_effective_and_final_tau_follow_the_schedule() -> None:
    d = distill_params(recipe=Recipe(epochs=10, batch_size=8, lr=0.1), similarity_temperature=1.0,
                       similarity_temperature_end=0.2, similarity_schedule_epochs=4)
    assert effective_tau(d, 0) == 1.0 and effective_tau(d, 2) == pytest.approx(0.6)
    assert final_tau(d) == pytest.approx(0.2)          # evaluate weighs with what training ended on
    assert final_tau(distill_params(recipe=Recipe(epochs=3, batch_size=8, lr=0.1))) == 0.2


def test_weight_statistics_per_student_and_relative_entropy() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.softmax(torch.randn(3, 2, 50, generator=gen), 0)       # [K, students, B]
    st = weight_statistics(w, None, bins=5)
    for s in range(2):
        single = weight_statistics(w[:, s], None, bins=5)
        for key in ("weight_mean", "weight_std", "dominant_fraction", "histogram"):
            torch.testing.assert_close(st[key][:, s], single[key])
        torch.testing.assert_close(st["entropy"][s], single["entropy"])
    assert "similarity_mean" not in st
    assert relative_entropy(math.log(3), 3) == pytest.approx(1.0)   # equal weights
    assert relative_entropy(0.0, 3) == 0.0                           # one teacher per sample
    equal = weight_statistics(torch.full((4, 10), 0.25), None, bins=4)
    assert equal["entropy_relative"].item() == pytest.approx(1.0)

"""K CIFAR ResNets of one depth fused horizontally into one network (grouped convolutions).

Training K students (say K ResNet20s that differ in initialisation, data order and loss) as
K separate small networks leaves a GPU launch-bound: every layer is a tiny kernel. The
`FusedCifarResNet` runs all K in one network whose every layer is one kernel, while each
student computes exactly what it would compute alone.

Layout. A feature map is [B, K*C, H, W]; student k owns channels [k*C, (k+1)*C).
- Every 3x3 conv of the students, Conv2d(Cin, Cout), becomes one Conv2d(K*Cin, K*Cout,
  groups=K) whose weight [K*Cout, Cin, 3, 3] is the students' weights concatenated along
  dim 0 (group k reads input channels [k*Cin, (k+1)*Cin) and writes output channels
  [k*Cout, (k+1)*Cout) with student k's filters).
- Every BatchNorm2d(C) becomes BatchNorm2d(K*C) (same eps and momentum) whose affine
  parameters and running statistics are the students' concatenated.
- The parameter-free option-A shortcut (stride-2 subsample, zero-pad the new channels equally
  front and back) pads each student's block of channels separately: view [B, K, C, H, W],
  pad dim 2, flatten back.
- The head is a batched linear: weight [K, classes, 64], bias [K, classes]; logits
  [K, B, classes] come from one `baddbmm`.
Input [K, B, 3, 32, 32] (student k's own batch) is permuted/reshaped once into
[B, K*3, 32, 32]; the stage-3 output is viewed back once as [K, B, 64, 8, 8].

Why it is exact.
- A grouped convolution never mixes groups: output channel block k depends only on input
  channel block k and on student k's filters, so forward values and all gradients (w.r.t.
  inputs and weights) are those of the separate convolutions.
- BatchNorm statistics are per channel: the batch mean/variance of fused channel k*C + c
  over [B, H, W] is student k's statistic of its channel c on its own batch, and the
  running-statistics update is element-wise. (The K batches must have the same size B; the
  statistics are still each student's own because channels never share data.)
- Global average pooling, ReLU, the residual sum and the zero padding are per channel; the
  batched head multiplies student k's features by student k's weights only.
- Hence, with a loss that is a sum of per-student losses, the fused gradient is the
  students' gradients concatenated, and SGD with momentum, Nesterov and weight decay is
  element-wise, so the fused parameters and optimiser state (momentum buffers) stay equal
  to the students' own, concatenated. (This holds for any element-wise optimiser, e.g.
  Adam, but not for anything that takes a norm over a whole tensor, such as gradient
  clipping by global norm or LARS: those would couple the students.)
Numerically the fused network is not bit-identical: a grouped convolution may pick another
algorithm/summation order than the dense one (CPU float32: ~1e-6 of the activations' scale
after 20 layers; float64 on CPU: identical). In float32 training such differences can flip
a ReLU whose input is within rounding of zero, so fused and lone float32 runs drift apart
like any two runs with different conv algorithms (cuDNN autotuning does the same).

BatchNorm `num_batches_tracked` is one scalar per fused layer; students whose counters
differ are represented by a per-student offset buffer (`num_batches_tracked_offset`), so
`student_state_dicts()` returns each student's own counter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import BasicBlock, CifarResNet

__all__ = ["FusedCifarResNet"]

_NBT = "num_batches_tracked"
_NBT_OFFSET = "num_batches_tracked_offset"
_HEAD_PREFIX = "linear."


def _is_channels_last(t: Tensor) -> bool:
    """True iff the 4-D tensor is stored channels-last (and that is not also contiguous)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous()


class _FusedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over K*C channels (K students x C channels) with a per-student offset of
    `num_batches_tracked`: student k's counter is num_batches_tracked + offset[k]."""

    def __init__(self, num_students: int, planes: int) -> None:
        super().__init__(num_students * planes)
        self.register_buffer(_NBT_OFFSET, torch.zeros(num_students, dtype=torch.long))


def _fused_conv(num_students: int, in_planes: int, planes: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(num_students * in_planes, num_students * planes, 3, stride=stride,
                     padding=1, bias=False, groups=num_students)


class _FusedShortcutA(nn.Module):
    """Option-A shortcut per student: subsample, then zero-pad each student's channel block
    (pad_front zeros before, pad_back after), as `resnet._ShortcutA` does for one student."""

    def __init__(self, num_students: int, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.num_students = num_students
        self.in_planes = in_planes
        self.stride = stride
        extra = planes - in_planes
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        channels_last = _is_channels_last(x)
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        x5 = x.unflatten(1, (self.num_students, self.in_planes))     # [B, K, C, H, W], a view
        if channels_last:
            # Pad the innermost (channel) dim of [B, H, W, K, C]: the padded tensor is
            # contiguous there, i.e. channels-last once permuted back. One kernel.
            y = F.pad(x5.permute(0, 3, 4, 1, 2), (self.pad_front, self.pad_back))
            return y.permute(0, 3, 4, 1, 2).flatten(1, 2)
        # F.pad's tuple runs from the last dim backwards: (W, W, H, H, C, C).
        y = F.pad(x5, (0, 0, 0, 0, self.pad_front, self.pad_back))
        return y.flatten(1, 2)


class _FusedBasicBlock(BasicBlock):
    """K BasicBlocks side by side: the same attributes and forward as `resnet.BasicBlock`, with
    fused layers."""

    def __init__(self, num_students: int, in_planes: int, planes: int, stride: int = 1) -> None:
        nn.Module.__init__(self)   # BasicBlock's own layers would be built only to be replaced
        self.conv1 = _fused_conv(num_students, in_planes, planes, stride)
        self.bn1 = _FusedBatchNorm2d(num_students, planes)
        self.conv2 = _fused_conv(num_students, planes, planes, 1)
        self.bn2 = _FusedBatchNorm2d(num_students, planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = _FusedShortcutA(num_students, in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()


class _BatchedLinear(nn.Module):
    """K linear heads: weight [K, out, in], bias [K, out]; input [K, B, in] -> [K, B, out]."""

    def __init__(self, num_students: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_students, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_students, out_features))
        with torch.no_grad():
            for k in range(num_students):   # fan_in = in_features for each student's matrix
                nn.init.kaiming_normal_(self.weight[k], mode="fan_in", nonlinearity="relu")
            self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        # baddbmm is on autocast's lower-precision list, like the addmm behind nn.Linear.
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class FusedCifarResNet(nn.Module):
    """K CIFAR ResNet-(6n+2) students of one depth in one network (see the module docstring
    for the layout and why it is exact).

    Build it with `FusedCifarResNet.from_students(students)` to reproduce given students
    exactly; the constructor alone gives K freshly (He-)initialised students. Submodule
    names mirror `CifarResNet` (conv1, bn1, layer1..3, linear), so fused state-dict keys are
    the students' keys (plus BN `num_batches_tracked_offset`).

    - `forward_cam(x [K, B, 3, 32, 32]) -> (logits [K, B, classes], activations
      [K, B, 64, 8, 8])`, activations = each student's stage-3 output (a strided view of
      the fused feature map, no copy);
    - `forward(x) -> logits [K, B, classes]`;
    - `cam(activations, targets [K, B]) -> [K, B, 8, 8]`, closed-form CAM per student;
    - `student_state_dicts()`, `to_students()`, `load_student_state_dicts(...)`.

    On CUDA call `.to(memory_format=torch.channels_last)` (as `train.prepare_model` does):
    the forward then lays the fused input out channels-last itself.
    """

    cam_layer: str = "stage 3 output (after the last block's ReLU), 64 x 8 x 8, per student"

    def __init__(self, depth: int, num_students: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if num_students < 1:
            raise ValueError(f"num_students must be >= 1, got {num_students}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        n = (depth - 2) // 6
        k = num_students
        self.depth = depth
        self.num_students = num_students
        self.num_classes = num_classes
        self.conv1 = _fused_conv(k, 3, 16, 1)
        self.bn1 = _FusedBatchNorm2d(k, 16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(k, 16, 16, n, stride=1)
        self.layer2 = self._stage(k, 16, 32, n, stride=2)
        self.layer3 = self._stage(k, 32, 64, n, stride=2)
        self.linear = _BatchedLinear(k, 64, num_classes)
        for m in self.modules():   # as common.init_weights(conv_mode="fan_in") per student
            if isinstance(m, nn.Conv2d):
                # fan_in of a grouped conv weight [K*Cout, Cin, 3, 3] is Cin*9: per student.
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(k: int, in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [_FusedBasicBlock(k, in_planes, planes, stride)]
        layers += [_FusedBasicBlock(k, planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_students(cls, students: Sequence[CifarResNet]) -> FusedCifarResNet:
        """Fuse `students` (CifarResNets of one depth and class count, on one device and
        dtype), copying their parameters and buffers (BN running statistics and
        `num_batches_tracked`) and BN eps/momentum. The fused model is in train mode iff
        students[0] is. The students are left untouched (nothing is shared)."""
        students = list(students)
        if not students:
            raise ValueError("from_students needs at least one student")
        for i, s in enumerate(students):
            if not isinstance(s, CifarResNet):
                raise TypeError(f"student {i} is a {type(s).__name__}, not a CifarResNet")
        first = students[0]
        for i, s in enumerate(students[1:], start=1):
            if s.depth != first.depth:
                raise ValueError(f"students differ in depth: student 0 has depth {first.depth}, "
                                 f"student {i} has depth {s.depth}")
            for what, get in (("dtype", lambda m: m.conv1.weight.dtype),
                              ("device", lambda m: m.conv1.weight.device)):
                if get(s) != get(first):
                    raise ValueError(f"students differ in {what}: student 0 is on/in "
                                     f"{get(first)}, student {i} on/in {get(s)}")
            if s.linear.out_features != first.linear.out_features:
                raise ValueError(f"students differ in num_classes: student 0 has "
                                 f"{first.linear.out_features}, student {i} has "
                                 f"{s.linear.out_features}")
        fused = cls(first.depth, len(students), first.linear.out_features)
        ref = first.conv1.weight
        fused.to(device=ref.device, dtype=ref.dtype)
        student_modules = [dict(s.named_modules()) for s in students]
        for name, module in fused.named_modules():
            if isinstance(module, _FusedBatchNorm2d):
                eps = {mods[name].eps for mods in student_modules}
                momentum = {mods[name].momentum for mods in student_modules}
                if len(eps) != 1 or len(momentum) != 1:
                    raise ValueError(f"students differ in BatchNorm eps/momentum at {name!r}: "
                                     f"eps {sorted(eps)}, momentum {sorted(momentum, key=str)}")
                module.eps, module.momentum = eps.pop(), momentum.pop()
        fused.load_student_state_dicts([s.state_dict() for s in students])
        fused.train(first.training)
        return fused

    def _student_template(self) -> dict[str, torch.Size]:
        """Keys and shapes of a plain CifarResNet of this depth/class count (built on meta)."""
        with torch.device("meta"):
            plain = CifarResNet(self.depth, self.num_classes)
        return {name: t.shape for name, t in plain.state_dict().items()}

    def load_student_state_dicts(self, state_dicts: Sequence[dict[str, Tensor]]) -> None:
        """Overwrite the fused parameters/buffers with K plain CifarResNet state dicts."""
        k = self.num_students
        if len(state_dicts) != k:
            raise ValueError(f"need {k} student state dicts, got {len(state_dicts)}")
        template = self._student_template()
        for i, sd in enumerate(state_dicts):
            if set(sd) != set(template):
                missing, extra = sorted(set(template) - set(sd)), sorted(set(sd) - set(template))
                raise ValueError(f"student {i} state dict is not a CifarResNet-{self.depth}'s: "
                                 f"missing {missing[:5]}, unexpected {extra[:5]}")
            for name, shape in template.items():
                if sd[name].shape != shape:
                    raise ValueError(f"student {i} {name!r} has shape {tuple(sd[name].shape)}, "
                                     f"expected {tuple(shape)} (num_classes or depth differs?)")
        fused_sd = self.state_dict()
        new_sd: dict[str, Tensor] = {}
        for name, current in fused_sd.items():
            if name.endswith(_NBT_OFFSET):
                continue
            values = [sd[name].to(current.device) for sd in state_dicts]
            if name.endswith(_NBT):
                counts = torch.stack([v.reshape(()) for v in values]).to(torch.long)
                base = counts.min()
                offset = counts - base
                bn_name = name[: -len(_NBT)]
                module = self.get_submodule(bn_name.rstrip("."))
                if module.momentum is None and bool((offset != 0).any()):
                    raise ValueError(f"students differ in {name} ({counts.tolist()}) and "
                                     "momentum=None (cumulative averaging) would then not "
                                     "be exact")
                new_sd[name] = base
                new_sd[bn_name + _NBT_OFFSET] = offset
            elif name.startswith(_HEAD_PREFIX):
                new_sd[name] = torch.stack(values)
            else:
                new_sd[name] = torch.cat(values)
        self.load_state_dict(new_sd)

    # ------------------------------------------------------------------ forward

    def _fuse_input(self, x: Tensor) -> Tensor:
        """[K, B, 3, H, W] -> [B, K*3, H, W] in one copy, channels-last iff the model is."""
        if x.dim() != 5 or x.shape[0] != self.num_students or x.shape[2] != 3:
            raise ValueError(f"input must be [K={self.num_students}, B, 3, H, W], "
                             f"got shape {tuple(x.shape)}")
        k, b, c, h, w = x.shape
        if _is_channels_last(self.conv1.weight):
            # A contiguous [B, H, W, K*3] tensor is [B, K*3, H, W] in channels-last.
            return x.permute(1, 3, 4, 0, 2).reshape(b, h, w, k * c).permute(0, 3, 1, 2)
        return x.transpose(0, 1).reshape(b, k * c, h, w)

    def forward_cam(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [K, B, 3, 32, 32] (student k's batch) -> (logits [K, B, classes],
        activations [K, B, 64, 8, 8]), each student's stage-3 output."""
        out = self._fuse_input(x)
        out = self.relu(self.bn1(self.conv1(out)))
        out = self.layer1(out)
        out = self.layer2(out)
        cam = self.layer3(out)                                          # [B, K*64, h, w]
        k, ch = self.num_students, self.linear.in_features
        pooled = cam.mean((2, 3))                                       # [B, K*64]; see resnet.py
        logits = self.linear(pooled.unflatten(1, (k, ch)).transpose(0, 1))
        return logits, cam.unflatten(1, (k, ch)).transpose(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_cam(x)[0]

    def cam(self, activations: Tensor, targets: Tensor) -> Tensor:
        """Closed-form CAM per student, [K, B, h, w]:
        M[k, b] = ReLU(sum_ch W_k[c_kb, ch] A[k, b, ch]) / (h*w), with W_k student k's head
        weight and c_kb = targets[k, b]. This is `attribution.closed_form_cam` batched over
        students (equal to Grad-CAM for a GAP + linear head); differentiable w.r.t. the
        activations and the head weights."""
        k = self.num_students
        if activations.dim() != 5 or activations.shape[0] != k \
                or activations.shape[2] != self.linear.in_features:
            raise ValueError(f"activations must be [K={k}, B, {self.linear.in_features}, h, w], "
                             f"got shape {tuple(activations.shape)}")
        if targets.shape != activations.shape[:2]:
            raise ValueError(f"targets {tuple(targets.shape)} do not match activations "
                             f"{tuple(activations.shape[:2])}")
        h, w = activations.shape[-2:]
        weight = self.linear.weight
        index = torch.arange(k, device=weight.device).unsqueeze(1)
        rows = weight[index, targets.to(weight.device).long()]         # [K, B, Ch]
        dtype = torch.promote_types(rows.dtype, activations.dtype)      # autocast may override
        maps = torch.einsum("kbc,kbchw->kbhw", rows.to(dtype), activations.to(dtype))
        return torch.relu(maps) / (h * w)

    # ------------------------------------------------------------------ export

    def student_state_dicts(self) -> list[dict[str, Tensor]]:
        """Each student's state dict, with exactly a plain CifarResNet's keys and shapes;
        values are detached contiguous clones (no storage is shared with the fused model)."""
        k = self.num_students
        fused_sd = self.state_dict()
        out: list[dict[str, Tensor]] = [{} for _ in range(k)]
        for name, value in fused_sd.items():
            if name.endswith(_NBT_OFFSET):
                continue
            if name.endswith(_NBT):
                offset = fused_sd[name[: -len(_NBT)] + _NBT_OFFSET]
                parts = [value + offset[i] for i in range(k)]
            elif name.startswith(_HEAD_PREFIX):
                parts = list(value.unbind(0))
            else:
                parts = list(value.unflatten(0, (k, -1)).unbind(0))
            for i, part in enumerate(parts):
                out[i][name] = part.detach().clone(memory_format=torch.contiguous_format)
        template = self._student_template()
        for sd in out:
            got = {name: t.shape for name, t in sd.items()}
            assert got == template, "fused layout out of sync with CifarResNet"
        return out

    def to_students(self) -> list[CifarResNet]:
        """K new plain CifarResNets (same device/dtype and train/eval mode) holding the
        students' current parameters and buffers."""
        ref = self.conv1.weight
        students = []
        for sd in self.student_state_dicts():
            s = CifarResNet(self.depth, self.num_classes).to(device=ref.device, dtype=ref.dtype)
            s.load_state_dict(sd)
            for name, module in s.named_modules():
                if isinstance(module, nn.BatchNorm2d):
                    fused_bn = self.get_submodule(name)
                    module.eps, module.momentum = fused_bn.eps, fused_bn.momentum
            s.train(self.training)
            students.append(s)
        return students

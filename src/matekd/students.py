"""Students: what each trains with, the teacher signals it reads, and the training step of one
student or of several trained together.

A student is a `StudentSpec`: its method (a row of matekd.methods), seed, output name and the
`distill.*` values it trains with (the shared ones, or its method's tuned values). Students
trained together form one `StudentGroup`: one network (matekd.models.fused, grouped
convolutions) in which student s sees its own data order and augmentation, its own teacher
signals and its own loss, so that it ends exactly as if trained alone. Within a group, the
students of one method are handled together (one weighting and one loss call each), so a step
costs a few kernels per method, not per student.

Teacher logits are those of the teachers on each augmented batch, run online or gathered exactly
from the per-variant cache; teacher maps come from the cache, shifted with each image's crop and
flip. The student map is the closed-form CAM of ResNet's GAP + linear head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import methods as method_table
from .attribution import model_cam
from .augment import shift_maps, to_device_tensor, variant_index
from .cache import load_cache
from .data.prepared import Prepared
from .distill import WeightingInputs, effective_tau, histogram_edges, loss_terms, weigh, weight_statistics
from .errors import CacheError, ParamsError
from .methods import Method
from .models import build_model
from .models.fused import FusedCifarResNet
from .models.resnet import CifarResNet
from .params import DistillParams, Params, flatten, set_distill_values
from .plotting import figure_to_array, pyplot
from .storage import digest_of, source_digest
from .teachers import load_teacher, teacher_hashes
from .train import (
    PAD,
    Batch,
    EpochHook,
    FitResult,
    RunLike,
    StepOutput,
    device_labels,
    fit,
    image_variants,
    predict_logits,
    prepare_model,
)
from .tuned import load_tuned_values

# Short labels of the numeric hyperparameters (the `hyperparameters` tag: `T=3 a=0.3 tau=0.2 b=0.1`).
RUN_NAME_LABELS = {"kd_temperature": "T", "ce_weight": "a", "similarity_temperature": "tau",
                   "attribution_weight": "b"}
WEIGHT_STATS = ("weight_mean", "weight_std", "dominant_fraction")
SIMILARITY_STATS = ("similarity_mean", "similarity_std")


# --------------------------------------------------------------------------------------
# What a student trains with


@dataclass(frozen=True)
class StudentSpec:
    """One student: its method, seed, output name and the distill values it trains with."""

    method: Method
    seed: int
    output: str
    distill: DistillParams
    tuned_from: str | None = None   # the tuned-values file its values come from (None: shared values)
    tuned_trials: int | None = None

    @property
    def identity(self) -> dict[str, Any]:
        """Everything that makes this student's result what it is (checkpoint and group digests)."""
        return {"method": self.method.name, "seed": self.seed, "output": self.output,
                "distill": self.distill.model_dump(mode="json", exclude={"log_every"})}


def resolve_spec(params: Params, method: str, seed: int, output: str, tuned: bool = False) -> StudentSpec:
    """The spec of one student: `params.distill` with its method and seed, and, when `tuned`,
    its own method's tuned values from tuning/best/<method>.yaml (refused when missing)."""
    try:
        row = method_table.get(method)
    except KeyError as exc:
        raise ParamsError(f"--method {method!r}: {exc.args[0]}") from None
    distill = params.distill.model_copy(deep=True)
    distill.method = method
    distill.seed = seed
    tuned_from, trials = None, None
    if tuned:
        values, meta = load_tuned_values(row)
        set_distill_values(distill, values)
        tuned_from, trials = meta["path"], meta.get("trials")
    return StudentSpec(row, seed, output, distill, tuned_from, trials)


def data_seed(spec: StudentSpec) -> int:
    """The seed of a student's data order and augmentation: its own, or distill.data_seed."""
    return spec.seed if spec.distill.data_seed is None else spec.distill.data_seed


def spec_teachers(spec: StudentSpec, params: Params) -> list[str]:
    return method_table.method_teachers(spec.method, list(params.teachers), spec.distill.kd_teacher)


def logged_params(spec: StudentSpec, params: Params, teachers: Sequence[str]) -> dict[str, Any]:
    """The params this student's run used, as flat params.yaml keys: its method's own
    hyperparameters only, the recipe and the teachers it read (the data split is the run's
    dataset input)."""
    d = spec.distill
    out: dict[str, Any] = {"distill.method": spec.method.name, "distill.seed": spec.seed,
                           "distill.student": d.student}
    out.update({f"distill.{name}": getattr(d, name) for name in spec.method.hyperparameters})
    out.update(flatten({"distill": {"recipe": d.recipe.model_dump(mode="json")}}))
    if d.data_seed is not None:
        out["distill.data_seed"] = d.data_seed
    if spec.method.has_kd:
        out["distill.teacher_signals"] = d.teacher_signals
        out["teachers"] = ",".join(teachers)
    out["ablation.tuned"] = spec.tuned_from is not None
    return out


def run_name(spec: StudentSpec, kind: str) -> str:
    """`<kind> <method> seed<k>` (+ ` tuned`): kind is `distill` (the configured run) or
    `ablation`. Short, because MLflow captions every image card with the run name; the values
    are the run's params and its `hyperparameters` tag."""
    return " ".join([kind, spec.method.name, f"seed{spec.seed}", *(["tuned"] if spec.tuned_from else [])])


def hyperparameter_label(spec: StudentSpec) -> str:
    """`T=3 a=0.3 tau=0.2 b=0.1`: the method's own numeric hyperparameters in one short string."""
    return " ".join(f"{label}={getattr(spec.distill, name):g}" for name, label in RUN_NAME_LABELS.items()
                    if name in spec.method.hyperparameters)


def term_names(method: Method, teachers: Sequence[str]) -> set[str]:
    """The loss terms and weight statistics a method's step produces (and its run logs)."""
    names = {"total", "ce"}
    if method.has_kd:
        names.add("kd")
    if method.attribution_loss:
        names.add("attr")
    if method.per_sample_weights:
        names |= {"entropy", "entropy_relative"}
        stats = WEIGHT_STATS + (SIMILARITY_STATS if method.weighting == "attribution" else ())
        names |= {f"{stat}/{t}" for stat in stats for t in teachers}
    return names


# --------------------------------------------------------------------------------------
# Teacher signals


@dataclass
class TeacherSignals:
    """Everything the student step needs from the teachers, resident on the device."""

    names: list[str]
    models: list[nn.Module] = field(default_factory=list)           # online logits
    train_maps: Tensor | None = None                                  # [T, N, h, w] fp16
    train_logits: Tensor | None = None                                # [T, N, V, C] fp16
    train_logits_mask: Tensor | None = None                           # [T, N, V] variants cached
    hashes: dict[str, str] = field(default_factory=dict)              # teacher weights sha256

    def check_coverage(self, seed: int, epochs: int) -> None:
        """Refuse cached logits that lack a variant this run's seed and epochs will gather."""
        if self.train_logits_mask is None:
            return
        mask = self.train_logits_mask.cpu()
        n = mask.shape[1]
        variants = image_variants(seed, epochs, n)
        covered = mask[:, torch.arange(n).expand_as(variants), variants]
        if not bool(covered.all()):
            raise CacheError(
                f"the cached teacher logits do not cover seed {seed} for {epochs} epochs (built with "
                "cache.logit_variants: used for other seeds or fewer epochs); set cache.logit_variants: all, "
                "or list the seed in ablation.seeds, then rerun `dvc repro cache`")

    def logits(self, batch: Batch, slots: Tensor, teachers: Sequence[int], rows: Tensor) -> Tensor:
        """Teacher logits [K, m*B, C] (float) on the augmented views of the students `slots`;
        `rows` is `teachers` as a [K, 1] index tensor on the device."""
        index, offsets, flips = batch.index[slots], batch.offsets[slots], batch.flips[slots]
        if self.train_logits is not None:
            variants = variant_index(offsets.reshape(-1, 2), flips.reshape(-1), PAD)
            # One gather over (teacher, image, variant): never a copy of a whole teacher's cache.
            return self.train_logits[rows, index.reshape(-1)[None, :], variants[None, :]].float()
        b = batch.labels.shape[1]
        inputs = batch.inputs.view(batch.slots, b, *batch.inputs.shape[1:])[slots].flatten(0, 1)
        with torch.no_grad():
            return torch.stack([self.models[j](inputs).float() for j in teachers])

    def maps(self, batch: Batch, slots: Tensor, teachers: Sequence[int]) -> Tensor:
        """Cached teacher maps [K, m*B, h, w] shifted with each view's crop and flip."""
        if self.train_maps is None:
            raise CacheError("teacher maps were not loaded")
        index = batch.index[slots].reshape(-1)
        offsets, flips = batch.offsets[slots].reshape(-1, 2), batch.flips[slots].reshape(-1)
        return torch.stack([shift_maps(self.train_maps[j, index].float(), offsets, flips, PAD) for j in teachers])


def load_signals(params: Params, names: Sequence[str], need_maps: bool, data: Prepared,
                 device: torch.device) -> TeacherSignals:
    """Teacher maps (when a student needs them) and logits (cached per variant, or the teacher
    models to run online) for `names`, validated against the teacher weights and data."""
    signals = TeacherSignals(list(names))
    if not names:
        return signals
    signals.hashes = teacher_hashes(list(names))
    cached = params.distill.teacher_signals == "cached"
    if cached or need_maps:
        caches = [load_cache(n, data.manifest_hash, device, need_logits=cached, teacher_sha256=signals.hashes[n])
                  for n in names]
        if need_maps:
            signals.train_maps = torch.stack([c.train_maps for c in caches])
        if cached:
            signals.train_logits = torch.stack([c.train_logits for c in caches])
            if all(c.train_logits_mask is not None for c in caches):
                signals.train_logits_mask = torch.stack([c.train_logits_mask for c in caches])
    if not cached:
        signals.models = [load_teacher(n, device) for n in names]
    return signals


SignalsLoader = Callable[[Params, Sequence[str], bool, Prepared, torch.device], TeacherSignals]


# --------------------------------------------------------------------------------------
# Students as one module


def _wide(t: Tensor) -> Tensor:
    """At least float32 (autocast's bf16 is widened; a float64 check keeps float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class StudentGroup(nn.Module):
    """S students as one module. forward_cam(inputs [S*B, 3, H, W]) -> (logits [S,B,C],
    CAM-layer activations [S,B,Ch,h,w]); cam(...) -> maps [S,B,h,w]."""

    num_students: int

    def forward_cam(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def cam(self, activations: Tensor, logits: Tensor, targets: Tensor, create_graph: bool) -> Tensor:
        raise NotImplementedError

    def predict(self, inputs: Tensor) -> Tensor:
        """Logits [S, N, C] of every student for the same normalised inputs [N, 3, H, W]."""
        raise NotImplementedError

    def student_state_dicts(self) -> list[dict[str, Tensor]]:
        raise NotImplementedError


class SingleStudent(StudentGroup):
    """One student of any architecture, exactly as trained alone (today's behaviour)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_students = 1

    def forward_cam(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        logits, activations = self.model.forward_cam(inputs)
        return logits[None], activations[None]

    def cam(self, activations: Tensor, logits: Tensor, targets: Tensor, create_graph: bool) -> Tensor:
        return model_cam(self.model, _wide(activations[0]), _wide(logits[0]), targets[0],
                         create_graph=create_graph)[None]

    def predict(self, inputs: Tensor) -> Tensor:
        return self.model(inputs)[None]

    def student_state_dicts(self) -> list[dict[str, Tensor]]:
        return [{k: v.detach().clone() for k, v in self.model.state_dict().items()}]


class FusedStudents(StudentGroup):
    """S CIFAR ResNets of one depth as one network of grouped convolutions."""

    def __init__(self, students: Sequence[nn.Module]):
        super().__init__()
        self.fused = FusedCifarResNet.from_students(list(students))
        self.num_students = len(students)

    def forward_cam(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        s = self.num_students
        return self.fused.forward_cam(inputs.view(s, inputs.shape[0] // s, *inputs.shape[1:]))

    def cam(self, activations: Tensor, logits: Tensor, targets: Tensor, create_graph: bool) -> Tensor:
        maps = self.fused.cam(_wide(activations), targets)
        return maps if create_graph else maps.detach()

    def predict(self, inputs: Tensor) -> Tensor:
        return self.fused(inputs.unsqueeze(0).expand(self.num_students, *inputs.shape))

    def student_state_dicts(self) -> list[dict[str, Tensor]]:
        return self.fused.student_state_dicts()


def make_group(students: Sequence[nn.Module]) -> StudentGroup:
    if len(students) == 1:
        return SingleStudent(students[0])
    if not all(isinstance(s, CifarResNet) for s in students):
        raise ParamsError("ablation.group_size > 1 trains students together as one network of grouped "
                          "convolutions, which needs CIFAR ResNet students (distill.student: resnet20, resnet56 "
                          "or resnet110); set ablation.group_size: 1 for other architectures")
    return FusedStudents(students)


def group_predict(group: StudentGroup, images_uint8: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Logits [S, N, C] (float) of every student of the group on uint8 NCHW images, in eval mode."""
    return predict_logits(group, images_uint8, batch_size, device, forward=group.predict, batch_dim=1)


# --------------------------------------------------------------------------------------
# The step


class WeightHistogram:
    """Per-epoch teacher-weight histogram counts [K, m, bins] of m students, on the device."""

    def __init__(self, teachers: int, students: int, bins: int, device: torch.device):
        self.counts = torch.zeros(teachers, students, bins, device=device)

    def add(self, counts: Tensor) -> None:
        self.counts += counts

    def take(self) -> Tensor:
        counts = self.counts.clone()
        self.counts.zero_()
        return counts


@dataclass
class _MethodPart:
    """The students of one method within a group (they share every hyperparameter)."""

    method: Method
    distill: DistillParams
    slots: list[int]
    slot_index: Tensor
    teachers: list[int]            # positions in TeacherSignals.names
    teacher_names: list[str]
    teacher_rows: Tensor = field(default_factory=lambda: torch.empty(0))   # teachers as [K, 1] on the device
    histogram: WeightHistogram | None = None


def _parts(specs: Sequence[StudentSpec], params: Params, signals: TeacherSignals, device: torch.device
           ) -> list[_MethodPart]:
    parts: dict[str, _MethodPart] = {}
    for slot, spec in enumerate(specs):
        part = parts.get(spec.method.name)
        if part is None:
            names = spec_teachers(spec, params)
            part = _MethodPart(spec.method, spec.distill, [], torch.empty(0), [signals.names.index(n) for n in names],
                               names)
            parts[spec.method.name] = part
        elif spec.distill.model_dump(exclude={"seed"}) != part.distill.model_dump(exclude={"seed"}):
            raise ParamsError(f"students of method {spec.method.name!r} in one group must share their values")
        part.slots.append(slot)
    for part in parts.values():
        part.slot_index = torch.tensor(part.slots, dtype=torch.long, device=device)
        part.teacher_rows = torch.tensor(part.teachers, dtype=torch.long, device=device)[:, None]
        if part.method.per_sample_weights:
            part.histogram = WeightHistogram(len(part.teachers), len(part.slots), part.distill.histogram_bins,
                                             device)
    return list(parts.values())


def group_step(params: Params, specs: Sequence[StudentSpec], group: StudentGroup, signals: TeacherSignals,
               device: torch.device) -> Callable[[Batch, int], StepOutput]:
    """The optimisation step of `specs` trained as `group` (see make_group_step)."""
    return make_group_step(_parts(specs, params, signals, device), group, signals)


def make_group_step(parts: list[_MethodPart], group: StudentGroup, signals: TeacherSignals
                    ) -> Callable[[Batch, int], StepOutput]:
    """The optimisation step of a group: every student's loss on its own batch, summed."""

    map_parts = [p for p in parts if p.method.needs_maps]
    graph_maps = any(p.method.attribution_loss and p.distill.attribution_weight > 0 for p in map_parts)

    layout: dict[str, int] = {}          # term name -> its row in the step's table, fixed at the first step
    placement: list[Tensor] = []         # per part: the table rows of its terms, on the device (made once)

    def step(batch: Batch, epoch: int) -> StepOutput:
        slots, b = batch.labels.shape
        logits, activations = group.forward_cam(batch.inputs)
        total = logits.new_zeros((), dtype=_wide(logits).dtype)
        all_maps = None
        if map_parts:
            # Every student's CAM in one call (cheap: the closed form), with its own target class.
            targets = batch.labels.clone()
            for part in map_parts:
                if part.distill.student_target == "prediction":
                    targets[part.slot_index] = logits[part.slot_index].detach().argmax(-1)
            all_maps = group.cam(activations, logits, targets, create_graph=graph_maps)

        # Each part's logged values as one [T_part, m] block, written into a [T, S] table with one
        # index_put (not one index_copy_ per term and teacher: ~20 launches per method per step).
        blocks: list[tuple[_MethodPart, list[str], list[Tensor]]] = []
        for part in parts:
            m, cfg, method = len(part.slots), part.distill, part.method
            idx = part.slot_index
            s_logits = _wide(logits[idx].flatten(0, 1))                     # [m*B, C]
            labels = batch.labels[idx].reshape(-1)                          # [m*B]
            names: list[str] = []
            rows: list[Tensor] = []                                         # each [r, m]
            if not method.has_kd:
                per_sample = loss_terms(s_logits, None, labels, None, None, None, 1.0, attribution=False)
                per = {k: v.view(m, b).mean(dim=1) for k, v in per_sample.items()}
                student_total = per["ce"]
            else:
                t_logits = signals.logits(batch, idx, part.teachers, part.teacher_rows)   # [K, m*B, C]
                student_maps = teacher_maps = None
                beta = cfg.attribution_weight if method.attribution_loss else 0.0
                if method.needs_maps:
                    student_maps = all_maps[idx].flatten(0, 1)              # [m*B, h, w]
                    if beta == 0:
                        student_maps = student_maps.detach()
                    teacher_maps = signals.maps(batch, idx, part.teachers)  # [K, m*B, h', w']
                weights, sim = weigh(method.weighting, WeightingInputs(
                    t_logits, labels, student_maps.detach() if student_maps is not None else None,
                    teacher_maps, tau=effective_tau(cfg, epoch), similarity=cfg.similarity,
                    clip=cfg.clip_similarity, rescale=cfg.rescale_weights))
                per_sample = loss_terms(s_logits, t_logits, labels, weights,
                                        student_maps if beta > 0 else None, teacher_maps if beta > 0 else None,
                                        cfg.kd_temperature, attribution=beta > 0, map_norm=cfg.map_norm)
                per = {k: v.view(m, b).mean(dim=1) for k, v in per_sample.items()}
                student_total = cfg.ce_weight * per["ce"] + (1.0 - cfg.ce_weight) * per["kd"]
                if beta > 0:
                    student_total = student_total + beta * per["attr"]
                if part.histogram is not None:
                    k = len(part.teachers)
                    stats = weight_statistics(weights.view(k, m, b), sim.view(k, m, b) if sim is not None else None,
                                              bins=cfg.histogram_bins)
                    part.histogram.add(stats["histogram"])
                    names += ["entropy", "entropy_relative"]
                    rows += [stats["entropy"][None], stats["entropy_relative"][None]]
                    for stat in WEIGHT_STATS + (SIMILARITY_STATS if sim is not None else ()):
                        names += [f"{stat}/{teacher}" for teacher in part.teacher_names]
                        rows.append(stats[stat])                            # [K, m]
            names += [*per, "total"]
            rows += [value[None] for value in per.values()] + [student_total[None]]
            blocks.append((part, names, rows))
            total = total + student_total.sum()
        if not layout:
            for _, names, _ in blocks:
                layout.update((name, len(layout)) for name in names if name not in layout)
            placement.extend(torch.tensor([layout[n] for n in names], device=logits.device)[:, None]
                             for _, names, _ in blocks)
        table = total.new_zeros(len(layout), slots)
        for (part, _, rows), where in zip(blocks, placement, strict=True):
            table[where, part.slot_index[None, :]] = torch.cat(rows).detach().to(table.dtype)   # [T_part, m]
        terms = dict(zip(layout, table.unbind(0)))                          # views: no copies
        losses = terms["total"]
        return StepOutput(total, logits, losses, terms)

    return step


# --------------------------------------------------------------------------------------
# Training


@dataclass
class StudentRun:
    spec: StudentSpec
    model: nn.Module                  # a plain student network holding the trained weights
    result: FitResult
    histograms: list[dict]            # per epoch: {epoch, bins, counts: {teacher: [...]}}


def histogram_figure(counts: Tensor, names: Sequence[str], epoch: int, method: str):
    plt = pyplot()
    edges = histogram_edges(counts.shape[-1]).numpy()
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for j, name in enumerate(names):
        ax.stairs(counts[j].cpu().numpy(), edges, label=name)
    ax.set(xlabel="teacher weight", ylabel="samples", title=f"{method}: teacher weights, epoch {epoch}")
    ax.legend(fontsize=7, loc="upper right", framealpha=0.8)
    fig.tight_layout()
    return fig


def log_histogram_figures(run: RunLike, history: Sequence[dict], names: Sequence[str], method: str) -> None:
    """Log each epoch's teacher-weight histogram figure of one student (`history`: its entries
    {epoch, bins, counts: {teacher: [...]}}) as image `teacher_weights` at step epoch - 1."""
    if not getattr(run, "active", False):
        return
    for entry in history:
        counts = torch.tensor([entry["counts"][n] for n in names])
        figure = histogram_figure(counts, names, entry["epoch"], method)
        run.log_image(figure_to_array(figure), key="teacher_weights", step=entry["epoch"] - 1)


def group_digest(params: Params, specs: Sequence[StudentSpec], data_hash: str) -> str:
    """Identity of a group's training: its students, their teachers' weights and caches, the
    data, the device choice and the code (a checkpoint or stored result of another identity is
    never reused)."""
    names = [n for n in params.teachers if any(n in spec_teachers(s, params) for s in specs)]
    return digest_of("students", [s.identity for s in specs], teacher_hashes(names), params.cache.model_dump(),
                     data_hash, params.device, params.precision, params.deterministic, params.distill.teacher_signals,
                     source_digest())


def train_students(params: Params, specs: Sequence[StudentSpec], data: Prepared, device: torch.device,
                   runs: Sequence[RunLike], checkpoint: Path | None, progress: bool = True,
                   epoch_hook: EpochHook | None = None, with_test: bool = True,
                   signals_loader: SignalsLoader | None = None, desc: str | None = None) -> list[StudentRun]:
    """Train `specs` together (one network; one student alone when there is one spec).

    Student s is initialised from torch.manual_seed(seed_s), draws its data order and
    augmentation from seed_s, reads its method's teachers and logs to runs[s]: exactly what it
    would do alone. They must share the optimiser recipe. Shared by the distill/ablation stages
    and the Optuna objective (which passes a `signals_loader` that keeps teachers and caches
    loaded across trials)."""
    if not specs:
        raise ValueError("no students to train")
    recipe = specs[0].distill.recipe
    for spec in specs[1:]:
        if spec.distill.recipe != recipe or spec.distill.student != specs[0].distill.student:
            raise ParamsError("students trained together must share distill.student and distill.recipe "
                              f"({spec.output} differs from {specs[0].output})")
    students = []
    for spec in specs:
        torch.manual_seed(spec.seed)
        students.append(build_model(spec.distill.student))
    group = prepare_model(make_group(students), device)
    teacher_names = [n for n in params.teachers if any(n in spec_teachers(s, params) for s in specs)]
    need_maps = any(s.method.needs_maps for s in specs)
    signals = (signals_loader or load_signals)(params, teacher_names, need_maps, data, device)
    for seed in sorted({data_seed(spec) for spec in specs}):
        signals.check_coverage(seed, recipe.epochs)
    parts = _parts(specs, params, signals, device)
    histograms: list[list[dict]] = [[] for _ in specs]

    def on_epoch(epoch: int, records: list[dict]) -> None:
        for part in parts:
            if part.histogram is None:
                continue
            counts = part.histogram.take().cpu()
            for j, slot in enumerate(part.slots):
                entry = {"epoch": epoch, "bins": part.distill.histogram_bins,
                         "counts": {n: counts[t, j].tolist() for t, n in enumerate(part.teacher_names)}}
                histograms[slot].append(entry)
                run = runs[slot]
                if getattr(run, "active", False):
                    # The counts now (a small JSON); the figure after training (log_histogram_figures):
                    # drawing it here, about 0.1 s per student, would keep the device idle every epoch.
                    run.log_dict(entry, f"histograms/teacher_weights_epoch{epoch:03d}.json")
        if epoch_hook is not None:
            epoch_hook(epoch, records)

    digest = group_digest(params, specs, data.manifest_hash)
    results = fit(model=group, step_fn=make_group_step(parts, group, signals), recipe=recipe,
                  train_images=to_device_tensor(data.train_images, device),
                  train_labels=device_labels(data.train_labels, device),
                  val_images=to_device_tensor(data.val_images, device),
                  val_labels=device_labels(data.val_labels, device), device=device,
                  seeds=[data_seed(s) for s in specs], runs=list(runs), checkpoint=checkpoint, digest=digest,
                  desc=desc or " + ".join(s.output for s in specs), log_every=specs[0].distill.log_every,
                  test_images=to_device_tensor(data.test_images, device) if with_test else None,
                  test_labels=device_labels(data.test_labels, device) if with_test else None,
                  epoch_hook=on_epoch, predict=lambda x, bs: group_predict(group, x, bs, device),
                  slot_terms=[term_names(s.method, spec_teachers(s, params)) for s in specs], progress=progress)
    for part in parts:
        for slot in part.slots:
            log_histogram_figures(runs[slot], histograms[slot], part.teacher_names, part.method.name)
    out = []
    for spec, state, result, hist in zip(specs, group.student_state_dicts(), results, histograms):
        model = build_model(spec.distill.student)
        model.load_state_dict(state)
        out.append(StudentRun(spec, model, result, hist))
    return out


def weighting_summary(history: Sequence[dict], teachers: Sequence[str]) -> dict[str, Any]:
    """Last epoch's mean weight per teacher and the entropy relative to equal weights."""
    if not history:
        return {}
    last = history[-1]
    out: dict[str, Any] = {}
    if "train_entropy_relative" in last:
        out["entropy_relative"] = last["train_entropy_relative"]
    weights = {t: last[f"train_weight_mean/{t}"] for t in teachers if f"train_weight_mean/{t}" in last}
    if weights:
        out["weight_mean"] = weights
    return out


# --------------------------------------------------------------------------------------
# Groups


def plan_groups(specs: Sequence[StudentSpec], size: int) -> list[list[StudentSpec]]:
    """Cut the ablation's students into groups of at most `size` that can train together
    (same student architecture and recipe), keeping the table's order (methods, then seeds)."""
    if size < 1:
        raise ParamsError(f"ablation.group_size = {size}: must be at least 1")
    buckets: dict[str, list[StudentSpec]] = {}
    for spec in specs:
        key = digest_of(spec.distill.student, spec.distill.recipe.model_dump(mode="json"))
        buckets.setdefault(key, []).append(spec)
    groups = []
    for members in buckets.values():
        groups += [members[i:i + size] for i in range(0, len(members), size)]
    return groups


def ablation_specs(params: Params) -> list[StudentSpec]:
    """Every ablation student (methods x seeds), with its method's tuned values if ablation.tuned."""
    from .paths import ablation_output

    return [resolve_spec(params, m, s, ablation_output(m, s), tuned=params.ablation.tuned)
            for m in params.ablation.methods for s in params.ablation.seeds]


__all__ = ["StudentSpec", "resolve_spec", "logged_params", "run_name", "hyperparameter_label", "term_names",
           "TeacherSignals",
           "load_signals", "StudentGroup", "SingleStudent", "FusedStudents", "make_group", "make_group_step",
           "group_step",
           "train_students", "plan_groups", "ablation_specs", "group_digest", "StudentRun", "weighting_summary"]

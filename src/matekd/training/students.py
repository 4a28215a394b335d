"""Students: what each trains with (`StudentSpec`: method, seed, output and the `distill.*`
values, shared or its method's tuned ones), what its run logs, and `train_students`, which trains
one student or several together and returns each one's network and history."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import methods as method_table
from ..data.prepared import Prepared
from ..errors import ParamsError
from ..methods import Method
from ..models import build_model
from ..params import DistillParams, Params, flatten, with_distill_values
from ..paths import ablation_output
from ..report.weight_histograms import log_histogram_figures
from ..storage import digest_of, source_digest
from ..teachers import teacher_hashes
from ..tuned import load_tuned_values
from .loop import EpochHook, FitJob, FitResult, RunLike, TrainingData, fit, prepare_model
from .networks import Students, as_one_module, predict_all
from .step import GroupStep, by_method, logged_terms
from .teacher_outputs import TeacherOutputs, TeacherOutputsLoader, load_teacher_outputs


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
        distill = with_distill_values(distill, values)
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
    out.update({f"distill.{name}": getattr(d, name) for name in spec.method.keys})
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
    """`T=3 a=0.3 tau=0.2 b=0.1`: the method's labelled hyperparameters in one short string."""
    return " ".join(f"{h.label}={getattr(spec.distill, h.name):g}" for h in spec.method.hyperparameters if h.label)


@dataclass
class StudentRun:
    spec: StudentSpec
    model: nn.Module                  # a plain student network holding the trained weights
    result: FitResult
    histograms: list[dict]            # per epoch: {epoch, bins, counts: {teacher: [...]}}


def group_digest(params: Params, specs: Sequence[StudentSpec], data_hash: str) -> str:
    """Identity of a group's training: its students, their teachers' weights and caches, the
    data, the device choice and the code (a checkpoint or stored result of another identity is
    never reused)."""
    names = [n for n in params.teachers if any(n in spec_teachers(s, params) for s in specs)]
    return digest_of("students", [s.identity for s in specs], teacher_hashes(names), params.cache.model_dump(),
                     data_hash, params.device, params.precision, params.deterministic, params.distill.teacher_signals,
                     source_digest())


def student_step(params: Params, specs: Sequence[StudentSpec], students: Students, outputs: TeacherOutputs,
                 device: torch.device) -> GroupStep:
    """The optimisation step of `specs` held as `students` (one module), reading `outputs`."""
    members = by_method([s.method for s in specs], [s.distill for s in specs],
                        [spec_teachers(s, params) for s in specs], outputs, device)
    return GroupStep(members, students, outputs)


def train_students(params: Params, specs: Sequence[StudentSpec], data: Prepared, device: torch.device,
                   runs: Sequence[RunLike], checkpoint: Path | None, progress: bool = True,
                   epoch_hook: EpochHook | None = None, with_test: bool = True,
                   outputs_loader: TeacherOutputsLoader | None = None, desc: str | None = None) -> list[StudentRun]:
    """Train `specs` together (one network; one student alone when there is one spec).

    Student s is initialised from torch.manual_seed(seed_s), draws its data order and
    augmentation from seed_s, reads its method's teachers and logs to runs[s]: exactly what it
    would do alone. They must share the optimiser recipe. Shared by the distill/ablation stages
    and the Optuna objective (whose `outputs_loader` keeps teachers and caches loaded across
    trials)."""
    if not specs:
        raise ValueError("no students to train")
    recipe = specs[0].distill.recipe
    for spec in specs[1:]:
        if spec.distill.recipe != recipe or spec.distill.student != specs[0].distill.student:
            raise ParamsError("students trained together must share distill.student and distill.recipe "
                              f"({spec.output} differs from {specs[0].output})")
    networks = []
    for spec in specs:
        torch.manual_seed(spec.seed)
        networks.append(build_model(spec.distill.student))
    students = prepare_model(as_one_module(networks), device)
    teacher_names = [n for n in params.teachers if any(n in spec_teachers(s, params) for s in specs)]
    outputs = (outputs_loader or load_teacher_outputs)(params, teacher_names, any(s.method.maps for s in specs),
                                                       data, device)
    for seed in sorted({data_seed(spec) for spec in specs}):
        outputs.check_coverage(seed, recipe.epochs)
    step = student_step(params, specs, students, outputs, device)
    members = step.members
    histograms: list[list[dict]] = [[] for _ in specs]

    def on_epoch(epoch: int, records: list[dict]) -> None:
        for member in members:
            if member.histogram is None:
                continue
            counts = member.histogram.take().cpu()
            for j, position in enumerate(member.positions):
                entry = {"epoch": epoch, "bins": member.values.histogram_bins,
                         "counts": {n: counts[t, j].tolist() for t, n in enumerate(member.teacher_names)}}
                histograms[position].append(entry)
                run = runs[position]
                if getattr(run, "active", False):
                    # The counts now (a small JSON); the figure after training (log_histogram_figures):
                    # drawing it here, about 0.1 s per student, would keep the device idle every epoch.
                    run.log_dict(entry, f"histograms/teacher_weights_epoch{epoch:03d}.json")
        if epoch_hook is not None:
            epoch_hook(epoch, records)

    results = fit(FitJob(
        students, step, recipe, TrainingData.on_device(data, device, with_test),
        seeds=[data_seed(s) for s in specs], runs=list(runs), checkpoint=checkpoint,
        digest=group_digest(params, specs, data.manifest_hash), desc=desc or " + ".join(s.output for s in specs),
        log_every=specs[0].distill.log_every, predict=lambda x, bs: predict_all(students, x, bs, device),
        student_terms=[logged_terms(s.method, spec_teachers(s, params)) for s in specs], epoch_hook=on_epoch,
        progress=progress))
    for member in members:
        for position in member.positions:
            log_histogram_figures(runs[position], histograms[position], member.teacher_names, member.method.name)
    out = []
    for spec, state, result, history in zip(specs, students.student_state_dicts(), results, histograms):
        model = build_model(spec.distill.student)
        model.load_state_dict(state)
        out.append(StudentRun(spec, model, result, history))
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


def ablation_specs(params: Params) -> list[StudentSpec]:
    """Every ablation student (methods x seeds), with its method's tuned values if ablation.tuned."""
    return [resolve_spec(params, m, s, ablation_output(m, s), tuned=params.ablation.tuned)
            for m in params.ablation.methods for s in params.ablation.seeds]



"""The training loop shared by teachers and students (`fit` of a `FitJob`), and its helpers:
devices, determinism, per-epoch augmentation plans, batches, the optimiser and its schedule.

Data and augmentation stay on the training device as tensors; per-step values accumulate on
the device and are synchronised only at log points and epoch ends. Every epoch's shuffling
and augmentation derive from (seed, epoch), so resuming from an epoch checkpoint reproduces
an uninterrupted run exactly.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..augment import crop_flip, normalize, sample_crop_flip, to_device_tensor, variant_index
from ..errors import MatekdError, TrainingDiverged
from ..params import Recipe
from ..precision import autocast, memory_format
from ..storage import atomic_path, safe_torch_load

PAD = 4  # random-crop zero padding of the CIFAR recipe
T = TypeVar("T")


def resolve_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise MatekdError("device: 'cuda' was requested but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def visible_devices(choice: str = "auto") -> list[torch.device]:
    """The devices a multi-process command spreads over: every visible GPU (CUDA_VISIBLE_DEVICES
    decides which) for `auto`/`cuda`, else the CPU."""
    device = resolve_device(choice)
    if device.type == "cuda":
        return [torch.device("cuda", k) for k in range(torch.cuda.device_count())]
    return [device]


def assign_round_robin(items: Sequence[T], devices: Sequence[str]) -> list[tuple[str, list[T]]]:
    """Item k goes to entry k % len(devices) (tuning workers, student groups): one (device, items)
    entry per device listed, in order, possibly with nothing to do; a device may be listed twice."""
    if not devices:
        raise ValueError("no device to assign work to")
    plan: list[tuple[str, list[T]]] = [(device, []) for device in devices]
    for k, item in enumerate(items):
        plan[k % len(devices)][1].append(item)
    return plan


def device_name(device: torch.device) -> str:
    """The device in words, for tags and reports (the GPU's name, or the CPU thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def configure_determinism(seed: int, deterministic: bool) -> None:
    """Seed torch and pick deterministic kernels when asked (GPU runs are otherwise not bitwise
    reproducible: cuDNN autotuning and atomic-add reductions vary between runs)."""
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if deterministic or torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(deterministic)  # the call costs seconds (imports dynamo)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, salt)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % (2 ** 63))


def epoch_augmentation(seed: int, epoch: int, n: int, device: torch.device | str = "cpu"
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The epoch's visiting order and the crop offsets and flips by position in that order: a
    function of (seed, epoch, n) only, whatever the batch size or method."""
    gen = epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=gen).to(device)
    offsets, flips = sample_crop_flip(n, PAD, gen, device)
    return order, offsets, flips


def image_variants(seed: int, epochs: int, n: int) -> torch.Tensor:
    """[epochs, n]: the crop/flip variant (augment.variant_index) each training image gets in
    each epoch of a run with this seed."""
    out = torch.empty(epochs, n, dtype=torch.long)
    for epoch in range(epochs):
        order, offsets, flips = epoch_augmentation(seed, epoch, n)
        out[epoch, order] = variant_index(offsets, flips, PAD)
    return out


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    return model.to(device).to(memory_format=memory_format(device))


def model_input(images_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    return normalize(images_uint8).contiguous(memory_format=memory_format(device))


@torch.inference_mode()
def predict_logits(model: nn.Module, images_uint8: torch.Tensor, batch_size: int, device: torch.device,
                   forward: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_dim: int = 0) -> torch.Tensor:
    """Logits (float32, on device) for uint8 NCHW images, in eval mode; restores the mode.
    `forward` replaces model(x) (students together return [S, N, C]: `batch_dim` 1)."""
    was_training = model.training
    model.eval()
    forward = forward or model
    outputs = []
    for start in range(0, images_uint8.shape[0], batch_size):
        batch = images_uint8[start:start + batch_size].to(device, non_blocking=True)
        with autocast(device):
            outputs.append(forward(model_input(batch, device)).float())
    model.train(was_training)
    if not outputs:
        return torch.empty(0, 10, device=device)
    return torch.cat(outputs, dim=batch_dim)


def accuracy(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, batch_size: int,
             device: torch.device) -> float:
    """Top-1 accuracy of one plain model (NaN for an empty set)."""
    return accuracy_per_student(single_predict(model, device), images_uint8, labels, batch_size, count=1)[0]


def device_labels(labels, device: torch.device) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        return labels.to(device=device, dtype=torch.long)
    return torch.tensor(labels, dtype=torch.long).to(device)  # copies: labels may be a read-only memmap


def optimizer_kernels(parameters: Sequence[torch.Tensor]) -> dict[str, bool]:
    """SGD's implementation: the fused kernel on CUDA, else the foreach (multi-tensor) one. The
    per-parameter loop launches a few kernels per tensor per step: on a GPU, with a network as
    small as a ResNet20, the device waits on those launches."""
    if parameters and all(p.device.type == "cuda" and p.dtype.is_floating_point for p in parameters):
        return {"fused": True}
    return {"foreach": True}


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    parameters = list(model.parameters())
    return torch.optim.SGD(parameters, lr=recipe.lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov and recipe.momentum > 0,
                           weight_decay=recipe.weight_decay, **optimizer_kernels(parameters))


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int = 0) -> float:
    """Per-step multiplier: linear warm-up over `warmup_steps`, then cosine decay to zero over
    the remaining steps (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


class RunLike(Protocol):
    """What the loop needs of a tracked run (matekd.tracking's runs, or a stand-in)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


@dataclass
class Batch:
    """One optimisation step's data for S students trained together (S = 1 alone): student s
    sees its own images, in its own order and augmentation (a function of its seed)."""

    index: torch.Tensor    # positions in the training set [S,B]
    images: torch.Tensor   # augmented uint8 NCHW [S*B,3,32,32], student-major
    inputs: torch.Tensor   # normalised float model input [S*B,3,32,32]
    labels: torch.Tensor   # [S,B]
    offsets: torch.Tensor  # crop offsets (dy, dx) [S,B,2]
    flips: torch.Tensor    # horizontal flips [S,B]

    @property
    def student_count(self) -> int:
        return self.labels.shape[0]


@dataclass
class StepOutput:
    loss: torch.Tensor                  # scalar to minimise: the sum of the students' losses
    logits: torch.Tensor                # student logits [S,B,C], for train accuracy
    losses: torch.Tensor                # each student's loss [S] (divergence checks, logging)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # per-student scalars to log, each [S]


@dataclass
class FitResult:
    history: list[dict[str, float]]
    seconds: float
    images_per_second: float
    steps: int


StepFn = Callable[[Batch, int], StepOutput]
EpochHook = Callable[[int, list[dict[str, float]]], None]
Predict = Callable[[torch.Tensor, int], torch.Tensor]   # uint8 images [N,...], batch size -> logits [S,N,C]


def batch_slices(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches over n items; a trailing batch of one is dropped (BatchNorm cannot train on it)."""
    slices = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(slices) > 1 and slices[-1][1] - slices[-1][0] < 2:
        slices.pop()
    return slices


def make_batch(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor,
               flips: torch.Tensor, device: torch.device) -> Batch:
    """Gather, crop and flip a batch on the device; index [S,B], offsets [S,B,2], flips [S,B]."""
    augmented = crop_flip(images[index.reshape(-1)], offsets.reshape(-1, 2), flips.reshape(-1), PAD)
    return Batch(index, augmented, model_input(augmented, device), labels[index], offsets, flips)


def optimise(step_fn: StepFn, batch: Batch, epoch: int, optimizer: torch.optim.Optimizer,
             device: torch.device) -> StepOutput:
    """One optimisation step (forward under autocast, backward, update)."""
    with autocast(device):
        out = step_fn(batch, epoch)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    return out


def single_predict(model: nn.Module, device: torch.device) -> Predict:
    """`predict` for one plain model: logits [1,N,C]."""
    return lambda images, batch_size: predict_logits(model, images, batch_size, device)[None]


def accuracy_per_student(predict: Predict, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                         count: int) -> list[float]:
    """Top-1 accuracy of each of the `count` students on the same images (NaN for an empty set)."""
    if images.shape[0] == 0:
        return [float("nan")] * count
    logits = predict(images, batch_size)
    correct = (logits.argmax(-1) == labels.to(logits.device)).sum(-1)
    return (correct.double() / labels.shape[0]).tolist()


@dataclass
class TrainingData:
    """The split a run trains and scores on, as tensors on the training device: uint8 NCHW
    images and long labels; the test set only when it is to be scored."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.train_images.device

    @classmethod
    def on_device(cls, data: Any, device: torch.device, with_test: bool = True) -> TrainingData:
        """From prepared data (matekd.data.prepared.Prepared: numpy arrays)."""
        return cls(to_device_tensor(data.train_images, device), device_labels(data.train_labels, device),
                   to_device_tensor(data.val_images, device), device_labels(data.val_labels, device),
                   to_device_tensor(data.test_images, device) if with_test else None,
                   device_labels(data.test_labels, device) if with_test else None)


@dataclass
class FitJob:
    """One training run of a module holding S = len(seeds) students (S = 1 alone).

    Student s draws its shuffling and augmentation from seeds[s] and logs to runs[s] (only the
    terms in student_terms[s], when given). `step(batch, epoch)` returns the summed loss and
    per-student values; `predict(images, batch_size)` every student's logits [S,N,C] (default:
    `model` is one plain network). A checkpoint with the same `digest` is resumed after its epoch.
    The test set is scored after the last epoch only unless `test_every_epoch`: it never steers
    training, and scoring it every epoch costs a CPU study of 18 students many minutes.
    """

    model: nn.Module
    step: StepFn
    recipe: Recipe
    data: TrainingData
    seeds: list[int]
    runs: list[RunLike]
    checkpoint: Path | None = None
    digest: str = ""
    desc: str = "train"
    log_every: int = 20
    predict: Predict | None = None
    student_terms: list[set[str]] | None = None
    epoch_hook: EpochHook | None = None
    progress: bool = True
    test_every_epoch: bool = False


def fit(job: FitJob) -> list[FitResult]:
    """Train `job.model` for recipe.epochs with SGD and the recipe's schedule, checkpointing every
    epoch; one result per student."""
    model, step_fn, recipe, data, seeds, runs = job.model, job.step, job.recipe, job.data, job.seeds, job.runs
    checkpoint, digest, desc, progress, epoch_hook = job.checkpoint, job.digest, job.desc, job.progress, job.epoch_hook
    device = data.device
    train_images, train_labels = data.train_images, data.train_labels
    n_students = len(seeds)
    if len(runs) != n_students:
        raise ValueError(f"{n_students} seeds but {len(runs)} runs")
    predict = job.predict or single_predict(model, device)
    optimizer = make_optimizer(model, recipe)
    n = train_images.shape[0]
    slices = batch_slices(n, recipe.batch_size)
    total_steps = recipe.epochs * len(slices)
    warmup_steps = min(round(recipe.warmup_epochs * len(slices)), total_steps)
    start_epoch, seconds = 0, 0.0
    histories: list[list[dict]] = [[] for _ in range(n_students)]
    if checkpoint is not None and checkpoint.exists():
        state = safe_torch_load(checkpoint)
        if state.get("digest") == digest:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, seconds = state["epoch"], state["seconds"]
            histories = [list(h) for h in state["histories"]]
            tqdm.write(f"{desc}: resuming from {checkpoint} after epoch {start_epoch}")
    images_seen = 0
    train_seconds = 0.0
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        plans = [epoch_augmentation(seed, epoch, n, device) for seed in seeds]
        orders = torch.stack([p[0] for p in plans])          # [S,n]
        offsets = torch.stack([p[1] for p in plans])         # [S,n,2]
        flips = torch.stack([p[2] for p in plans])           # [S,n]
        sums = TermSums()
        correct = torch.zeros(n_students, device=device)
        seen = 0
        first_bad_step = torch.full((n_students,), -1, dtype=torch.long, device=device)
        bar = tqdm(slices, desc=f"{desc} {epoch + 1}/{recipe.epochs}", disable=not progress,
                   leave=False, dynamic_ncols=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        for i, (lo, hi) in enumerate(bar):
            step = epoch * len(slices) + i
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * lr_factor(step, total_steps, recipe.schedule, warmup_steps)
            batch = make_batch(train_images, train_labels, orders[:, lo:hi], offsets[:, lo:hi], flips[:, lo:hi],
                               device)
            out = optimise(step_fn, batch, epoch, optimizer, device)
            # NaN/Inf detection without a host sync: remember each student's first bad step on the device.
            bad = ~torch.isfinite(out.losses.detach())
            first_bad_step = torch.where(bad & (first_bad_step < 0), torch.full_like(first_bad_step, step),
                                         first_bad_step)
            size = hi - lo
            seen += size
            terms = {"loss": out.losses.detach(), **{k: v.detach() for k, v in out.terms.items()}}
            stacked = sums.add(terms, size)
            correct += (out.logits.detach().argmax(-1) == batch.labels).sum(-1)
            if (step + 1) % job.log_every == 0 or i == len(slices) - 1:
                _check_finite(first_bad_step, epoch, len(slices), desc)
                synced = stacked.T.tolist()  # one host sync
                lr = optimizer.param_groups[0]["lr"]
                for s in range(n_students):
                    values = {f"step/{k}": v for k, v in zip(terms, synced[s]) if _logged(k, s, job.student_terms)}
                    values["step/lr"] = lr
                    runs[s].log_metrics(values, step=step + 1)
                bar.set_postfix(loss=f"{synced[0][0]:.3f}", acc=f"{float(correct[0]) / seen:.3f}",
                                ips=f"{seen * n_students / max(time.perf_counter() - tic, 1e-9):.0f}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds = time.perf_counter() - tic
        train_seconds += epoch_seconds
        images_seen += seen
        epoch_sums = sums.total.T.tolist()
        accuracy_train = (correct / seen).tolist()
        eval_batch = recipe.eval_batch_size
        val_acc = accuracy_per_student(predict, data.val_images, data.val_labels, eval_batch, n_students)
        score_test = job.test_every_epoch or epoch + 1 == recipe.epochs
        test_acc = (accuracy_per_student(predict, data.test_images, data.test_labels, eval_batch, n_students)
                    if score_test and data.test_images is not None and data.test_labels is not None else None)
        seconds += epoch_seconds
        records = []
        for s in range(n_students):
            # images_per_second: this student's images per second (students together share the time).
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_acc": accuracy_train[s],
                      "images_per_second": seen / epoch_seconds}
            record.update({f"train_{k}": v / seen for k, v in zip(sums.keys, epoch_sums[s], strict=True)
                           if _logged(k, s, job.student_terms)})
            record["val_acc"] = val_acc[s]
            if test_acc is not None:
                record["test_acc"] = test_acc[s]
            histories[s].append(record)
            records.append(record)
            # Step = the 0-based epoch index, shared with the per-epoch images (MLflow opens an
            # image card on step 0); per-step terms use the global step.
            runs[s].log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
        if checkpoint is not None:
            save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "epoch": epoch + 1, "histories": histories, "seconds": seconds,
                                         "digest": digest})
        if epoch_hook is not None:
            epoch_hook(epoch + 1, records)
    results = []
    for s in range(n_students):
        history = histories[s]
        ips = images_seen / train_seconds if train_seconds else (history[-1]["images_per_second"] if history else 0.0)
        results.append(FitResult(history=history, seconds=seconds, images_per_second=ips, steps=total_steps))
    return results


class TermSums:
    """An epoch's running sums of the step terms, as one [T, S] tensor: per step one stack and
    one multiply-add, not one of each per term (a group of 18 students logs ~25 terms)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.total: torch.Tensor | None = None

    def add(self, terms: dict[str, torch.Tensor], size: int) -> torch.Tensor:
        """Add terms (each [S]) weighted by `size`; returns them stacked [T, S] (float)."""
        stacked = torch.stack([v.float() for v in terms.values()])
        if self.total is None:
            self.keys, self.total = list(terms), stacked * size
        elif list(terms) == self.keys:
            self.total += stacked * size
        else:   # another set of terms (not in this code's steps): merged by name
            merged = dict(zip(self.keys, self.total.unbind(0)))
            for key, value in zip(terms, stacked.unbind(0)):
                merged[key] = merged[key] + value * size if key in merged else value * size
            self.keys, self.total = list(merged), torch.stack(list(merged.values()))
        return stacked


def _logged(term: str, student: int, student_terms: list[set[str]] | None) -> bool:
    return term == "loss" or student_terms is None or term in student_terms[student]


def _check_finite(first_bad_step: torch.Tensor, epoch: int, steps_per_epoch: int, desc: str) -> None:
    bad = first_bad_step.tolist()
    for student, step in enumerate(bad):
        if step >= 0:
            who = f"{desc}: " if len(bad) == 1 else f"{desc}, student {student}: "
            raise TrainingDiverged(
                f"{who}loss became NaN or infinite at epoch {epoch + 1}, step {step - epoch * steps_per_epoch + 1} "
                f"(global step {step + 1}); the last good checkpoint is kept. Lower the learning rate or "
                "check the loss coefficients.")


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def cross_entropy_step(model: nn.Module) -> StepFn:
    """The plain supervised step of one model (teachers)."""

    def step(batch: Batch, epoch: int) -> StepOutput:
        logits = model(batch.inputs)
        loss = F.cross_entropy(logits.float(), batch.labels.reshape(-1))
        return StepOutput(loss=loss, logits=logits[None], losses=loss[None], terms={"ce": loss.detach()[None]})

    return step

"""The training loop shared by teachers and students.

Data and augmentation stay on the training device as tensors; per-step values accumulate on
the device and are synchronised only at log points and epoch ends. Every epoch's shuffling
and augmentation derive from (seed, epoch), so resuming from an epoch checkpoint reproduces
an uninterrupted run exactly.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .augment import crop_flip, normalize, sample_crop_flip, variant_index
from .errors import MatekdError, TrainingDiverged
from .params import Recipe
from .storage import atomic_path, safe_torch_load
from .tracking import NullRun

PAD = 4  # random-crop zero padding of the CIFAR recipe


def resolve_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise MatekdError("device: 'cuda' was requested but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


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


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op on the CPU (keeps CPU runs exact and deterministic)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def model_input(images_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = normalize(images_uint8)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.inference_mode()
def predict_logits(model: nn.Module, images_uint8: torch.Tensor, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """Logits (float32, on device) for uint8 NCHW images, in eval mode; restores the mode."""
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, images_uint8.shape[0], batch_size):
        batch = images_uint8[start:start + batch_size].to(device, non_blocking=True)
        with autocast(device):
            outputs.append(model(model_input(batch, device)).float())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0, 10, device=device)


def accuracy(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, batch_size: int,
             device: torch.device) -> float:
    if images_uint8.shape[0] == 0:
        return float("nan")
    logits = predict_logits(model, images_uint8, batch_size, device)
    return int((logits.argmax(1) == labels.to(device)).sum()) / labels.shape[0]


def device_labels(labels, device: torch.device) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        return labels.to(device=device, dtype=torch.long)
    return torch.tensor(labels, dtype=torch.long).to(device)  # copies: labels may be a read-only memmap


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov and recipe.momentum > 0,
                           weight_decay=recipe.weight_decay)


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int = 0) -> float:
    """Per-step multiplier: linear warm-up over `warmup_steps`, then cosine decay to zero over
    the remaining steps (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


@dataclass
class Batch:
    index: torch.Tensor    # positions in the training set [B]
    images: torch.Tensor   # augmented uint8 NCHW [B,3,32,32]
    inputs: torch.Tensor   # normalised float model input
    labels: torch.Tensor   # [B]
    offsets: torch.Tensor  # crop offsets (dy, dx) [B,2]
    flips: torch.Tensor    # horizontal flips [B]


@dataclass
class StepOutput:
    loss: torch.Tensor                  # scalar to minimise
    logits: torch.Tensor                # student logits, for train accuracy
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars to log


@dataclass
class FitResult:
    history: list[dict[str, float]]
    seconds: float
    images_per_second: float
    steps: int


StepFn = Callable[[Batch, int], StepOutput]
EpochHook = Callable[[int, dict[str, float]], None]


def batch_slices(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches over n items; a trailing batch of one is dropped (BatchNorm cannot train on it)."""
    slices = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(slices) > 1 and slices[-1][1] - slices[-1][0] < 2:
        slices.pop()
    return slices


def make_batch(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor,
               flips: torch.Tensor, device: torch.device) -> Batch:
    """Gather, crop and flip a batch on the device."""
    augmented = crop_flip(images[index], offsets, flips, PAD)
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


def fit(*, model: nn.Module, step_fn: StepFn, recipe: Recipe, train_images: torch.Tensor,
        train_labels: torch.Tensor, val_images: torch.Tensor, val_labels: torch.Tensor,
        device: torch.device, seed: int, run: NullRun, checkpoint: Path | None, digest: str,
        desc: str, log_every: int = 20, test_images: torch.Tensor | None = None,
        test_labels: torch.Tensor | None = None, epoch_hook: EpochHook | None = None,
        progress: bool = True) -> FitResult:
    """Train `model` for recipe.epochs with SGD + schedule, checkpointing every epoch.

    `train_images` are uint8 NCHW on `device`. `step_fn(batch, epoch)` returns the loss. If
    `checkpoint` holds a state with the same `digest`, training resumes after its epoch.
    """
    optimizer = make_optimizer(model, recipe)
    n = train_images.shape[0]
    slices = batch_slices(n, recipe.batch_size)
    total_steps = recipe.epochs * len(slices)
    warmup_steps = min(round(recipe.warmup_epochs * len(slices)), total_steps)
    start_epoch, history, seconds = 0, [], 0.0
    if checkpoint is not None and checkpoint.exists():
        state = safe_torch_load(checkpoint)
        if state.get("digest") == digest:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, history, seconds = state["epoch"], list(state["history"]), state["seconds"]
            tqdm.write(f"{desc}: resuming from {checkpoint} after epoch {start_epoch}")
    images_seen = 0
    train_seconds = 0.0
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        order, offsets, flips = epoch_augmentation(seed, epoch, n, device)
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=device)
        seen = 0
        first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        bar = tqdm(slices, desc=f"{desc} {epoch + 1}/{recipe.epochs}", disable=not progress,
                   leave=False, dynamic_ncols=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        for i, (lo, hi) in enumerate(bar):
            step = epoch * len(slices) + i
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * lr_factor(step, total_steps, recipe.schedule, warmup_steps)
            batch = make_batch(train_images, train_labels, order[lo:hi], offsets[lo:hi], flips[lo:hi], device)
            out = optimise(step_fn, batch, epoch, optimizer, device)
            # NaN/Inf detection without a host sync: remember the first bad step on the device.
            bad = ~torch.isfinite(out.loss.detach())
            first_bad_step = torch.where(bad & (first_bad_step < 0), torch.full_like(first_bad_step, step),
                                         first_bad_step)
            size = hi - lo
            seen += size
            terms = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.terms.items()}}
            for key, value in terms.items():
                sums[key] = sums.get(key, 0) + value.float() * size
            correct += (out.logits.detach().argmax(1) == batch.labels).sum()
            if (step + 1) % log_every == 0 or i == len(slices) - 1:
                _check_finite(first_bad_step, epoch, len(slices))
                synced = torch.stack([v.float() for v in terms.values()]).tolist()  # one host sync
                values = {f"step/{k}": v for k, v in zip(terms, synced)}
                values["step/lr"] = optimizer.param_groups[0]["lr"]
                run.log_metrics(values, step=step)
                bar.set_postfix(loss=f"{values['step/loss']:.3f}",
                                acc=f"{float(correct) / seen:.3f}",
                                ips=f"{seen / max(time.perf_counter() - tic, 1e-9):.0f}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds = time.perf_counter() - tic
        train_seconds += epoch_seconds
        images_seen += seen
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                  "train_acc": float(correct) / seen, "images_per_second": seen / epoch_seconds}
        epoch_sums = torch.stack([v.float() for v in sums.values()]).tolist()
        record.update({f"train_{k}": v / seen for k, v in zip(sums, epoch_sums)})
        record["val_acc"] = accuracy(model, val_images, val_labels, recipe.eval_batch_size, device)
        if test_images is not None and test_labels is not None:
            record["test_acc"] = accuracy(model, test_images, test_labels, recipe.eval_batch_size, device)
        seconds += epoch_seconds
        history.append(record)
        run.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
        if checkpoint is not None:
            save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "epoch": epoch + 1, "history": history, "seconds": seconds,
                                         "digest": digest})
        if epoch_hook is not None:
            epoch_hook(epoch + 1, record)
    ips = images_seen / train_seconds if train_seconds else (history[-1]["images_per_second"] if history else 0.0)
    return FitResult(history=history, seconds=seconds, images_per_second=ips, steps=total_steps)


def _check_finite(first_bad_step: torch.Tensor, epoch: int, steps_per_epoch: int) -> None:
    bad = int(first_bad_step)
    if bad >= 0:
        raise TrainingDiverged(
            f"loss became NaN or infinite at epoch {epoch + 1}, step {bad - epoch * steps_per_epoch + 1} "
            f"(global step {bad + 1}); the last good checkpoint is kept. Lower the learning rate or "
            "check the loss coefficients.")


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def cross_entropy_step(model: nn.Module) -> StepFn:
    """The plain supervised step (teachers and the `ce` baseline)."""

    def step(batch: Batch, epoch: int) -> StepOutput:
        logits = model(batch.inputs)
        loss = F.cross_entropy(logits.float(), batch.labels)
        return StepOutput(loss=loss, logits=logits, terms={"ce": loss.detach()})

    return step

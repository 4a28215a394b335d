"""Train one MATE-KD student, one step top to bottom, with the library's own functions.

No groups, no tracking, no DVC: the prepared data, the teachers' cached Grad-CAM maps (and their
logits, online or cached as params.yaml says), and one ResNet20 trained with MATE-KD. The
pipeline's `matekd distill` trains the same student the same way (a test checks they agree),
plus tracking, checkpoints and bf16. Run it where `dvc repro cache` has run:

    python examples/one_student.py [--params params.yaml] [--epochs N]
"""

from __future__ import annotations

import argparse

import torch

from matekd.attribution import model_cam
from matekd.data.prepared import load_prepared
from matekd.losses import LossInputs, method_loss
from matekd.methods import get as get_method
from matekd.models import build_model
from matekd.params import load_params
from matekd.precision import use_precision
from matekd.training.loop import (
    TrainingData,
    accuracy,
    batch_slices,
    configure_determinism,
    epoch_augmentation,
    lr_factor,
    make_batch,
    make_optimizer,
    prepare_model,
    resolve_device,
)
from matekd.training.teacher_outputs import load_teacher_outputs
from matekd.weighting import WeightingInputs

# --------------------------------------------------------------------------------------
# Setup: params, data on the device, the teachers' outputs, the student


def main(argv: list[str] | None = None) -> torch.nn.Module:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="default: distill.recipe.epochs")
    args = parser.parse_args(argv)

    params = load_params(args.params, {"distill.method": "mate_kd"})
    values = params.distill                   # kd_temperature, ce_weight, similarity_temperature, ...
    recipe = values.recipe.model_copy(update={"epochs": args.epochs or values.recipe.epochs})
    method = get_method("mate_kd")            # its weighting rule and its loss (src/matekd/methods/mate_kd.py)
    device = resolve_device(params.device)
    configure_determinism(values.seed, deterministic=False)
    use_precision("fp32", device)             # plain float32: the pipeline adds bf16 where the device has it

    prepared = load_prepared("prepared")
    data = TrainingData.on_device(prepared, device)
    teachers = list(params.teachers)
    outputs = load_teacher_outputs(params, teachers, need_maps=True, data=prepared, device=device)
    torch.manual_seed(values.seed)
    student = prepare_model(build_model(values.student), device)
    optimizer = make_optimizer(student, recipe)

    # ----------------------------------------------------------------------------------
    # Training: per step, the student's logits and Grad-CAM map, the teachers' outputs on the
    # same augmented views, the per-sample teacher weights, the loss

    seed = values.seed if values.data_seed is None else values.data_seed
    n = data.train_images.shape[0]
    slices = batch_slices(n, recipe.batch_size)
    total_steps = recipe.epochs * len(slices)
    warmup_steps = min(round(recipe.warmup_epochs * len(slices)), total_steps)
    the_student = torch.zeros(1, dtype=torch.long, device=device)          # batch rows of student 0
    all_teachers = list(range(len(teachers)))
    teacher_rows = torch.arange(len(teachers), device=device)[:, None]
    for epoch in range(recipe.epochs):
        student.train()
        order, offsets, flips = epoch_augmentation(seed, epoch, n, device)   # a function of (seed, epoch)
        for i, (lo, hi) in enumerate(slices):
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * lr_factor(epoch * len(slices) + i, total_steps, recipe.schedule,
                                                    warmup_steps)
            batch = make_batch(data.train_images, data.train_labels, order[None, lo:hi], offsets[None, lo:hi],
                               flips[None, lo:hi], device)
            labels = batch.labels[0]
            logits, activations = student.forward_cam(batch.inputs)
            target = labels if values.student_target == "label" else logits.detach().argmax(-1)
            student_maps = model_cam(student, activations, logits, target, create_graph=True)
            teacher_logits = outputs.logits(batch, the_student, all_teachers, teacher_rows)      # [K,B,C]
            teacher_maps = outputs.maps(batch, the_student, all_teachers)                         # [K,B,h,w]
            weights, sim = method.weigh(WeightingInputs(teacher_logits, labels, student_maps.detach(), teacher_maps),
                                        values, epoch)
            terms, total = method_loss(method, LossInputs(logits.float(), labels, teacher_logits, weights, sim,
                                                          student_maps, teacher_maps), values)
            optimizer.zero_grad(set_to_none=True)
            total.sum().backward()
            optimizer.step()
        val_acc = accuracy(student, data.val_images, data.val_labels, recipe.eval_batch_size, device)
        shown = " ".join(f"{k}={float(v.detach()):.4f}" for k, v in terms.items())
        print(f"epoch {epoch + 1}/{recipe.epochs}: last step {shown}; val_acc={val_acc!r}")

    test_acc = accuracy(student, data.test_images, data.test_labels, recipe.eval_batch_size, device)
    print(f"test_acc={test_acc!r}")
    return student


if __name__ == "__main__":
    main()

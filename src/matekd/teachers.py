"""Stage train_teacher: train one CIFAR teacher with the recipe from params.yaml."""

from __future__ import annotations

from pathlib import Path

from .augment import to_device_tensor
from .data import load_prepared
from .errors import MatekdError, ParamsError
from .models import build_model, count_parameters, model_size_mb
from .params import Params
from .runtime import digest_of, stage, write_history_csv
from .storage import load_tensors, save_tensors, write_json
from .train import accuracy, cross_entropy_step, device_labels, fit, prepare_model

TIMING_KEYS = ("seconds", "images_per_second")  # wall-clock: the only non-deterministic metrics


def teacher_paths(name: str, root: Path = Path(".")) -> dict[str, Path]:
    return {
        "weights": root / "models" / "teachers" / f"{name}.safetensors",
        "metrics": root / "metrics" / "teachers" / f"{name}.json",
        "plots": root / "plots" / "teachers" / f"{name}.csv",
        "checkpoint": root / "checkpoints" / "teachers" / f"{name}.pt",
    }


def run_train_teacher(params: Params, name: str, prepared_dir: str | Path = "prepared",
                      progress: bool = True) -> dict:
    if name not in params.teachers:
        raise ParamsError(f"teacher {name!r} is not listed under teachers in params.yaml "
                          f"(listed: {', '.join(params.teachers)})")
    recipe = params.teachers[name]
    data = load_prepared(prepared_dir)
    paths = teacher_paths(name)
    digest = digest_of("teacher", name, recipe.model_dump(), params.seed, data.manifest_hash)
    with stage(params, name="train_teacher", run_name=f"teacher-{name}", data_hash=data.manifest_hash,
               tags={"model": name}) as ctx:
        device = ctx.device
        model = prepare_model(build_model(name), device)
        train_x, train_y = to_device_tensor(data.train_images, device), device_labels(data.train_labels, device)
        val_x, val_y = to_device_tensor(data.val_images, device), device_labels(data.val_labels, device)
        result = fit(model=model, step_fn=cross_entropy_step(model), recipe=recipe, train_images=train_x,
                     train_labels=train_y, val_images=val_x, val_labels=val_y, device=device,
                     seed=params.seed, run=ctx.run, checkpoint=paths["checkpoint"], digest=digest,
                     desc=name, progress=progress)
        test_acc = accuracy(model, to_device_tensor(data.test_images, device), device_labels(data.test_labels, device),
                            recipe.eval_batch_size, device)
        state = {k: v for k, v in model.state_dict().items()}
        save_tensors(paths["weights"], state, {"architecture": name, "digest": digest,
                                               "dataset_sha256": data.manifest_hash})
        last = result.history[-1]
        metrics = {
            "model": name, "val_acc": last["val_acc"], "test_acc": test_acc,
            "train_acc": last["train_acc"], "train_loss": last["train_loss"],
            "params": count_parameters(model), "size_mb": model_size_mb(model),
            "epochs": recipe.epochs, "seconds": result.seconds,
            "images_per_second": result.images_per_second, "device": device.type,
            "train_images": int(train_x.shape[0]), "dataset_sha256": data.manifest_hash,
        }
        write_json(paths["metrics"], metrics)
        write_history_csv(paths["plots"], result.history)
        ctx.run.log_metrics({"final/val_acc": metrics["val_acc"], "final/test_acc": test_acc,
                             "final/params": metrics["params"], "final/size_mb": metrics["size_mb"],
                             "final/seconds": result.seconds,
                             "final/images_per_second": result.images_per_second})
        ctx.run.log_artifact(paths["metrics"], "metrics")
        ctx.run.log_artifact(paths["plots"], "plots")
    return metrics


def load_teacher(name: str, device, root: Path = Path(".")):
    """A trained teacher in eval mode, loaded from safetensors; missing weights fail clearly."""
    path = teacher_paths(name, root)["weights"]
    if not path.exists():
        raise MatekdError(f"missing teacher weights {path}; run `dvc repro train_teacher@{name}` "
                          f"(or `matekd train-teacher {name}`)")
    state, meta = load_tensors(path)
    if meta.get("architecture", name) != name:
        raise MatekdError(f"{path} holds a {meta.get('architecture')} model, not {name}")
    model = build_model(name)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MatekdError(f"{path} does not match the {name} architecture ({exc})") from exc
    model = prepare_model(model, device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model

"""Stage train_teacher@<name>: train one CIFAR teacher with its recipe from params.yaml."""

from __future__ import annotations

from pathlib import Path

from ..augment import to_device_tensor
from ..data.prepared import load_prepared
from ..errors import ParamsError
from ..models import build_model, count_parameters, model_size_mb
from ..params import Params, flatten
from ..paths import teacher_paths
from ..precision import bf16_enabled
from ..storage import digest_of, save_tensors, write_history_csv, write_json
from ..training.loop import FitJob, TrainingData, accuracy, cross_entropy_step, device_labels, fit, prepare_model
from .context import log_prepared_input, stage

TIMING_KEYS = ("seconds", "images_per_second")  # wall-clock: the only non-deterministic metrics


def logged_params(params: Params, name: str) -> dict:
    """What this teacher's run depends on: its recipe, the seed and the data split."""
    return {"teacher": name, "seed": params.seed, "device": params.device, "precision": params.precision,
            "deterministic": params.deterministic,
            **flatten({"teachers": {name: params.teachers[name].model_dump(mode="json")}}),
            **flatten({"data": params.data.model_dump(mode="json")})}


def run_train_teacher(params: Params, name: str, prepared_dir: str | Path = "prepared",
                      progress: bool = True) -> dict:
    if name not in params.teachers:
        raise ParamsError(f"teacher {name!r} is not listed under teachers in params.yaml "
                          f"(listed: {', '.join(params.teachers)})")
    recipe = params.teachers[name]
    data = load_prepared(prepared_dir)
    paths = teacher_paths(name)
    digest = digest_of("teacher", name, recipe.model_dump(), params.seed, params.precision, data.manifest_hash)
    with stage(params, name="train_teacher", run_name=f"teacher {name}", data_hash=data.manifest_hash,
               tags={"model": name}, log_params=logged_params(params, name)) as ctx:
        log_prepared_input(ctx.run, data)
        device = ctx.device
        model = prepare_model(build_model(name), device)
        split = TrainingData.on_device(data, device, with_test=False)
        (result,) = fit(FitJob(model, cross_entropy_step(model), recipe, split, seeds=[params.seed], runs=[ctx.run],
                               checkpoint=paths["checkpoint"], digest=digest, desc=name, progress=progress))
        test_acc = accuracy(model, to_device_tensor(data.test_images, device), device_labels(data.test_labels, device),
                            recipe.eval_batch_size, device)
        state = {k: v for k, v in model.state_dict().items()}
        save_tensors(paths["weights"], state, {"architecture": name, "digest": digest,
                                               "dataset_sha256": data.manifest_hash})
        last = result.history[-1]
        # A DVC metrics file: numbers only (`dvc metrics show` / `dvc exp show` compare them). The
        # teacher's name is the file name; device and dataset hash are tags of its tracked run,
        # and the dataset hash is also in the weights' metadata.
        metrics = {
            "val_acc": last["val_acc"], "test_acc": test_acc,
            "train_acc": last["train_acc"], "train_loss": last["train_loss"],
            "params": count_parameters(model), "size_mb": model_size_mb(model),
            "epochs": recipe.epochs, "seconds": result.seconds,
            "images_per_second": result.images_per_second, "train_images": int(split.train_images.shape[0]),
            "bf16": int(bf16_enabled(device)),   # numbers only: 1 = bf16 autocast, 0 = fp32
        }
        write_json(paths["metrics"], metrics)
        write_history_csv(paths["plots"], result.history)
        ctx.run.log_metrics({"final/val_acc": metrics["val_acc"], "final/test_acc": test_acc,
                             "final/params": metrics["params"], "final/size_mb": metrics["size_mb"],
                             "final/seconds": result.seconds,
                             "final/images_per_second": result.images_per_second})
        ctx.run.log_artifact(paths["metrics"], "metrics")
        ctx.run.log_artifact(paths["plots"], "plots")
    # The outputs are written: the checkpoint has nothing left to resume. It is not a DVC output
    # (declared, it would need `persist`, which keeps the stage out of the run-cache).
    paths["checkpoint"].unlink(missing_ok=True)
    return metrics

"""The paper setting (docs/method.md, "Defaults" and "Claimed results") and `shortcuts`: every way
the configured experiment departs from it, one plain sentence each, derived from the params."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .. import methods as method_table
from ..corruptions import EXTRA_4 as EXTRA_CORRUPTIONS
from ..corruptions import STANDARD_15 as STANDARD_CORRUPTIONS
from ..params import CIFAR_PER_CLASS_TEST, CIFAR_PER_CLASS_TRAIN, Params, Recipe
from .formatting import yaml_value

CLASSES = 10                                   # CIFAR-10

# docs/method.md "Defaults" and "Claimed results": the setting the shortcuts are measured against.
PAPER_RECIPE = {"epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "nesterov": True,
                "weight_decay": 5e-4, "schedule": "cosine"}
PAPER_VAL_PER_CLASS = 500                      # 45k / 5k / 10k
PAPER_TEACHERS = ("resnet110", "densenet121", "vgg19_bn")
PAPER_STUDENT = "resnet20"
PAPER_DISTILL = {"ce_weight": 0.3, "kd_temperature": 3.0, "similarity_temperature": 0.2, "attribution_weight": 0.1}
CLAIMED = [("ResNet110", 93.5, "1.7M", "6.8MB", 74.05), ("DenseNet121", 94.2, "7.0M", "28MB", 75.89),
           ("VGG19", 93.8, "20M", "80MB", 73.47), ("Student ResNet20 (MATE-KD)", 90.22, "0.27M", "1.1MB", 68.51)]


def shortcuts(params: Params, devices: Sequence[str] = (), bf16_parts: Sequence[str] | None = None) -> list[str]:
    """Every way the configured experiment departs from the paper setting (docs/method.md,
    Defaults: 200 epochs, batch 128, SGD lr 0.1 with Nesterov momentum 0.9, weight decay 5e-4,
    cosine schedule; ResNet110/DenseNet121/VGG19 teachers, a ResNet20 student; 45k/5k/10k
    images; the full CIFAR-10-C), one plain sentence each, derived from the params (and from the
    `devices` the models were evaluated on, and `bf16_parts`, the parts of the pipeline the metric
    files record as run in bf16, e.g. ["teachers", "students"]; without that record (older
    outputs) a GPU means bf16). Speed-ups that are exact by construction are listed too, and say so."""
    out: list[str] = []
    if tuple(sorted(params.teachers)) != tuple(sorted(PAPER_TEACHERS)):
        out.append(f"teachers {', '.join(params.teachers)} instead of the paper's {', '.join(PAPER_TEACHERS)}")
    if params.distill.student != PAPER_STUDENT:
        out.append(f"student {params.distill.student} instead of {PAPER_STUDENT}")
    recipes: dict[str, Recipe] = {f"teacher {name}": r for name, r in params.teachers.items()}
    recipes["students"] = params.distill.recipe
    out += _recipe_shortcuts(recipes)
    out += _data_shortcuts(params)
    out += _distill_shortcuts(params)
    gpus = sorted({d for d in devices if d and not str(d).startswith("cpu")})
    if bf16_parts:
        where = f" on {', '.join(sorted({str(d) for d in devices if d}))}" if devices else ""
        out.append(f"bf16 autocast and channels_last for {', '.join(bf16_parts)}{where} (precision param); "
                   "the paper recipe is fp32")
    elif gpus and bf16_parts is None:
        out.append(f"bf16 autocast and channels_last on the GPU ({', '.join(gpus)}); the paper recipe is fp32")
    return out


def _recipe_shortcuts(recipes: Mapping[str, Recipe]) -> list[str]:
    out: list[str] = []
    paper = PAPER_RECIPE

    def listing(pairs: list[tuple[str, str]]) -> str:
        return ", ".join(f"{who} {what}" for who, what in pairs)

    fewer = [(who, str(r.epochs)) for who, r in recipes.items() if r.epochs < paper["epochs"]]
    more = [(who, str(r.epochs)) for who, r in recipes.items() if r.epochs > paper["epochs"]]
    if fewer:
        out.append(f"fewer epochs: {listing(fewer)} (paper: {paper['epochs']})")
    if more:
        out.append(f"more epochs: {listing(more)} (paper: {paper['epochs']})")
    alike: dict[tuple[int, float], list[str]] = {}     # recipes with the same batch and lr: one line
    for who, r in recipes.items():
        if r.batch_size != paper["batch_size"] or not math.isclose(r.lr, paper["lr"]):
            alike.setdefault((r.batch_size, r.lr), []).append(who)
    for (batch, lr), whom in alike.items():
        who = ", ".join(whom)
        if batch == paper["batch_size"]:
            out.append(f"{who}: learning rate {lr:g} (paper: {paper['lr']:g} at batch {paper['batch_size']})")
            continue
        scaled = paper["lr"] * batch / paper["batch_size"]
        kind = "larger" if batch > paper["batch_size"] else "smaller"
        rule = "the linear scaling rule" if math.isclose(lr, scaled) else f"linear scaling would give {scaled:g}"
        out.append(f"{kind} batches: {who} batch {batch} with learning rate {lr:g} "
                   f"(paper: batch {paper['batch_size']}, lr {paper['lr']:g}; {rule})")
    for key, label in (("momentum", "momentum"), ("weight_decay", "weight decay"), ("schedule", "schedule")):
        want = paper[key]
        differ = [(who, yaml_value(value)) for who, r in recipes.items() if (value := getattr(r, key)) != want
                  and not (isinstance(want, float) and math.isclose(value, want))]
        if differ:
            out.append(f"{label}: {listing(differ)} (paper: {yaml_value(want)})")
    plain = [who for who, r in recipes.items() if not r.nesterov]
    if plain:
        out.append(f"plain (not Nesterov) momentum: {', '.join(plain)}")
    warm = [(who, f"{r.warmup_epochs:g} epoch(s)") for who, r in recipes.items() if r.warmup_epochs > 0]
    if warm:
        out.append(f"linear learning-rate warm-up: {listing(warm)} (not in the paper recipe)")
    return out


def _data_shortcuts(params: Params) -> list[str]:
    out: list[str] = []
    d, c = params.data, params.corrupt
    paper_train = CIFAR_PER_CLASS_TRAIN - PAPER_VAL_PER_CLASS
    train = d.train_images_per_class
    if train != paper_train:
        kind = "training subset" if train < paper_train else "larger training split"
        out.append(f"{kind}: {train:,} images per class ({CLASSES * train:,} instead of {CLASSES * paper_train:,})")
    if d.val_per_class != PAPER_VAL_PER_CLASS:
        out.append(f"validation split: {d.val_per_class:,} images per class ({CLASSES * d.val_per_class:,} "
                   f"instead of {CLASSES * PAPER_VAL_PER_CLASS:,})")
    if d.test_per_class is not None and d.test_per_class < CIFAR_PER_CLASS_TEST:
        out.append(f"test subset: {d.test_per_class:,} images per class ({CLASSES * d.test_per_class:,} of the "
                   f"{CLASSES * CIFAR_PER_CLASS_TEST:,} test images)")
    if c.images_per_class is not None and c.images_per_class < CIFAR_PER_CLASS_TEST:
        out.append(f"CIFAR-10-C subset: {c.images_per_class:,} images per class and corruption and severity "
                   f"({CLASSES * c.images_per_class:,} instead of {CLASSES * CIFAR_PER_CLASS_TEST:,})")
    if c.corruptions is not None:
        chosen = set(c.corruptions)
        standard = [n for n in STANDARD_CORRUPTIONS if n not in chosen]
        extra = [n for n in EXTRA_CORRUPTIONS if n not in chosen]
        if standard:
            out.append(f"CIFAR-10-C without {', '.join(standard)}: the 15-corruption mean covers "
                       f"{len(STANDARD_CORRUPTIONS) - len(standard)} corruptions")
        if extra:
            out.append(f"CIFAR-10-C without the extra corruption(s) {', '.join(extra)} (19-corruption mean only)")
    return out


def _distill_shortcuts(params: Params) -> list[str]:
    out: list[str] = []
    d, a = params.distill, params.ablation
    changed = [f"{key} {getattr(d, key):g} (paper {value:g})" for key, value in PAPER_DISTILL.items()
               if not math.isclose(getattr(d, key), value)]
    if changed:
        out.append("shared distill values differ from the paper's seed configuration: " + ", ".join(changed))
    if a.tuned:
        out.append("ablation.tuned: each method trains with its own tuned values (tuning/best/<method>.yaml), "
                   "not the shared distill values")
    if d.data_seed is not None:
        out.append(f"one data stream for every student (distill.data_seed {d.data_seed}): every seed sees the same "
                   "order and augmentation, so seeds differ only in initialisation and the spread over seeds "
                   "understates run-to-run variation")

    used = [method_table.METHODS[m] for m in {*a.methods, d.method} if m in method_table.METHODS]
    if d.teacher_signals == "cached" and any(m.has_kd for m in used):
        out.append("teacher logits read from the cache (exact: each crop/flip variant's logits computed once by "
                   "the cache stage, the same numbers as running the teachers online)")
        if params.cache.logit_variants == "used":
            out.append("cache.logit_variants: used (exact for these runs: logits cached only for the crop/flip "
                       "variants these seeds and epochs draw; another seed or epoch count reruns `cache`)")
    if a.group_size > 1:
        out.append(f"ablation students trained {a.group_size} at a time as one network of grouped convolutions "
                   "(exact by construction: each keeps its own weights, data order, augmentation, teacher "
                   "signals and loss)")
    return out

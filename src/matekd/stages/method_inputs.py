"""Stage method_inputs@<method>: everything one method's students train with, in one file.

`methods/<method>.json` holds the method's own hyperparameter values (the shared distill.*
values, or with ablation.tuned its tuned values and their provenance), the optimiser recipe, and
the teachers it reads with the sha256 of their weights and caches. Each ablation@<method>-<seed>
stage depends on this file instead of on every teacher and cache: a change reruns exactly the
students it can change (a new teacher leaves `ce` alone; a new kd_temperature leaves `ce` and
the cached teachers alone), and the values a run used are on record. The stage itself is cheap.
"""

from __future__ import annotations

from typing import Any

from .. import methods as method_table
from ..errors import ParamsError
from ..params import Params, flatten
from ..paths import method_inputs_path
from ..storage import write_json
from ..teachers import teacher_identity
from ..training.students import resolve_spec, spec_teachers


def method_inputs(params: Params, method: str) -> dict[str, Any]:
    if method not in params.ablation.methods:
        raise ParamsError(f"method {method!r} is not in ablation.methods ({', '.join(params.ablation.methods)})")
    spec = resolve_spec(params, method, params.ablation.seeds[0], "", tuned=params.ablation.tuned)
    row = method_table.get(method)
    d = spec.distill
    teachers = spec_teachers(spec, params)
    identity = teacher_identity(teachers, row.reads_cache(d.teacher_signals))
    return {
        "method": method, "summary": row.summary, "weighting": row.weighting, "terms": list(row.terms),
        "values": {f"distill.{name}": getattr(d, name) for name in row.keys},
        "recipe": flatten({"distill": {"recipe": d.recipe.model_dump(mode="json")}}),
        "student": d.student, "histogram_bins": d.histogram_bins, "data_seed": d.data_seed,
        "teacher_signals": d.teacher_signals if row.has_kd else None,
        "tuned": {"from": spec.tuned_from, "trials": spec.tuned_trials} if spec.tuned_from else None,
        "teachers": {name: {"weights_sha256": identity["weights"][name],
                            "cache_sha256": identity["caches"].get(name)}
                     for name in teachers},
    }


def run_method_inputs(params: Params, method: str) -> dict[str, Any]:
    content = method_inputs(params, method)
    write_json(method_inputs_path(method), content)
    return content

"""Each DVC stage's source deps are exactly the import closure of the module its command runs.

The closure is derived from the code, never from a list kept by hand: `matekd <command>` is
resolved through cli.py (`add("<command>", cmd_fn, ...)`, and the `from .stages.<module> import`
inside cmd_fn), then every `import` / `from ... import` of matekd modules, at module top and
inside functions, is followed (relative imports resolved), with every package `__init__.py` on
the way (importing matekd.data.prepared executes matekd/__init__.py and matekd/data/__init__.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "matekd"

# Modules that cannot change any stage output, left out of the deps (and not followed):
#   errors    exception classes; their messages never reach an output file
#   tracking  MLflow / offline run records only; no stage reads anything back from it
#   cli       argparse dispatch: it parses the command line and calls the stage function
EXCLUDED = ("matekd.errors", "matekd.tracking", "matekd.cli")
# Packages whose __init__ imports every module they hold at run time (importlib), so importing
# the package runs all of them: matekd.methods loads each method's module, a new one included.
AUTOLOADING = ("matekd.methods",)


def _excluded(module: str) -> bool:
    return any(module == e or module.startswith(e + ".") for e in EXCLUDED)


def module_file(module: str, src: Path = SRC) -> Path | None:
    base = src.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def imported_modules(module: str, path: Path, src: Path = SRC) -> set[str]:
    """matekd modules `path` imports anywhere in its body (relative imports resolved; for
    `from X import name` also X.name when that is a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}", src))
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def import_closure(module: str, src: Path = SRC) -> set[Path]:
    """Source files executed by `import module` (minus EXCLUDED), as paths relative to the repo."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or _excluded(name):
            continue
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        path = module_file(name, src)
        if path is None:
            continue
        seen[name] = path
        todo += sorted(imported_modules(name, path, src))
        if name in AUTOLOADING:
            todo += sorted(f"{name}.{p.stem}" for p in path.parent.glob("*.py") if p.name != "__init__.py")
    return {p.relative_to(src.parent) for p in seen.values()}


def command_modules(cli: Path = SRC / PACKAGE / "cli.py") -> dict[str, str]:
    """{`matekd` subcommand: the stages/commands module its handler imports}, read from cli.py."""
    tree = ast.parse(cli.read_text())
    handlers = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "add"
                and len(node.args) >= 2 and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[1], ast.Name)):
            continue
        handler = handlers[node.args[1].id]
        targets = [f"{PACKAGE}.{n.module}" for n in ast.walk(handler)
                   if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module
                   and n.module.startswith(("stages.", "commands."))]
        if targets:
            out[node.args[0].value] = targets[0]
    return out


def stage_command(cmd: str) -> str:
    words = cmd.split()
    assert words[0] == "matekd", f"stage command {cmd!r} does not run `matekd`"
    return words[1]


def declared_sources(deps: list, root: Path = ROOT) -> set[Path]:
    """The .py files a stage's deps name under src/ (a directory dep stands for its .py files)."""
    out: set[Path] = set()
    for dep in deps:
        if not str(dep).startswith("src/"):
            continue
        path = root / dep
        if path.is_dir():
            out |= {p.relative_to(root) for p in path.rglob("*.py") if "__pycache__" not in p.parts}
        else:
            out.add(Path(dep))
    return out


def pipeline_stages(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, dict]:
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


STAGES = pipeline_stages()


def test_every_stage_runs_a_known_command():
    commands = command_modules()
    for name, stage in STAGES.items():
        assert stage_command(stage["cmd"]) in commands, (name, stage["cmd"], sorted(commands))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_source_deps_are_its_import_closure(name):
    stage = STAGES[name]
    module = command_modules()[stage_command(stage["cmd"])]
    closure = import_closure(module)
    declared = declared_sources(stage.get("deps", []))
    missing = sorted(map(str, closure - declared))
    extra = sorted(map(str, declared - closure))
    assert not missing and not extra, (f"stage {name} ({module}): deps lack {missing}; deps name files "
                                       f"it does not import: {extra}")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_directory_deps_only_for_whole_packages(name):
    """A directory dep is only right when the stage imports every module in it."""
    stage = STAGES[name]
    closure = import_closure(command_modules()[stage_command(stage["cmd"])])
    for dep in stage.get("deps", []):
        if str(dep).startswith("src/") and (ROOT / dep).is_dir():
            files = declared_sources([dep])
            assert files <= closure, f"stage {name}: directory dep {dep} includes {sorted(map(str, files - closure))}"


# The checker itself, on a small package written here: it must see imports inside functions,
# relative imports and parent packages, and leave out the exclusions.


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_closure_follows_lazy_relative_and_package_imports(tmp_path):
    src = tmp_path / "src"
    _write(src, {
        "matekd/__init__.py": "",
        "matekd/errors.py": "from .unused import x\n",
        "matekd/unused.py": "",
        "matekd/core.py": "import matekd.leaf\n",
        "matekd/leaf.py": "",
        "matekd/lazy.py": "",
        "matekd/tracking/__init__.py": "from ..unused import y\n",
        "matekd/data/__init__.py": "",
        "matekd/data/prepared.py": "from . import helpers\n",
        "matekd/data/helpers.py": "",
        "matekd/stages/__init__.py": "",
        "matekd/stages/s.py": ("from ..core import f\nfrom ..errors import E\nfrom .. import tracking\n"
                               "def run():\n    from ..data.prepared import load\n    from .. import lazy\n"),
    })
    got = {str(p) for p in import_closure("matekd.stages.s", src)}
    assert got == {"src/matekd/__init__.py", "src/matekd/stages/__init__.py", "src/matekd/stages/s.py",
                   "src/matekd/core.py", "src/matekd/leaf.py", "src/matekd/data/__init__.py",
                   "src/matekd/data/prepared.py", "src/matekd/data/helpers.py", "src/matekd/lazy.py"}


def test_directory_deps_expand_to_their_python_files(tmp_path):
    _write(tmp_path, {"src/matekd/models/__init__.py": "", "src/matekd/models/a.py": "",
                      "src/matekd/models/__pycache__/a.cpython-311.pyc": "", "src/matekd/x.py": ""})
    got = declared_sources(["prepared", "src/matekd/models", "src/matekd/x.py"], tmp_path)
    assert got == {Path("src/matekd/models/__init__.py"), Path("src/matekd/models/a.py"), Path("src/matekd/x.py")}


# params: DVC refuses to run a stage whose listed key is missing from params.yaml, so every
# profile a user may copy to params.yaml must define every listed key.

PARAMS_FILES = [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*.yaml"))]


def listed_params(stage: dict, params: dict) -> list[str]:
    keys = []
    for entry in stage.get("params", []):
        for key in ([entry] if isinstance(entry, str) else list(entry)):
            if "${key}" in key:   # foreach over teachers
                keys += [key.replace("${key}", name) for name in params.get("teachers") or {}]
            else:
                keys.append(key)
    return keys


def has_key(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("params_file", PARAMS_FILES, ids=lambda p: p.name)
def test_every_listed_param_is_defined(params_file):
    params = yaml.safe_load(params_file.read_text())
    missing = sorted({f"{name}: {key}" for name, stage in STAGES.items() for key in listed_params(stage, params)
                      if not has_key(params, key)})
    assert not missing, f"{params_file.relative_to(ROOT)} lacks keys that dvc.yaml lists: {missing}"


# The stages a method's values reach (method_inputs@<m> records them, distill trains with them)
# list every registered method hyperparameter (matekd.methods declares them; `--write` rewrites
# these lines too): a new method's hyperparameter needs no hand edit of dvc.yaml.
HYPERPARAMETER_STAGES = ("method_inputs", "distill")


def hyperparameter_keys() -> list[str]:
    from matekd import methods

    return [f"distill.{name}" for name in methods.HYPERPARAMETERS]


@pytest.mark.parametrize("name", HYPERPARAMETER_STAGES)
def test_stages_list_every_method_hyperparameter(name):
    registered = hyperparameter_keys()
    listed = [key for key in STAGES[name].get("params", []) if isinstance(key, str)]
    assert [k for k in listed if k in registered] == registered, (
        f"dvc.yaml stage {name} must list {registered}; run `python tests/test_dvc_deps.py --write`")
    hyperparameter_like = {k for k in listed if k.startswith("distill.") and k.count(".") == 1}
    from matekd.params import DistillParams

    shared = {f"distill.{f}" for f in DistillParams.model_fields}
    assert hyperparameter_like - shared <= set(registered), "a listed distill key no method declares"


# `python tests/test_dvc_deps.py` prints each stage's source deps as dvc.yaml should list them;
# `--write` puts them into dvc.yaml in place (only the `- src/...` lines of each stage change).


def expected_deps(closure: set[Path], root: Path = ROOT) -> list[str]:
    """The closure as dep lines: a sub-package of matekd whose every module is imported becomes
    one directory dep, everything else is listed file by file."""
    files = sorted(map(str, closure))
    package_root = root / "src" / PACKAGE
    whole = sorted(str(d.relative_to(root)) for d in package_root.iterdir()
                   if d.is_dir() and (d / "__init__.py").is_file()
                   and declared_sources([str(d.relative_to(root))], root) <= closure)
    kept = [f for f in files if not any(f.startswith(d + "/") for d in whole)]
    return sorted(kept + whole)


def orphaned_hyperparameter_key(key: str) -> bool:
    """A `distill.*` key that is no shared key and no registered hyperparameter: a removed
    method's, dropped by --write."""
    from matekd.params import DistillParams

    name = key.removeprefix("distill.")
    return name not in DistillParams.model_fields and key not in hyperparameter_keys()


def rewrite_dvc_yaml(path: Path = ROOT / "dvc.yaml") -> str:
    import re

    commands = command_modules()
    registered = hyperparameter_keys()
    inserted: set[str] = set()
    lines = path.read_text().splitlines(keepends=True)
    out: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        header = re.match(r"^  ([A-Za-z_][\w-]*):\s*$", line)
        if header:
            stage = header.group(1)
        dep = re.match(r"^(\s+)- src/", line)
        if dep and stage in STAGES:
            indent = dep.group(1)
            while i < len(lines) and re.match(r"^\s+- src/", lines[i]):
                i += 1
            closure = import_closure(commands[stage_command(STAGES[stage]["cmd"])])
            out += [f"{indent}- {d}\n" for d in expected_deps(closure)]
            continue
        param = re.match(r"^(\s+)- (distill\.\w+)\s*$", line)
        if param and stage in HYPERPARAMETER_STAGES and (param.group(2) in registered
                                                         or orphaned_hyperparameter_key(param.group(2))):
            # the registered hyperparameters, in registry order, where the first of them stood
            if stage not in inserted:
                out += [f"{param.group(1)}- {k}\n" for k in registered]
                inserted.add(stage)
            i += 1
            continue
        out.append(line)
        i += 1
    return "".join(out)


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv:
        (ROOT / "dvc.yaml").write_text(rewrite_dvc_yaml())
    else:
        for name, stage in STAGES.items():
            closure = import_closure(command_modules()[stage_command(stage["cmd"])])
            print(f"{name}:\n" + "".join(f"  - {d}\n" for d in expected_deps(closure)))

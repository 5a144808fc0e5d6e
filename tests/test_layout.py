"""The house's rules, enforced: imports run one way (reference <- fast <- tiny_models; benchmarks, scripts,
notebooks and tests on top, imported by nobody), the oracle is NumPy only, and no file edits sys.path."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOP = ("reference", "fast", "tiny_models", "benchmarks", "scripts", "notebooks", "tests")
# what each package may import among the project's own top-level folders
ALLOWED = {
    "reference": {"reference"},
    "fast": {"reference", "fast"},
    "tiny_models": {"reference", "fast", "tiny_models"},
}
# inside fast/: the ops (top-level modules) never reach into the training or developer-tool rooms, except
# SCRG, which generates through the causal-LM protocol and the sampler of fast.training, and the teacher
# cache, which runs a teacher through that protocol over the training room's batches and JSONL reader
OPS_MAY_IMPORT_TRAINING = {
    "fast/scrg.py": {"fast.training.lm", "fast.training.sampling"},
    "fast/teacher_cache.py": {"fast.training.data", "fast.training.lm", "fast.training.hf_distill"},
}


def _imports(path):  # -> list of (module name, line)
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, node.lineno))
    return out


def _files(folder):
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_one_way(package):
    bad = []
    for f in _files(package):
        for mod, line in _imports(f):
            top = mod.split(".")[0]
            if top in TOP and top not in ALLOWED[package]:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_oracle_is_numpy_only():
    allowed = {
        "numpy",
        "math",
        "dataclasses",
        "typing",
        "__future__",
        "itertools",
        "functools",
        "collections",
        "reference",
        "re",
        "string",
    }
    bad = [
        f"{f.relative_to(ROOT)}:{line} imports {mod}"
        for f in _files("reference")
        for mod, line in _imports(f)
        if mod.split(".")[0] not in allowed
    ]
    assert not bad, "\n".join(bad)


def test_fast_rooms():
    bad = []
    for f in _files("fast"):
        rel = f.relative_to(ROOT).as_posix()
        room = rel.split("/")[1] if rel.count("/") > 1 else "ops"
        for mod, line in _imports(f):
            if mod.startswith("fast.devtools") and room != "devtools":
                bad.append(f"{rel}:{line}: only the developer tools import fast.devtools ({mod})")
            if (
                room == "ops"
                and mod.startswith("fast.training")
                and mod not in OPS_MAY_IMPORT_TRAINING.get(rel, ())
            ):
                bad.append(f"{rel}:{line}: an op imports the training room ({mod})")
    assert not bad, "\n".join(bad)


def test_nothing_edits_sys_path():
    hits = [
        f"{f.relative_to(ROOT)}"
        for folder in TOP
        for f in _files(folder)
        if f.name != "test_layout.py"
        and any(f"sys.path.{verb}" in f.read_text() for verb in ("insert", "append"))
    ]
    assert not hits, hits


def test_the_rules_see_a_violation(tmp_path):
    # the checker itself: a file that imports upward is reported
    f = tmp_path / "x.py"
    f.write_text("import numpy\nfrom tiny_models.gpt import GPT\n")
    assert ("tiny_models.gpt", 2) in _imports(f)

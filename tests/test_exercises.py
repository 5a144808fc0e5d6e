"""notebooks/exercises: every grader passes its solution, refuses its stub with NotImplementedError (so it
really runs the student's file) and fails every find-the-bug copy, whose fix is one line. The grader works
as a script from notebooks/ and as ``python -m notebooks.exercises.grade`` from the root.

The grader is loaded by path (notebooks/ is not a package). Where this process interprets Triton (no CUDA)
it is called in-process; otherwise (a GPU machine: kernels compiled) it runs as a script, which interprets."""

import ast
import difflib
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EX = ROOT / "notebooks" / "exercises"

# slow: the Triton interpreter runs every step; `make test` runs them, `make test-quick` leaves them out
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


def _load_grader():  # exactly as notebooks/exercises/README.md tells a notebook to do it
    spec = importlib.util.spec_from_file_location("grade", EX / "grade.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


G = _load_grader()
IN_PROCESS = os.environ.get("TRITON_INTERPRET") == "1"


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _script(args, cwd):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )


def _outcome(name, *, solution=False):  # -> ("pass" | "fail" | "not implemented", printed lines)
    if not IN_PROCESS:
        p = _script([str(EX / "grade.py"), name, *(["--solution"] if solution else [])], ROOT)
        status = {0: "pass", 1: "fail", 2: "not implemented"}.get(p.returncode, p.stderr[-3000:])
        return status, p.stdout.splitlines()
    lines = []
    try:
        G.grade(name, solution=solution, out=lines.append)
        return "pass", lines
    except NotImplementedError:
        return "not implemented", lines
    except G.GradeFailure:
        return "fail", lines


@pytest.mark.parametrize("name", [*G.EXERCISES, *G.BUGS])
def test_the_solution_passes(name):
    status, lines = _outcome(name, solution=True)
    assert status == "pass", "\n".join(lines)
    assert lines and all(ln.startswith(("PASS", "==")) for ln in lines)


@pytest.mark.parametrize("name", list(G.EXERCISES))
def test_the_stub_is_run_and_not_implemented(name):
    status, lines = _outcome(name)
    assert status == "not implemented", (status, lines)


@pytest.mark.parametrize("name", list(G.BUGS))
def test_the_buggy_copy_fails_and_says_where(name):
    status, lines = _outcome(name)
    assert status == "fail", lines
    # a planted bug breaks some checks, not all: the passing ones are half of the clue
    assert any(ln.startswith("FAIL") for ln in lines) and any(ln.startswith("PASS") for ln in lines)
    assert any("rel_rms=" in ln for ln in lines)  # what differs, and by how much


@pytest.mark.parametrize("name", list(G.BUGS))
def test_each_bug_is_one_line_and_its_fix_is_marked(name):
    bug = G.path_of(name).read_text().splitlines()
    fixed = G.path_of(name, solution=True).read_text().splitlines()
    diff = [ln for ln in difflib.unified_diff(bug, fixed, lineterm="", n=0) if ln[:1] in "+-"]
    diff = [ln for ln in diff if not ln.startswith(("+++", "---"))]
    assert len(diff) == 2, diff  # one line out, one line in
    assert "# FIX" in diff[1] and "FIX" not in diff[0]


def _signatures(path):  # top-level functions -> (argument names, defaults as source)
    tree = ast.parse(path.read_text())
    return {
        n.name: (
            [a.arg for a in n.args.args + n.args.kwonlyargs],
            [ast.unparse(d) for d in n.args.defaults + [d for d in n.args.kw_defaults if d is not None]],
        )
        for n in tree.body
        if isinstance(n, ast.FunctionDef)
    }


@pytest.mark.parametrize("name", list(G.EXERCISES))
def test_stub_and_solution_share_their_interface(name):
    stub, sol = G.path_of(name), G.path_of(name, solution=True)
    assert _signatures(stub) == _signatures(sol)
    text = stub.read_text()
    assert "# YOUR CODE" in text and "raise NotImplementedError" in text
    assert ast.get_docstring(ast.parse(text)) == ast.get_docstring(ast.parse(sol.read_text()))


def test_the_grader_runs_as_a_script_from_notebooks():
    p = _script(["exercises/grade.py", "scrg_error_position"], ROOT / "notebooks")
    assert p.returncode == 2 and "not implemented yet" in p.stdout, p.stdout + p.stderr[-3000:]
    p = _script(["exercises/grade.py", "--list"], ROOT / "notebooks")
    assert p.returncode == 0 and all(name in p.stdout for name in [*G.EXERCISES, *G.BUGS])


def test_the_grader_runs_as_a_module_from_the_root():
    p = _script(["-m", "notebooks.exercises.grade", "match_select", "--solution"], ROOT)
    assert p.returncode == 0 and "match_select: all checks pass" in p.stdout, p.stdout + p.stderr[-3000:]


def test_an_unknown_name_is_refused():
    with pytest.raises(KeyError, match="forward_kl"):
        G.grade("no_such_exercise", out=lambda *_: None)


def test_no_path_edits_and_a_readme_entry_for_each():
    files = [*EX.rglob("*.py"), pathlib.Path(__file__)]
    needle = "sys." + "path"  # spelled apart so this file does not match itself
    assert not [f for f in files if needle in f.read_text()]
    readme = (EX / "README.md").read_text()
    for name, (file, *_) in {**G.EXERCISES, **G.BUGS}.items():
        assert f"`{name}`" in readme and file in readme, name

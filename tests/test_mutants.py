"""`make mutants` (scripts/mutants.py): every curated mutant still applies (its anchor occurs exactly once,
so a moved line is noticed here, not an hour later), and the runner tells killed from survived from stale."""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
mutants = importlib.util.module_from_spec(_spec)
sys.modules["mutants"] = mutants  # dataclasses look their module up
_spec.loader.exec_module(mutants)


def test_the_list_is_curated_and_large_enough():
    ids = [m.id for m in mutants.MUTANTS]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    assert all(m.find != m.replace and m.tests and m.what for m in mutants.MUTANTS)
    # spread: the tolerance helper, kernels, oracles, the model, sampling and the trainer all carry mutants
    files = {m.file for m in mutants.MUTANTS}
    for f in (
        "fast/testing.py",
        "fast/divergences.py",
        "fast/dac_kl.py",
        "fast/span.py",
        "fast/attention.py",
        "reference/divergences.py",
        "tiny_models/gpt.py",
        "fast/training/schedule.py",
    ):
        assert f in files, f


@pytest.mark.parametrize("m", mutants.MUTANTS, ids=[m.id for m in mutants.MUTANTS])
def test_anchor_occurs_exactly_once(m):
    assert mutants.anchor_count(m) == 1, f"{m.id}: update its anchor in scripts/mutants.py ({m.file} moved)"
    for arg in m.tests:
        if arg.startswith("tests/"):
            assert (ROOT / arg.split("::")[0]).exists(), arg


def test_runner_reports_killed_survived_and_stale(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "lib.py").write_text("def double(x):\n    return 2 * x\n\n\nNOTE = 'untested'\n")
    (tmp_path / "tests" / "test_lib.py").write_text(
        "from lib import double\n\n\ndef test_double():\n    assert double(3) == 6\n"
    )
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\nmarkers = ['notebook: x']\n")
    M = mutants.M
    killed = M("k", "lib.py", "return 2 * x", "return 3 * x", "tests/test_lib.py", "wrong factor")
    survived = M("s", "lib.py", "NOTE = 'untested'", "NOTE = 'changed'", "tests/test_lib.py", "dead code")
    stale = M("x", "lib.py", "return 4 * x", "return 5 * x", "tests/test_lib.py", "moved")
    assert mutants.run_one(killed, tmp_path, full=False)["result"] == "killed"
    assert mutants.run_one(survived, tmp_path, full=False)["result"] == "survived"
    assert mutants.run_one(stale, tmp_path, full=False)["result"] == "stale"
    assert "return 2 * x" in (tmp_path / "lib.py").read_text()  # every mutant is reverted

"""fast/training/cli.py: one command-line flag per field of a dataclass config, typed as the field."""

import argparse
import dataclasses

import pytest

from fast.training.cli import add_config_flags


@dataclasses.dataclass(frozen=True)
class Cfg:
    steps: int = 10
    lr: float = 1e-3
    name: str = "x"
    resume: bool = False
    stop_after: int | None = None
    dac_lr: float | None = None


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_flags(p, Cfg)
    return Cfg(**vars(p.parse_args(argv)))


def test_defaults_and_types():
    assert _parse([]) == Cfg()
    c = _parse(
        [
            "--steps",
            "7",
            "--lr",
            "2e-4",
            "--name",
            "y",
            "--resume",
            "True",
            "--stop_after",
            "3",
            "--dac_lr",
            "0.5",
        ]
    )
    assert c == Cfg(steps=7, lr=2e-4, name="y", resume=True, stop_after=3, dac_lr=0.5)
    assert _parse(["--stop_after", "none", "--resume", "no"]) == Cfg()


def test_a_bad_value_is_an_argparse_error():
    with pytest.raises(SystemExit):
        _parse(["--steps", "seven"])

"""Command-line flags from a dataclass config: one ``--field value`` flag per field."""

from __future__ import annotations

import argparse
import dataclasses


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """``--name value`` for every field of ``cls`` with its default: ints and floats parsed, ``none`` unsets
    an optional field, 1/true/yes (any case) is True for a bool."""
    for f in dataclasses.fields(cls):
        # the annotation as written ("int", "float | None"), whether or not annotations are postponed
        typ = (
            f.type
            if isinstance(f.type, str)
            else f.type.__name__
            if isinstance(f.type, type)
            else str(f.type)
        )
        if typ == "bool":
            parser.add_argument(
                f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default
            )
        elif "None" in typ:
            base = int if "int" in typ else (float if "float" in typ else str)
            parser.add_argument(
                f"--{f.name}", type=lambda s, b=base: None if s.lower() == "none" else b(s), default=f.default
            )
        else:
            parser.add_argument(
                f"--{f.name}", type={"int": int, "float": float}.get(typ, str), default=f.default
            )

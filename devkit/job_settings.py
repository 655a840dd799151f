"""--set NAME=VALUE: the job settings a bench script passes to the runs it starts."""
from __future__ import annotations

import argparse


def parsed(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """items ("NAME=VALUE") as a dict; a malformed one exits 2 through parser, naming it."""
    malformed = [item for item in items if "=" not in item]
    if malformed:
        parser.error(f"--set {malformed[0]!r}: expected NAME=VALUE")
    return dict(item.split("=", 1) for item in items)

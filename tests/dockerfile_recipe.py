"""Reads the Dockerfile into stages and instructions, for the tests that check and replay it.

Only what this Dockerfile uses: ARG defaults, FROM ... AS, ENV (key=value pairs), WORKDIR, COPY,
RUN, USER, ENTRYPOINT (exec form). Continuation lines are joined; comments dropped.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stages(path: Path = ROOT / "Dockerfile") -> dict[str, list[tuple[str, str]]]:
    """Stage name -> [(INSTRUCTION, arguments)]; the FROM entry names the image or parent stage
    with ARG defaults substituted."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "ARG" and current is None:
            name, _, default = rest.partition("=")
            args[name] = default
        elif instruction == "FROM":
            match = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", rest, re.I)
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], match.group(1))
            current = match.group(2) or image
            result[current] = [("FROM", image)]
        elif current is not None:
            result[current].append((instruction, rest))
    return result


def chain(name: str, all_stages: dict | None = None) -> list[tuple[str, str]]:
    """A stage's instructions with those of the stages it builds FROM, oldest first."""
    all_stages = all_stages or stages()
    instructions = all_stages[name]
    parent = instructions[0][1]
    if parent in all_stages:
        return chain(parent, all_stages) + instructions[1:]
    return instructions


def base_image(name: str) -> str:
    """The external image a stage finally builds on."""
    return chain(name)[0][1]


def env(instructions) -> dict[str, str]:
    result: dict[str, str] = {}
    for instruction, rest in instructions:
        if instruction == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                result[key] = value
    return result


def last(instructions, name: str) -> str | None:
    values = [rest for instruction, rest in instructions if instruction == name]
    return values[-1] if values else None


def entrypoint(instructions) -> list[str]:
    return json.loads(last(instructions, "ENTRYPOINT"))


def copies(instructions) -> list[tuple[list[str], str]]:
    """[(sources, destination)] of every COPY, flags such as --chown dropped."""
    result = []
    for instruction, rest in instructions:
        if instruction == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            result.append((words[:-1], words[-1]))
    return result

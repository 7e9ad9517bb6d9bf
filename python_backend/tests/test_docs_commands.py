"""Every ``anymc3d`` command the README and docs/ show exists: its subcommand and each ``--flag`` are known to the
CLI's own parser, and each full command line in a fenced code block parses (placeholders and ``...`` aside).

A documented command that no longer exists fails here, not in a user's shell.
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from anymc3d import cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MENTION = re.compile(r"anymc3d ([a-z][a-z-]*)((?: [^`|\n]*)?)")


def _subparsers(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    parser = parser or cli._parser()
    action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return {} if action is None else dict(action.choices)


def _command_parser(parser: argparse.ArgumentParser, rest: str) -> argparse.ArgumentParser:
    """Descend into nested subcommands (``anymc3d backbone get ...``) named at the start of ``rest``."""
    for word in rest.split():
        nested = _subparsers(parser)
        if word not in nested:
            break
        parser = nested[word]
    return parser


def _fenced_lines(text: str) -> list[str]:
    """Command lines inside ``` blocks, continuation lines joined, comments dropped."""
    lines, inside, pending = [], False, ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        line = pending + raw.split(" #")[0].rstrip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line.strip())
    return lines


def _argv(line: str) -> list[str] | None:
    """The arguments after ``anymc3d`` / ``-m anymc3d`` in a shell line, or None when it runs no anymc3d command."""
    match = re.search(r"(?:^|\s)(?:\S*/)?(?:anymc3d|-m anymc3d)\s+(.*)$", line)
    if not match or line.startswith(("pip ", "python -m pip")):
        return None
    words = [w for w in shlex.split(match.group(1)) if w != "..."]
    return words or None


def _mentions() -> list[tuple[str, str, str]]:
    found = []
    for path in DOCS:
        for sub, rest in MENTION.findall(path.read_text(encoding="utf-8")):
            found.append((path.name, sub, rest))
    return found


def test_every_mentioned_subcommand_and_flag_exists():
    parsers = _subparsers()
    problems = []
    for doc, sub, rest in _mentions():
        if sub in {"is", "and", "or", "the", "package", "version", "process"}:  # prose: "anymc3d is ..."
            continue
        if sub not in parsers:
            problems.append(f"{doc}: anymc3d {sub}: no such command")
            continue
        known = {o for a in _command_parser(parsers[sub], rest)._actions for o in a.option_strings}
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            if flag not in known:
                problems.append(f"{doc}: anymc3d {sub} {flag}: no such option")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_fenced_command_lines_parse(doc):
    parser = cli._parser()
    for line in _fenced_lines(doc.read_text(encoding="utf-8")):
        argv = _argv(line)
        if argv is None or "[" in line or "|" in line or "..." in line:  # synopses and elisions: see the mention test
            continue
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{doc.name}: `{line}` does not parse (exit {exc.code})")

"""``jaxweights --help`` and each command's ``--help``: plain text a new user can read, with examples."""

from __future__ import annotations

import argparse
import re

import pytest

import jaxweights.cli
from jaxweights.cli import main


def _commands() -> list[str]:
    """The subcommands the parser defines (so a new one is checked without editing this file)."""
    actions = jaxweights.cli._parser()._subparsers._group_actions  # type: ignore[union-attr]
    return [
        name
        for action in actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    ]


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


COMMANDS = _commands()
# Docstring and markup syntax that must not reach the terminal: code and emphasis marks, reST roles,
# markdown links, Google-style sections.
MARKUP = re.compile(
    r"`|\*\*|\*\w[^*\n]*\*|:(class|func|meth|mod|attr):|\]\(|^\s*(Args|Returns|Raises):", re.M
)


def test_commands_found() -> None:
    assert {"inspect", "diff", "convert", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize(
    "argv", [(), *((name,) for name in COMMANDS)], ids=lambda argv: " ".join(argv) or "top"
)
def test_help_has_no_markup(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    text = _help(capsys, *argv)
    assert not MARKUP.search(text), f"markup in `jaxweights {' '.join(argv)} --help`:\n{text}"


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_describes_and_shows_an_example(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    text = _help(capsys, command)
    usage, description = text.split("\n\n")[:2]
    assert usage.startswith(f"usage: jaxweights {command}")
    assert not description.startswith(("positional arguments", "options")), "the command has no description"
    assert "examples:" in text
    assert re.search(rf"^  jaxweights {command}\b", text, re.M), f"no example line in {command} --help"


def test_top_help_lists_every_command_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys)
    for command in COMMANDS:
        assert re.search(rf"^ +{command} +\S", text, re.M), f"{command} is not listed with a summary"
        assert re.search(rf"^  jaxweights {command}\b", text, re.M), f"no example of {command}"
    assert "exit status" in text

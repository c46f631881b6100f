"""The CLI builds only the parser of the command a run names; the whole parser otherwise."""

from __future__ import annotations

import argparse

import pytest

from zerorun import cli


def _choices(parser: argparse.ArgumentParser) -> set[str]:
    return set(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)


def test_the_command_list_is_every_top_level_command():
    assert _choices(cli.build_parser()) == cli.COMMANDS


def test_a_run_builds_only_its_command_and_parses_as_the_whole_parser_does():
    argv = ["-c", "x.yaml", "send", "RunShellScript", "-p", "commands=echo hi", "-t", "tag:role=web", "--no-wait"]
    assert _choices(cli.build_parser(argv)) == {"send"}
    assert cli.build_parser(argv).parse_args(argv) == cli.build_parser().parse_args(argv)
    argv = ["documents", "create", "Doc", "doc.yaml"]
    assert cli.build_parser(argv).parse_args(argv) == cli.build_parser().parse_args(argv)


@pytest.mark.parametrize("argv", [["sned"], [], ["--help"]])
def test_without_a_known_command_the_whole_parser_answers(argv, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser(argv).parse_args(argv)
    out = capsys.readouterr()
    assert ("send" in out.out + out.err) or argv == []  # help lists commands; an unknown one is named

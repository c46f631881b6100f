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


def test_a_public_key_that_starts_with_a_dash_is_an_argument_not_an_unknown_option():
    """One z85 key in 85 starts with '-' (it is in the alphabet): ``keys add agent NAME KEY`` takes
    it as written; options that look like one (40 characters of its alphabet: a long option with
    its value, an abbreviation, a short option with its value attached) are unchanged."""
    key = "-E{--@L1-Z/+#9KI3[[oeyD#m&TK+F0lMkj]Z^G7"
    argv = ["keys", "add", "agent", "pre-1", key, "--tag", "role=db", "--json"]
    args = cli.build_parser(argv).parse_args(argv)
    assert (args.args, args.tag, args.json) == (["agent", "pre-1", key], ["role=db"], True)
    argv = ["keys", "replace", "pre-1", key]
    assert cli.build_parser(argv).parse_args(argv).args == ["pre-1", key]
    argv = ["logs", "c-1", "-i" + "i" * 38]  # -i with its value attached, 40 characters in all
    assert cli.build_parser(argv).parse_args(argv).instance == ["i" * 38]
    twice = "-" + key[:-1]  # one key in 7,225 starts with '--'
    argv = ["keys", "add", "agent", "pre-1", twice, "--json"]
    assert cli.build_parser(argv).parse_args(argv).args == ["agent", "pre-1", twice]
    argv = ["keys", "add", "agent", "pre-1", "--key=" + twice]
    assert cli.build_parser(argv).parse_args(argv).key == twice
    argv = ["keys", "add", "agent", "pre-1", key, "--tag=role=" + "w" * 29]  # an option of 40 characters
    assert cli.build_parser(argv).parse_args(argv).tag == ["role=" + "w" * 29]
    argv = ["keys", "add", "agent", "pre-1", key, "--ta=role=" + "w" * 30]  # abbreviated
    assert cli.build_parser(argv).parse_args(argv).tag == ["role=" + "w" * 30]


def test_building_a_commands_parser_does_not_import_shutil():
    """argparse makes a help formatter for every argument added, and each asked ``shutil`` for the
    terminal's width (shutil imports bz2 and lzma): 4 ms of a short run. The CLI gives the width."""
    import subprocess
    import sys

    code = ("import sys; from zerorun import cli; argv = ['send', 'RunShellScript', '-t', 'tag:a=b'];"
            " cli.build_parser(argv).parse_args(argv); print('shutil' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("columns", ["40", "120", ""])
def test_help_is_as_argparse_makes_it_for_the_terminal(columns, monkeypatch, capsys):
    """The width given is what ``shutil.get_terminal_size`` would give argparse (``COLUMNS`` first,
    less 2): help reads the same as argparse's own."""
    def help_text() -> str:
        monkeypatch.setattr(cli, "_help_width", None)
        with pytest.raises(SystemExit):
            cli.build_parser(["send", "--help"]).parse_args(["send", "--help"])
        return capsys.readouterr().out

    monkeypatch.setenv("COLUMNS", columns)
    ours = help_text()
    with monkeypatch.context() as m:
        m.setattr(cli._Parser, "_get_formatter", argparse.ArgumentParser._get_formatter)
        assert ours == help_text()
    assert "--execution-timeout" in ours
    monkeypatch.setattr(cli, "_help_width", None)  # the next test's terminal is its own


@pytest.mark.parametrize("value", ["nan", "inf", "1e300", "0", "-1", "2592001", "ten"])
def test_a_request_timeout_out_of_range_is_a_usage_error_before_anything_is_sent(value):
    """``--request-timeout nan`` (or inf, or 1e300) was a traceback from ZeroMQ's poll; 0 or less
    said the broker did not answer "within 0s", whether it was there or not."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "zerorun.cli", "--request-timeout", value, "ping"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "ZERORUN_ENDPOINT": "tcp://127.0.0.1:9"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "no answer" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (f"zerorun: error: argument --request-timeout: {value!r} is not a number"
                                            " of seconds from more than 0 to 2592000 (30 days)")


@pytest.mark.parametrize("value", ["0.5", "10", "2592000"])
def test_a_request_timeout_in_range_is_taken(value):
    argv = ["ping", "--request-timeout", value]
    assert cli.build_parser(argv).parse_args(argv).request_timeout == float(value)


@pytest.mark.parametrize("value", ["0", "-1", "ten", "1.5"])
def test_a_commands_limit_below_one_is_refused(value, capsys):
    """--limit 0 or -1 quietly gave one row."""
    argv = ["commands", "--limit", value]
    with pytest.raises(SystemExit) as exc:
        cli.build_parser(argv).parse_args(argv)
    assert exc.value.code == 2
    assert f"argument --limit: {value!r} is not a whole number of commands, 1 or more" in capsys.readouterr().err


@pytest.mark.parametrize("value, taken", [("1", 1), ("1000", 1000), ("1001", 1000), ("99999999999999999999999", 1000)])
def test_a_commands_limit_is_at_most_a_page_of_the_broker(value, taken):
    """The broker's stores cap a page at 1000: --limit 5000 gave 1000 rows and no "(more: ...)"
    hint (it compared with 5000), and a limit past 2**64 was a traceback from the encoder."""
    argv = ["commands", "--limit", value]
    assert cli.build_parser(argv).parse_args(argv).limit == taken


def test_a_commands_status_that_is_no_status_is_named_before_anything_is_sent(capsys):
    """The broker could only answer "malformed request or unsupported protocol version" to
    ``--status Bogus``; a status in another case (``failed``) is the status."""
    argv = ["commands", "--status", "Bogus"]
    with pytest.raises(SystemExit) as exc:
        cli.build_parser(argv).parse_args(argv)
    assert exc.value.code == 2
    assert "argument --status: no status 'Bogus': use one of Pending, InProgress," in capsys.readouterr().err
    for given, taken in (("failed", "Failed"), ("TimedOut", "TimedOut"), ("", "")):
        argv = ["commands", "--status", given]
        assert cli.build_parser(argv).parse_args(argv).status == taken


@pytest.mark.parametrize("argv", [["send", "RunShellScript", "-t", "tag:role=web"], ["wait", "c-1"], ["logs", "c-1"]])
@pytest.mark.parametrize("value", ["-5", "nan", "soon"])
def test_a_wait_timeout_below_zero_is_refused_before_anything_is_sent(argv, value, capsys):
    """``send --wait-timeout -5`` sent the command, then said it was "still outstanding after
    -5s"; ``logs --follow --wait-timeout nan`` followed nothing and exited 1."""
    argv = [*argv, "--wait-timeout", value]
    with pytest.raises(SystemExit) as exc:
        cli.build_parser(argv).parse_args(argv)
    assert exc.value.code == 2
    assert f": {value!r} is not a number of seconds, 0 or more" in capsys.readouterr().err


def test_a_wait_timeout_of_zero_or_more_is_taken():
    for value in ("0", "2.5", "3600"):
        argv = ["send", "RunShellScript", "-t", "tag:role=web", "--wait-timeout", value]
        assert cli.build_parser(argv).parse_args(argv).wait_timeout == float(value)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "1e400d"])
def test_a_time_that_is_no_time_is_a_usage_error(value):
    """``commands --since nan`` (or inf, 1e400) listed nothing and said nothing: no command was
    requested after a time that is not one."""
    with pytest.raises(cli.UsageError, match=f"cannot read time {value!r}"):
        cli._since(value)


@pytest.mark.parametrize("value", ["90s", "2h", "1.5d", "1796600000", "2026-12-07T01:00:00"])
def test_times_are_read(value):
    assert 1_700_000_000 < cli._since(value) < 1_900_000_000


def test_a_parameter_value_nested_too_deep_for_json_is_its_text():
    """``-p 'x=[[[[...'`` thousands deep was a RecursionError traceback from the JSON decoder;
    like any value that does not decode, it is the text as given (the broker checks the type)."""
    deep = "[" * 5000 + "]" * 5000
    assert cli._parameters([f"commands={deep}", "n=[1, 2]", "m=[1"]) == {"commands": deep, "n": [1, 2], "m": "[1"}


@pytest.mark.parametrize(("argv", "expected"), [
    (["session", "web-1"], ("", None, [])),
    (["session", "-T", "web-1"], ("", False, [])),
    (["session", "web-1", "-t", "uname", "-a"], ("", True, ["uname", "-a"])),
    (["session", "web-1", "-t", "--run-as", "bob", "--", "id"], ("bob", True, ["id"])),
    (["session", "-t", "web-1", "-T", "--", "tty"], ("", False, ["tty"])),  # the last one counts, as in ssh
])
def test_a_session_asks_for_a_terminal_with_t_and_for_none_with_capital_t(argv, expected):
    args = cli.build_parser(argv).parse_args(argv)
    assert cli._session_command(args.command, args.run_as, args.pty) == expected


@pytest.mark.parametrize("command", ["send", "wait", "logs"])
def test_every_wait_timeout_says_its_default_and_what_0_means(command, capsys):
    """`wait --help` showed `--wait-timeout WAIT_TIMEOUT` with no word: not that it gives up after
    an hour, nor that 0 returns at once there while it means "never" for logs --follow."""
    with pytest.raises(SystemExit):
        cli.build_parser([command, "--help"]).parse_args([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--wait-timeout S" in help_text
    assert ("0: never" if command == "logs" else "default 3600") in help_text
    assert "0: " in help_text


def test_the_common_options_work_after_policy_too():
    """README: -c, --request-timeout and --json work before or after the command; `zerorun policy
    --json check FILE` was "unrecognized arguments: --json" (every other group took them)."""
    for argv in (["policy", "--json", "check", "p.yaml"], ["policy", "check", "p.yaml", "--json"],
                 ["--json", "policy", "check", "p.yaml"]):
        assert cli.build_parser(argv).parse_args(argv).json is True


@pytest.mark.parametrize("argv, says", [
    (["show", "0" * 32, "-i", "web-1", "--output", "full", "--json"],
     "--output full writes the output itself, byte for byte: not with --json"),
    (["logs", "0" * 32, "--wait-timeout", "5"],
     "--wait-timeout goes with --follow (logs without it prints what there is now)"),
    (["keys", "accept", "web-1", "--key", "x"], "--key goes with keys add and keys replace, not keys accept"),
    (["send", "RunShellScript", "-t", "tag:role=web", "--no-wait", "--follow"],
     "--no-wait returns at once; --follow prints the output until the command ends: one or the other"),
    (["send", "RunShellScript", "-t", "tag:role=web", "--follow", "--json"],
     "--follow prints lines as they come, --json one view at the end: one or the other (JSON lines: send --no-wait,"
     " then zerorun logs ID --follow --json)"),
])
def test_options_that_were_dropped_without_a_word_are_refused_before_anything_is_sent(
        tmp_path, monkeypatch, capsys, argv, says):
    """Each was ignored: `show --output full --json` wrote raw bytes where a script read JSON,
    `logs --wait-timeout` without --follow and `keys accept --key` did nothing, and `send --no-wait
    --follow` printed the id and returned, and `send --follow --json` printed no line until the end."""
    from zerorun import keys

    keys.create_keypair(tmp_path, "me")
    for name in ("ZERORUN_CONFIG", "ZERORUN_CLIENT_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ZERORUN_ENDPOINT", "tcp://127.0.0.1:9")  # nothing there: nothing may be asked
    monkeypatch.setenv("ZERORUN_BROKER_KEY", str(tmp_path / "me.key"))
    monkeypatch.setenv("ZERORUN_CLIENT_KEY_FILE", str(tmp_path / "me.key_secret"))
    assert cli.main(["--request-timeout", "1", *argv]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == f"zerorun: {says}\n"


def test_the_main_help_says_the_exit_codes_and_every_config_file_looked_for(capsys, monkeypatch):
    """The exit codes, a contract for scripts, were in the README alone; and the help's default
    config files left out /etc/zerorun/client.yaml, which is read too."""
    from zerorun import client

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(cli, "_help_width", None)
    with pytest.raises(SystemExit):
        cli.build_parser(["--help"]).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    monkeypatch.setattr(cli, "_help_width", None)
    assert cli.EXIT_CODES_HELP in text
    for code in ("0 success", "1 a command ran", "2 a usage or request error", "3 the broker is unreachable"):
        assert code in text
    assert "default: $ZERORUN_CONFIG, " + ", ".join(client.DEFAULT_CONFIG_PATHS) + ")" in text


@pytest.mark.parametrize("argv", [["-c", "", "ping"], ["ping", "--config", ""], ["-c", " ", "send", "RunShellScript"]])
def test_an_empty_config_path_is_refused_not_taken_for_none(argv, capsys):
    """`zerorun -c "$CONFIG" send ...` with CONFIG unset went to the broker of $ZERORUN_CONFIG or
    ~/.config/zerorun/client.yaml: another fleet, perhaps."""
    with pytest.raises(SystemExit) as exc:
        cli.build_parser(argv).parse_args(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.endswith("error: argument -c/--config: an empty path names no config file\n")


@pytest.mark.parametrize("redirect, code, out, err", [
    ("2>&-", 3, "", None),  # stderr closed: the error is dropped, its exit code kept
    (">&-", 2, None, "zerorun: error: standard output is closed: nothing could be shown (>/dev/null to drop it)\n"),
    ("<&-", 2, "", "zerorun: error: - is empty: a document is a mapping with schemaVersion\n"),  # stdin: nothing
])
def test_a_standard_stream_closed_at_start_keeps_the_exit_codes(tmp_path, redirect, code, out, err):
    """`zerorun ... 2>&-` (a script that wants the exit code only): Python leaves sys.stderr None,
    the CLI's error went to stdout instead and the end was an AttributeError traceback, lost, and
    exit 1, the code for "an invocation failed"; `>&-`, and `<&-` with --document-file -, were
    tracebacks and exit 1 too."""
    import shlex
    import subprocess
    import sys

    from zerorun import keys

    keys.create_keypair(tmp_path, "me")
    env = {"PATH": "/usr/bin:/bin", "ZERORUN_ENDPOINT": "tcp://127.0.0.1:9",  # nothing there
           "ZERORUN_BROKER_KEY": str(tmp_path / "me.key"), "ZERORUN_CLIENT_KEY_FILE": str(tmp_path / "me.key_secret")}
    args = "send --document-file - -t tag:role=db" if redirect == "<&-" else "ping"
    command = f"exec {shlex.quote(sys.executable)} -m zerorun.cli --request-timeout 0.5 {args} {redirect}"
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    if out is not None:
        assert proc.stdout == out
    if err is not None:
        assert proc.stderr == err

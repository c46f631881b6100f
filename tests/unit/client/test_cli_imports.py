"""What the ``zerorun`` command imports at start (issue 25: the CLI's wall time is mostly the
interpreter and its imports)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout.strip()


def test_the_cli_imports_neither_typing_extensions_nor_dataclasses():
    """msgspec imports typing_extensions (and with it ``inspect``) unless it cannot, and
    ``dataclasses`` imports ``inspect`` and ``ast``: together a tenth of the CLI's start."""
    out = _run("import sys, zerorun.cli; "
               "print(sorted({'typing_extensions', 'dataclasses', 'inspect', 'ast'} & set(sys.modules)))")
    assert out == "[]"


def test_typing_extensions_is_still_importable_after_the_protocol():
    """The protocol keeps typing_extensions away from msgspec's import only: a package that needs
    it later (psycopg, in the broker) still gets it, and the wire still decodes."""
    code = ("import importlib.util, sys\n"
            "from zerorun import protocol\n"
            "assert 'typing_extensions' not in sys.modules\n"
            "if importlib.util.find_spec('typing_extensions'):\n"
            "    import typing_extensions\n"
            "    assert typing_extensions.Literal is not None\n"
            "hello = protocol.Hello(instance_id='i-1', tags={'role': 'web'})\n"
            "assert protocol.agent_message_decoder.decode(protocol.encode(hello)) == hello\n"
            "try:\n"
            "    protocol.agent_message_decoder.decode(protocol.encode({'type': 'hello', 'instance_id': 7}))\n"
            "except protocol.ValidationError as exc:\n"
            "    print(exc)\n")
    assert _run(code) == "Expected `str`, got `int` - at `$.instance_id`"

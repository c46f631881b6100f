"""What the ``zerorun`` command imports at start (issue 25: the CLI's wall time is mostly the
interpreter and its imports)."""

import site
import subprocess
import sys
from pathlib import Path

import yaml
import zmq

ROOT = Path(__file__).resolve().parents[3]
NOT_IMPORTED = {"typing_extensions", "dataclasses", "inspect", "ast", "signal", "pathlib", "yaml", "shutil"}


def _run(code: str, isolated: bool = False) -> str:
    """``code`` in a new interpreter; ``isolated``: without ``site`` (whose .pth files import
    pathlib and more for a checkout's editable install, not for an installed package)."""
    args = [sys.executable, "-c", code]
    if isolated:
        paths = [str(ROOT), *site.getsitepackages()]
        args = [sys.executable, "-S", "-c", f"import sys; sys.path[:0] = {paths!r}\n{code}"]
    return subprocess.run(args, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()


def test_the_cli_imports_none_of_what_a_send_does_not_need(tmp_path):
    """msgspec imports typing_extensions (and with it ``inspect``) unless it cannot; ``dataclasses``
    imports ``inspect`` and ``ast``; argparse's help formatter asks ``shutil`` for the terminal's
    width; ``pathlib`` brings ``urllib.parse`` and ``ipaddress``; PyYAML was a fifth of a short run.
    Reading the client config the broker writes (its key with a '#' in it, as most have) needs none
    of them either."""
    public, secret = zmq.curve_keypair()
    while b"#" not in public or not public[:1].isalpha():
        public, secret = zmq.curve_keypair()
    secret_file = tmp_path / "admin.key_secret"
    secret_file.write_text(f'curve\n    public-key = "{public.decode()}"\n    secret-key = "{secret.decode()}"\n')
    secret_file.chmod(0o600)
    config = tmp_path / "client.yaml"
    config.write_text("# written by zerorun-broker\n" + yaml.safe_dump(
        {"endpoint": "tcp://127.0.0.1:1", "broker_public_key": public.decode(),
         "client_key_file": str(secret_file)}, sort_keys=False))
    code = ("from zerorun import cli\n"
            "argv = ['-c', %r, 'send', 'RunShellScript', '-p', 'commands=echo hi', '-t', 'tag:a=b']\n"
            "args = cli.build_parser(argv).parse_args(argv)\n"
            "config = cli.ClientConfig.from_options(config_file=args.config)\n"
            "assert config.public_key == %r\n"
            "print(sorted(%r & set(sys.modules)))" % (str(config), public, NOT_IMPORTED))
    assert _run(code, isolated=True) == "[]"


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

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from helpers import config_file

from broker.cli import main
from broker.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_serve_with_a_bad_config_exits_1_with_one_sentence(tmp_path, capsys):
    bad = tmp_path / "c.toml"
    bad.write_text("[refresh]\nat = 'often'\n")
    assert main(["serve", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"token-broker: {bad}: [refresh] at: expected a valid number")
    assert err.count("\n") == 1


def test_serve_refuses_a_port_in_use(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cred = {"provider": "oauth2", "client_id": "a", "token_url": "http://127.0.0.1:9/t",
                "secret": "env:HOME"}  # fmt: skip
        cfg = config_file(
            tmp_path / "c.toml", {"a": cred}, server={"listen": [f"127.0.0.1:{port}"]}
        )
        assert main(["serve", "--config", str(cfg)]) == 1
    assert "address already in use" in capsys.readouterr().err


def test_demo_rejects_a_tiny_lifetime(capsys):
    assert main(["demo", "--lifetime", "0.5"]) == 2


def test_the_wheel_installs_and_runs(tmp_path):
    """Packaging: build a wheel, install it into a fresh venv, run the console script."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
    )
    (wheel,) = wheels.glob("token_broker-*.whl")
    env_dir = tmp_path / "venv"
    # The dependencies come from the host's site-packages; the package itself from the wheel.
    # --ignore-installed: when the host already has token-broker installed (CI installs it
    # system-wide), pip would otherwise call the wheel "already satisfied" and skip it.
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-compile",
            "--ignore-installed",
            str(wheel),
        ],
        check=True,
    )

    def run(*argv: object) -> str:
        """What a command of the new environment prints (outside the source tree)."""
        argv_ = [str(a) for a in argv]
        return subprocess.run(
            argv_, capture_output=True, text=True, check=True, cwd=tmp_path
        ).stdout

    where = run(py, "-c", "import broker; print(broker.__file__)")
    assert where.startswith(str(env_dir)), where
    out = run(env_dir / "bin" / "token-broker", "--help")
    for command in ("serve", "demo", "token", "list"):
        assert command in out
    version = run(py, "-m", "broker", "--version")
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version.strip() == f"token-broker {declared}"  # one place: pyproject.toml
    typed = run(py, "-c", "import broker, pathlib; print(pathlib.Path(broker.__file__).parent)")
    typed = typed.strip()
    assert (Path(typed) / "py.typed").exists()  # type checkers may use the annotations


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)subcommand's parser, by its words: "add", "client add", "tls ca"..."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, words: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found[f"{words} {name}".strip()] = child
                    walk(child, f"{words} {name}")

    walk(build_parser(), "")
    return found


def test_every_subcommand_has_a_description_and_an_example():
    commands = _subcommands()
    assert {"serve", "demo", "add", "import", "exec", "client add", "tls ca"} <= set(commands)
    for words, parser in commands.items():
        text = parser.format_help()
        assert parser.description and len(parser.description) > 60, words
        assert "examples:\n  " in text, words
        leaf = not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
        if leaf:  # the examples run this very command
            assert f"token-broker {words}" in text.split("examples:")[1], words
        assert "DESIGN" not in text and "see README" not in text, words


def test_config_help_names_the_search_path():
    text = _subcommands()["list"].format_help().replace("\n", " ")
    text = re.sub(r"\s+", " ", text)
    assert "$TOKEN_BROKER_CONFIG" in text and "/etc/token-broker/config.toml" in text
    assert "~/.config/" in text
    add = re.sub(r"\s+", " ", _subcommands()["add"].format_help())
    assert "when none exists it is created" in add


def test_key_file_only_where_a_daemon_is_asked():
    with_key = {"token", "list", "reload", "health", "exec", "add", "import", "remove", "rotate",
                "client add", "client remove"}  # fmt: skip
    for words, parser in _subcommands().items():
        options = {o for a in parser._actions for o in a.option_strings}
        assert ("--key-file" in options) == (words in with_key), words


def test_exec_without_the_separator_says_where_the_command_goes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["exec", "adobe", "./script.sh", "--verbose"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "put the command after --: token-broker exec adobe -- ./script.sh --verbose" in err
    assert "unrecognized arguments" not in err


def test_demo_takes_durations_and_refuses_a_config(capsys, tmp_path):
    assert main(["demo", "--lifetime", "1s"]) == 2
    assert "--lifetime must be at least 2 seconds" in capsys.readouterr().err
    assert main(["demo", "--lifetime", "soon"]) == 2
    assert "--lifetime: expected a duration" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    assert main(["demo", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "demo takes no --config" in err and f"token-broker serve --config {cfg}" in err


def test_the_daemons_refusals_become_one_sentence_with_what_to_do():
    """broker.cli.running.explain: the one place a client error becomes the CLI's words."""
    from broker.cli.running import KEY_HINT, explain
    from broker.client import BrokerRefused, BrokerUnavailable

    url = "http://127.0.0.1:9"
    answer = f"the token broker at {url} answered"
    required = "a client key is required"
    no_key = BrokerRefused(f"{answer} 401 unauthorized: {required}",
                           status=401, code="unauthorized", detail=required)  # fmt: skip
    assert explain(no_key, url) == f"unauthorized: a client key is required; {KEY_HINT}"
    admin = explain(no_key, url, admin=True)
    assert admin.startswith("unauthorized: a client key is required; ask it with a client key")
    assert 'credentials are "*"' in admin and "kill -HUP" in admin and "systemctl reload" in admin
    not_ready = BrokerUnavailable(f"{answer} 503 not_ready: no servable token for: main",
                                  status=503, code="not_ready",
                                  detail="no servable token for: main")  # fmt: skip
    assert explain(not_ready, url) == "not_ready: no servable token for: main"
    down = BrokerUnavailable(f"cannot reach the token broker at {url} (ConnectError: refused)")
    assert explain(down, url) == str(down)  # no answer: the client's own sentence
    # A refusal the client made itself (no default credential) has no detail of the daemon's.
    made = BrokerRefused(f"the token broker at {url} has no default credential: name it",
                         status=404, code="unknown_credential")  # fmt: skip
    assert explain(made, url) == str(made)

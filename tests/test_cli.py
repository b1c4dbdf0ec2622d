from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from broker.cli import main

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
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[server]\nlisten = ["127.0.0.1:{port}"]\n[credentials.a]\nprovider = "oauth2"\n'
            'client_id = "a"\ntoken_url = "http://127.0.0.1:9/t"\nsecret = "env:HOME"\n'
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

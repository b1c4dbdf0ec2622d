"""README.md and docs/*.md: every command and config block is exercised, every link resolves.

Blocks are found and marked as tests/doctext.py says. Here: the shape of the
README, the links, that every ``test:`` marker is claimed by a test, and the
blocks without a marker, checked by their language (``sh`` and ``python`` run
in a sandbox with a real broker, ``toml`` loads as a config, ``promql`` is
evaluated over a real broker's metrics, ``yaml`` alert rules pass promtool).
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from doctext import (
    FILES,
    ROOT,
    Block,
    block,
    blocks,
    commands,
    sandbox,
    system_config_untouched,
)
from promql import broker_scrape, evaluate, promtool

from broker import config
from broker.cli.parser import build_parser

README = ROOT / "README.md"
ALL = blocks()


@pytest.fixture(autouse=True)
def _no_system_config():  # type: ignore[no-untyped-def]
    with system_config_untouched():
        yield


def ids(b: Block) -> str:
    return b.where


# -- the README's shape ----------------------------------------------------------------------


def test_the_readme_fits_on_a_page_and_has_what_a_newcomer_needs():
    text = README.read_text()
    assert len(text.encode()) <= 12 * 1024, len(text.encode())
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings == ["Install", "Quick start", "Your first Adobe credential", "Get a token",
                        "Where the config lives", "Running the tests", "Documentation"]  # fmt: skip
    quick = block("quick-start")
    assert quick.splitlines() == [
        "pip install . && token-broker demo",
        "pip install '.[test]' && python -m pytest",
    ]
    assert block("running-the-tests") == quick.splitlines()[1] + "\n"
    # .ci/run runs the second one, verbatim, and fails if the README drifts from it.
    assert (
        "TEST_COMMAND=\"pip install '.[test]' && python -m pytest\""
        in (ROOT / ".ci" / "run").read_text()
    )
    running = text.split("## Running the tests", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"About \d+ minutes", running)  # how long it takes, measured
    table = text.split("## Documentation", 1)[1]
    for path in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{path.name})" in table, path.name


def test_no_document_cites_a_design_section_the_repository_lacks():
    for path in FILES:
        assert "DESIGN" not in path.read_text(), path


def test_every_test_a_document_cites_exists():
    """A test named as evidence (`tests/test_x.py::test_y`, or `::test_z` after it) is there:
    a renamed test file or test leaves no stale citation behind."""
    cited = 0
    for path in FILES:
        for match in re.finditer(
            r"`((?:tests/)?(?:integration/)?test_\w+\.py)((?:::\w+)?)", path.read_text()
        ):
            name, test = match.group(1).removeprefix("tests/"), match.group(2).lstrip(":")
            found = [
                f
                for f in (ROOT / "tests" / name, ROOT / "tests" / "integration" / name)
                if f.exists()
            ]
            assert found, f"{path.name} cites {match.group(1)}, which does not exist"
            if test:
                assert any(re.search(rf"def {test}\b", f.read_text()) for f in found), (
                    f"{path.name} cites {match.group(0)}, which does not exist"
                )
            cited += 1
    assert cited > 50


# -- links -------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = _slug(heading)
        n = 0
        while (candidate := slug if n == 0 else f"{slug}-{n}") in found:
            n += 1
        found.add(candidate)
    return found


def _links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_relative_link_and_anchor_resolves():
    checked = 0
    for path in FILES:
        for link in _links(path):
            if re.match(r"^[a-z]+://", link) or link.startswith("mailto:"):
                continue
            target, _, anchor = link.partition("#")
            file = (path.parent / target).resolve() if target else path
            assert file.exists(), f"{path.relative_to(ROOT)}: {link}: no such file"
            if anchor:
                assert file.suffix == ".md", f"{path.relative_to(ROOT)}: {link}"
                assert anchor in _anchors(file), f"{path.relative_to(ROOT)}: {link}: no anchor"
            checked += 1
    assert checked > 50


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A `code` heading: yes\n\n[x](#a-code-heading-yes) [y](#nope)\n")
    assert "a-code-heading-yes" in _anchors(page) and "nope" not in _anchors(page)


# -- every marked block is claimed by a test ---------------------------------------------------


def test_every_marked_block_is_run_by_a_test():
    marked = {b.arg for b in ALL if b.kind == "test"}
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("*.py"))
    claimed = set(re.findall(r"""block\(\s*["']([a-z][\w-]*)["']""", sources))
    assert marked - claimed == set(), "blocks marked test: that no test runs"
    assert claimed - marked == set(), "tests that run a block nobody marked"


def test_every_block_has_a_language():
    for b in ALL:
        assert b.lang in {"sh", "python", "toml", "yaml", "json", "promql", "ini", "text", "hcl"}, (
            f"{b.where}: give the block a language"
        )


def test_every_hcl_block_has_a_test_of_its_own():
    """An HCL block is a Vault policy or a Vault Agent config: nothing here can check one by
    its language alone, so each is marked test: and loaded into a real OpenBao by its test
    (tests/test_vault_docs.py)."""
    hcl = [b for b in ALL if b.lang == "hcl"]
    assert hcl, "docs/vault.md has its policies in HCL"
    for b in hcl:
        assert b.kind == "test", f"{b.where}: mark the HCL block test: and load it in a test"


@pytest.mark.parametrize("b", [b for b in ALL if b.kind == "skip"], ids=ids)
def test_blocks_that_cannot_run_here_say_why(b):
    """A block marked skip: is not run (it needs docker, a cluster, PyPI...): its marker
    must say why, and name what covers it instead, so that nothing is skipped silently."""
    assert len(b.arg) > 20, f"{b.where}: say why it cannot run here"


# -- unmarked blocks, by language --------------------------------------------------------------

UNMARKED = [b for b in ALL if b.kind is None]


def _by(lang: str) -> list[Block]:
    return [b for b in UNMARKED if b.lang == lang]


#: What an unmarked shell block may run in the sandbox. Anything else (a package
#: manager, systemctl, kubectl...) needs a test: or skip: marker, so that a new block
#: in the docs never runs something unexpected on the machine that runs the tests.
SANDBOX_PROGRAMS = frozenset(
    {"token-broker", "curl", "python", "python3", "printf", "echo", "cat", "test", "sh",
     "env", "export", "mkdir", "grep", "sleep", "true"}
)  # fmt: skip


def _programs(line: str) -> list[str]:
    """The programs a command line starts (each part of a pipe, &&, ;, and $(...))."""
    found = []
    for inner in re.findall(r"\$\(([^()]*)\)", line):
        found += _programs(inner)
    lexer = shlex.shlex(re.sub(r"\$\([^()]*\)", "X", line), posix=True, punctuation_chars=True)
    lexer.commenters = "#"
    lexer.wordchars += "~$/.:=-*+@%{}[],"
    first = True
    for token in lexer:
        if token in ("|", "||", "&&", ";", "(", ")", "&"):
            first = True
        elif token in (">", ">>", "<", "2>"):
            first = False
        elif first and not re.match(r"^[A-Za-z_]\w*=", token):  # VAR=value: not a program
            found.append(token)
            first = False
    return found


def test_the_program_filter_sees_every_program():
    assert _programs("a=1 curl -s x | jq . && (umask 077 && b $(c d)) ; e # f; g") == [
        "c",
        "curl",
        "jq",
        "umask",
        "b",
        "e",
    ]
    assert _programs("python -c 'a; b && c' | sh -c \"x | y\"") == ["python", "sh"]


@pytest.mark.parametrize("b", _by("sh"), ids=ids)
def test_shell_blocks_run_in_a_sandbox(b):
    import os
    import shutil

    if "curl " in b.body and shutil.which("curl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have curl (see .ci/run)")
        pytest.skip("curl is not installed (apt-get install curl)")
    for line in commands(b.body):
        unknown = set(_programs(line)) - SANDBOX_PROGRAMS
        assert not unknown, f"{b.where}: {line}: runs {unknown}: mark it test: or skip:"
        if line.startswith("token-broker "):  # the options exist, before anything runs
            argv = shlex.split(line.split(" #", 1)[0].split(" | ")[0].split(" > ")[0])[1:]
            if "--" in argv:
                argv = argv[: argv.index("--")]
            try:
                build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"{b.where}: {line}: the command line does not parse")
    with sandbox() as box:
        done = box.sh(b.body)
    assert done.returncode == 0, f"{b.where}:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("b", _by("python"), ids=ids)
def test_python_blocks_run_in_a_sandbox(b):
    with sandbox() as box:
        done = box.python(b.body)
    assert done.returncode == 0, f"{b.where}:\n{done.stdout}\n{done.stderr}"


#: The [vault] table a fragment gets when it names a vault: secret and no [vault] of its own.
HOST_VAULT = {"address": "https://vault.example.com:8200", "auth": "token",
              "token": "file:/run/vault-agent/token"}  # fmt: skip


def _adapted(data: dict, tmp_path: Path) -> dict:
    """What the host of a fragment would have: the credential `adobe` and a client when a
    fragment names them, a file output's directory and group, Vault's CA file (one of the
    test's: the loader opens it), and a [vault] table when a fragment's secret is in Vault."""
    import grp
    import os

    merged: dict = {"credentials": {"adobe": {"provider": "adobe", "client_id": "c",
                                              "secret": "env:ADOBE_SECRET"}}}  # fmt: skip
    if "credentials" in data:
        for name, table in data["credentials"].items():
            if name == "adobe" and "provider" not in table:
                merged["credentials"]["adobe"] = {**merged["credentials"]["adobe"], **table}
            else:
                merged["credentials"][name] = table
    for key in ("server", "refresh", "clients"):
        if key in data:
            merged[key] = data[key]
    if "ims_listen" in merged.get("server", {}) and "clients" not in merged:
        merged["clients"] = {"ust": {"key_sha256": "a" * 64, "credentials": ["*"]}}
    outputs = []
    for output in data.get("outputs", []):
        output = dict(output)
        output["path"] = str(tmp_path / Path(output["path"]).name)
        if "group" in output:
            output["group"] = grp.getgrgid(os.getgid()).gr_name
        outputs.append(output)
    if outputs:
        merged["outputs"] = outputs
    if "vault" in data:
        merged["vault"] = dict(data["vault"])
        if "ca_file" in merged["vault"]:
            from helpers import make_ca_and_leaf

            merged["vault"]["ca_file"] = str(make_ca_and_leaf(tmp_path, "vault")[0])
    elif any(str(c.get("secret", "")).startswith("vault:") for c in merged["credentials"].values()):
        merged["vault"] = HOST_VAULT
    return merged


@pytest.mark.parametrize("b", _by("toml"), ids=ids)
def test_config_blocks_load(b, tmp_path):
    data = tomllib.loads(b.body)
    settings = config.parse(_adapted(data, tmp_path), source=b.where)
    for name in data.get("credentials", {}):
        assert name in settings.credentials
    if "vault" in data:
        assert settings.vault is not None and settings.vault.address == data["vault"]["address"]


@pytest.mark.parametrize("b", _by("json"), ids=ids)
def test_json_blocks_parse(b):
    for line in b.body.splitlines():
        assert isinstance(json.loads(line), dict), b.where


def test_ini_blocks_parse():
    for b in [b for b in ALL if b.lang == "ini"]:  # systemd drop-ins
        configparser.ConfigParser().read_string(b.body)


@pytest.mark.parametrize("b", _by("yaml"), ids=ids)
def test_alert_rules_pass_promtool(b, tmp_path):
    data = yaml.safe_load(b.body)
    assert "groups" in data, f"{b.where}: a yaml block other than rules needs a test: marker"
    path = tmp_path / "rules.yml"
    path.write_text(b.body)
    done = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rules = sum(len(g["rules"]) for g in data["groups"])
    assert f"SUCCESS: {rules} rules found" in done.stdout


@pytest.fixture(scope="module")
def scrape(tmp_path_factory):  # type: ignore[no-untyped-def]
    promtool()
    yield from broker_scrape(tmp_path_factory.mktemp("docs-metrics"))


@pytest.mark.parametrize("b", _by("promql"), ids=ids)
def test_promql_blocks_return_series_from_a_real_broker(b, scrape, tmp_path):
    exprs = [line for line in b.body.splitlines() if line.strip() and not line.startswith("#")]
    evaluate(scrape, exprs, tmp_path)


def test_text_blocks_are_examples_of_output_only():
    for b in _by("text"):
        assert not b.body.lstrip().startswith(("token-broker", "curl", "sudo")), b.where


# -- blocks with a test of their own here ------------------------------------------------------


def test_config_error_examples_are_what_the_loader_says(tmp_path):
    lines = block("config-errors").splitlines()
    path = tmp_path / "config.toml"
    made = []
    for table in ("scopes = 'openid'", "scope = ['openid']", "client-id = 'x'"):
        path.write_text(f"[credentials.adobe]\nprovider = 'adobe'\nclient_id = 'x'\n{table}\n"
                        .replace("client_id = 'x'\nclient-id", "client-id"))  # fmt: skip
        with pytest.raises(config.ConfigError) as info:
            config.load(path)
        made.append(str(info.value).replace(str(tmp_path) + "/", ""))
    assert made == lines


def test_the_install_block_makes_a_virtualenv_whose_pip_comes_first(tmp_path):
    """The README's install block, as written: a virtualenv, activated (pip install . from
    PyPI is the Quick start's, which tests/test_cli.py does offline with the wheel)."""
    from doctext import user_env

    home = tmp_path / "home"
    home.mkdir()
    script = block("install") + "command -v pip\n"
    done = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True,
                          env=user_env(home), cwd=home, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{home}/.local/share/token-broker/bin/pip"


def test_the_quick_start_demo_and_the_lines_to_try(tmp_path):
    """`token-broker demo` (the Quick start's first command after `pip install .`), and the
    README's lines to try in another terminal. The demo listens on a free port instead
    of 8765 (other tests may hold it): the lines are given that address, as `--listen`
    and $TOKEN_BROKER_URL would."""
    import signal
    import sys

    import httpx
    from doctext import user_env
    from helpers import reserve_port, wait_for

    first = block("quick-start").splitlines()[0]
    assert first.split(" && ")[1] == "token-broker demo"
    home = tmp_path / "home"
    home.mkdir()
    env = user_env(home)
    port = reserve_port()
    env["TOKEN_BROKER_URL"] = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "demo.out", "wb")  # noqa: SIM115 - closed below
    demo = subprocess.Popen(
        [sys.executable, "-m", "broker", "demo", "--listen", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                assert demo.poll() is None, (tmp_path / "demo.out").read_text()
                return False

        wait_for(up, timeout=30, what="the demo")
        lines = block("demo").replace("127.0.0.1:8765", f"127.0.0.1:{port}")
        done = subprocess.run(["bash", "-e", "-c", lines], capture_output=True, text=True,
                              env=env, cwd=home, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert out.startswith("demo-")  # the token (curl adds no newline)
        assert '"name":"demo"' in out and "'state': 'fresh'" in out
        assert "\ntoken until 20" in out and "\nNAME " in out and "\ndemo " in out
        assert not (home / ".config" / "token-broker").exists()  # it wrote no config
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=15) == 0
        log.close()


def test_the_kubernetes_commands_render(tmp_path):
    """`kubectl apply -k` needs a cluster; what it would apply is `kubectl kustomize` of the
    same overlay, which must render (tests/test_kubernetes.py validates every object)."""
    from kube import tool

    kubectl = tool("kubectl")
    for line in commands(block("kubectl")):
        words = shlex.split(line, comments=True)
        assert words[0] == "kubectl" and words[1] in ("apply", "kustomize"), line
        overlay = words[words.index("-k") + 1] if words[1] == "apply" else words[2]
        done = subprocess.run([kubectl, "kustomize", overlay], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)  # fmt: skip
        assert done.returncode == 0 and "kind: " in done.stdout, done.stderr


def test_the_prometheus_scrape_config_presents_a_client_key(tmp_path):
    """docs/access.md's scrape config: valid for promtool, and the key sent as a Bearer token."""
    key, ca = tmp_path / "token-broker.key", tmp_path / "token-broker-ca.crt"
    key.write_text("tbk_example\n")
    ca.write_text("")
    text = block("prometheus-scrape")
    text = text.replace("/etc/prometheus/token-broker.key", str(key))
    text = text.replace("/etc/prometheus/token-broker-ca.crt", str(ca))
    (tmp_path / "prometheus.yml").write_text(text)
    checked = subprocess.run(
        [promtool(), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    job = yaml.safe_load(text)["scrape_configs"][0]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": str(key)}

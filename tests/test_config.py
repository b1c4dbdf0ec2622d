from __future__ import annotations

from pathlib import Path

import pytest

from broker import config
from broker.config import TcpListen, UnixListen
from broker.errors import ConfigError
from broker.schema import parse_duration

DESIGN_EXAMPLE = """
[server]
listen = ["127.0.0.1:8765"]
socket_mode = "0660"
socket_group = "token-broker"
require_header = "X-Token-Broker"
default = "adobe"

[refresh]
at = 0.67
jitter = 0.05
min_remaining = "5m"
retry_initial = "1s"
retry_max = "5m"
timeout = "10s"
force_cooldown = "10s"

[credentials.adobe]
provider = "adobe"
client_id = "0123456789abcdef0123456789abcdef"
org_id = "ABCDEF0123456789ABCDEF01@AdobeOrg"
scopes = ["openid", "AdobeID", "read_organizations"]

[credentials.partner]
provider = "oauth2"
token_url = "https://login.example.com/oauth2/token"
client_id = "broker"
auth_method = "client_secret_basic"
scopes = ["api.read"]
params = { audience = "https://api.example.com" }
secret = "file:/run/secrets/partner"
retry_max = "1m"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message[len(str(path)) + 2 :]


def test_the_design_example_loads(tmp_path):
    s = config.load(write(tmp_path, DESIGN_EXAMPLE))
    assert s.server.listen == (TcpListen("127.0.0.1", 8765),)
    assert s.server.socket_mode == 0o660 and s.server.socket_group == "token-broker"
    assert s.default_name() == "adobe"
    adobe, partner = s.credentials["adobe"], s.credentials["partner"]
    assert adobe.scopes == ("openid", "AdobeID", "read_organizations")
    assert str(adobe.secret) == "keyring" and adobe.ims_url == "https://ims-na1.adobelogin.com"
    assert (adobe.secret.kind, adobe.secret.service, adobe.secret.user) == (
        "keyring",
        "token-broker",
        "adobe",
    )
    assert partner.secret.kind == "file" and str(partner.secret.path) == "/run/secrets/partner"
    assert adobe.policy.min_remaining == 300 and adobe.policy.retry_max == 300
    assert partner.policy.retry_max == 60  # per-credential override
    assert partner.policy.timeout == 10
    assert partner.params == (("audience", "https://api.example.com"),)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90s", 90), ("5m", 300), ("2h", 7200), ("1d", 86400), ("250ms", 0.25), (30, 30), (1.5, 1.5)],
)
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "", "-1s", True, [1], "1y"])
def test_bad_durations(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[refresh]\nat = 'x'\n", "[refresh] at: expected a valid number (got str)"),
        ("[refresh]\nat = 1.5\n", "[refresh] at: expected less than 1"),
        ("[refresh]\ntimeout = '10 parsecs'\n", "[refresh] timeout: expected a duration"),
        ("[refresh]\nspeed = 1\n", "[refresh] speed: unknown key"),
        ("[server]\nlisten = '127.0.0.1:1'\n", "[server] listen: expected a list of"),
        ("[server]\nsocket_mode = '999'\n", "[server] socket_mode: expected permission bits"),
        ("[server]\ndefault = 'x'\n", "[server] default: no credential named 'x'"),
        ("[server]\nlisten = ['0.0.0.0:1']\n", "loopback is required"),
        ("[server]\nlisten = ['192.168.1.2:1']\n", "loopback is required"),
        ("[server]\nlisten = ['example.com:1']\n", "loopback is required"),
        ("[server]\nlisten = ['127.0.0.1']\n", 'expected "HOST:PORT" or "unix:/path"'),
        ("[server]\nlisten = ['unix:rel.sock']\n", "a unix socket needs an absolute path"),
        ("[credentials.a]\nclient_id = 'x'\n", '[credentials.a] provider: expected "adobe"'),
        (
            "[credentials.a]\nprovider = 'adobe'\n",
            "[credentials.a] client_id: required key is missing",
        ),
        (
            "[credentials.a]\nprovider = 'adobe'\nclient_id = 7\n",
            "[credentials.a] client_id: expected a valid string (got int)",
        ),
        (
            "[credentials.a]\nprovider = 'adobe'\nclient_id = 'x'\nscopes = [1]\n",
            "[credentials.a] scopes.0: expected a valid string (got int)",
        ),
        (
            "[credentials.a]\nprovider = 'adobe'\nclient_id = 'x'\ntoken_url = 'u'\n",
            "[credentials.a] token_url: unknown key",
        ),
        (
            "[credentials.a]\nprovider = 'oauth2'\nclient_id = 'x'\n",
            "[credentials.a] token_url: required key is missing",
        ),
        (
            "[credentials.a]\nprovider = 'oauth2'\nclient_id = 'x'\ntoken_url = 'u'\n"
            "auth_method = 'jwt'\n",
            "[credentials.a] auth_method: expected 'client_secret_basic' or",
        ),
        (
            "[credentials.a]\nprovider = 'adobe'\nclient_id = 'x'\nsecret = 'vault:x'\n",
            '[credentials.a] secret: expected "keyring"',
        ),
        (
            "[credentials.a]\nprovider = 'adobe'\nclient_id = 'x'\nsecret = 'keyring:only'\n",
            '[credentials.a] secret: expected "keyring"',
        ),
        (
            '[credentials."a/b"]\nprovider = "adobe"\nclient_id = "x"\n',
            "[credentials.a/b]: credential names may use only",
        ),
        (  # a name goes into log lines, metric labels and paths: "$" let a newline end it
            '[credentials."a\\n"]\nprovider = "adobe"\nclient_id = "x"\n',
            "credential names may use only",
        ),
        (
            "[credentials.a]\nprovider = 'adobe'\nclient_id = 'x'\n"
            "headers = { \"X-A\\n\" = 'v' }\n",
            "[credentials.a] headers: 'X-A\\n': not a valid header name",
        ),
        ("[credentials.a]\nprovider = ['x']\n", '[credentials.a] provider: expected "adobe"'),
        ("[credentials]\na = 1\n", "[credentials.a]: expected a table"),
        ("[servers]\n", "unknown table or key 'servers'"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_errors_name_file_key_and_expectation(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_not_utf8(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"[server]\ndefault = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(path)


def test_missing_file_says_how_to_point_at_one(tmp_path):
    with pytest.raises(ConfigError, match="config file not found.*--config"):
        config.load(tmp_path / "nope.toml")


def test_secret_references_accepted(tmp_path):
    refs = ["keyring", "keyring:svc/user", "systemd:adobe", "file:/run/secrets/x", "env:SECRET"]
    for ref in refs:
        text = f"[credentials.a]\nprovider = 'adobe'\nclient_id = 'x'\nsecret = '{ref}'\n"
        assert str(config.load(write(tmp_path, text)).credentials["a"].secret) == ref


def test_listen_forms():
    assert config.parse_listen("localhost:1") == TcpListen("127.0.0.1", 1)
    assert config.parse_listen("[::1]:8765") == TcpListen("::1", 8765)
    assert config.parse_listen("127.0.0.5:80") == TcpListen("127.0.0.5", 80)
    assert config.parse_listen("unix:/run/tb.sock") == UnixListen("/run/tb.sock")
    assert str(TcpListen("::1", 8765)) == "[::1]:8765"


def test_empty_config_has_defaults():
    s = config.parse({})
    assert s.server.listen == (TcpListen("127.0.0.1", 8765),)
    assert s.server.require_header == "X-Token-Broker"
    assert s.credentials == {} and s.default_name() is None


def test_default_is_the_only_credential():
    s = config.parse({"credentials": {"one": {"provider": "adobe", "client_id": "x"}}})
    assert s.default_name() == "one"


def test_config_path_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKEN_BROKER_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config.config_path() == Path("/etc/token-broker/config.toml")
    user = tmp_path / "xdg" / "token-broker" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text("")
    assert config.config_path() == user
    monkeypatch.setenv("TOKEN_BROKER_CONFIG", "/env/config.toml")
    assert config.config_path() == Path("/env/config.toml")
    assert config.config_path("/explicit.toml") == Path("/explicit.toml")


@pytest.mark.parametrize("text", ["", "# nothing here\n", "[server]\n", "[credentials]\n"])
def test_a_config_without_credentials_is_refused(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert config.load(path).credentials == {}  # a command that only asks a daemon: fine
    with pytest.raises(ConfigError) as info:
        config.load(path, serving=True)
    assert str(info.value).startswith(f"{path}: no credentials are configured")


def test_secret_references_are_parsed_once_into_their_parts(monkeypatch, tmp_path):
    from broker.stores import parse

    ref = parse("keyring:svc/user", "a")
    assert (ref.kind, ref.service, ref.user, ref.describe()) == (
        "keyring", "svc", "user", "keyring item service='svc' username='user'",
    )  # fmt: skip
    assert parse("env:X", "a").variable == "X"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert parse("systemd:adobe", "a").file() == tmp_path / "adobe"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert parse("systemd:adobe", "a").file() is None
    for bad in ("vault:x", "keyring:only", "keyring:/u", "file:relative", "env:", "systemd: ",
                "vault:kv/a\n", "vault:kv/a#f\n", "env:X\n", "systemd:a\n", "keyring:s\n/u",
                "file:/x\n"):  # fmt: skip
        with pytest.raises(ValueError, match="expected"):
            parse(bad, "a")


def test_a_table_may_not_name_itself(tmp_path):
    text = "[credentials.a]\nprovider = 'adobe'\nclient_id = 'x'\nname = 'b'\n"
    assert "[credentials.a] name: unknown key" in error_of(tmp_path, text)


def test_reload_planning_is_a_pure_function_of_two_settings():
    def cfg(**creds):  # type: ignore[no-untyped-def]
        return config.parse(
            {"credentials": {n: {"provider": "adobe", "client_id": c} for n, c in creds.items()}}
        )

    plan = config.changes(cfg(a="1", b="2", c="3"), cfg(b="2", c="changed", d="4"))
    assert plan == config.Changes(added=("d",), removed=("a",), changed=("c",), unchanged=("b",))
    assert plan.as_json()["removed"] == ["a"]
    assert config.changes(cfg(a="1"), cfg(a="1")) == config.Changes(unchanged=("a",))
    # A [refresh] default that changes a credential's merged policy is a change too.
    before = config.parse({"credentials": {"a": {"provider": "adobe", "client_id": "1"}}})
    after = config.parse(
        {"refresh": {"at": 0.5}, "credentials": {"a": {"provider": "adobe", "client_id": "1"}}}
    )
    assert config.changes(before, after).changed == ("a",)


def test_config_not_found_names_every_path_looked_in(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKEN_BROKER_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    if Path("/etc/token-broker/config.toml").exists():
        pytest.skip("this machine has a system config")
    with pytest.raises(ConfigError) as info:
        config.load()
    assert str(info.value) == (
        f"config file not found: looked in {tmp_path}/xdg/token-broker/config.toml and "
        "/etc/token-broker/config.toml; create one with `token-broker add` or "
        "`token-broker import` (or pass --config PATH, or set TOKEN_BROKER_CONFIG)"
    )


def test_commands_that_write_create_the_users_file_unless_root(tmp_path, monkeypatch):
    """With no config anywhere, a normal user's `add` creates their own file, root's /etc.

    Reading keeps the search order: the user's file if it exists, else /etc.
    """
    monkeypatch.delenv("TOKEN_BROKER_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    if config.SYSTEM_CONFIG.exists():
        pytest.skip("this machine has a system config")
    user = tmp_path / "xdg" / "token-broker" / "config.toml"
    assert config.write_path(euid=1000) == user
    assert config.write_path(euid=0) == config.SYSTEM_CONFIG
    assert config.config_path() == config.SYSTEM_CONFIG  # reading: nothing found
    explicit = tmp_path / "c.toml"
    assert config.write_path(explicit, euid=1000) == explicit
    monkeypatch.setenv("TOKEN_BROKER_CONFIG", str(explicit))
    assert config.write_path(euid=0) == explicit
    monkeypatch.delenv("TOKEN_BROKER_CONFIG")
    user.parent.mkdir(parents=True)
    user.write_text("")
    assert config.write_path(euid=0) == user == config.config_path()  # root's own file too
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # not absolute: ignored (XDG spec)
    assert config.user_config_path() == Path.home() / ".config/token-broker/config.toml"


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("client-id = 'x'", "[credentials.a] client-id: unknown key (did you mean 'client_id'? "
         "keys are written with '_')"),
        ("client_id = 'x'\nscope = ['openid']", "[credentials.a] scope: unknown key (did you "
         "mean 'scopes'?)"),
        ("client_id = 'x'\nretry_mx = '1m'", "retry_mx: unknown key (did you mean 'retry_max'?)"),
        ("client_id = 'x'\nzzz = 1", "[credentials.a] zzz: unknown key"),
    ],
)  # fmt: skip
def test_an_unknown_key_says_which_one_was_meant(tmp_path, table, expected):
    message = error_of(tmp_path, f"[credentials.a]\nprovider = 'adobe'\n{table}\n")
    assert message.startswith(expected) or expected in message, message
    assert "required key is missing" not in message
    assert "did you mean 'credentials'?" in error_of(tmp_path, "[credential.a]\nx = 1\n")
    assert "[server] listn: unknown key (did you mean 'listen'?)" in error_of(
        tmp_path, "[server]\nlistn = []\n"
    )


def test_org_id_must_be_an_ims_org(tmp_path):
    for bad in ("ABCDEF0123456789ABCDEF01", "@AdobeOrg", "1234567"):
        message = error_of(
            tmp_path, f"[credentials.a]\nprovider = 'adobe'\nclient_id = 'x'\norg_id = '{bad}'\n"
        )
        assert message.startswith("[credentials.a] org_id: expected the IMS organization id, "
                                  "which ends in @AdobeOrg"), message  # fmt: skip
        assert f"got {bad!r}" in message


def test_https_listeners_are_validated(tmp_path):
    cred = "[credentials.a]\nprovider = 'adobe'\nclient_id = 'x'\n"
    client = "[clients.c]\nkey_sha256 = '" + "a" * 64 + "'\ncredentials = ['*']\n"
    for server, expected in (
        ("ims_listen = ['127.0.0.1:8443']", "[server] ims_listen: needs at least one [clients"),
        ("ims_listen = ['unix:/x.sock']", "HTTPS listens on TCP"),
        ("ims_listen = ['0.0.0.0:8443']", "loopback is required"),
        ("tls_cert = '/a.pem'", "[server] tls_cert: tls_cert and tls_key go together"),
        ("tls_listen = ['127.0.0.1:8765']", "127.0.0.1:8765 is named twice"),
        ("tls_leaf_lifetime = '1s'", "[server] tls_leaf_lifetime"),
    ):
        text = f"[server]\n{server}\n{cred}" + (client if "ims" not in server[:3] else "")
        assert expected in error_of(tmp_path, text), server
    twice = cred + cred.replace("credentials.a", "credentials.b") + client
    text = f"[server]\nims_listen = ['127.0.0.1:8443']\n{twice}"
    assert "credentials 'a' and 'b' share the client_id 'x'" in error_of(tmp_path, text)
    remote = "[server]\nallow_remote = true\ntls_listen = ['10.0.0.1:8443']\n" + cred + client
    assert "a non-loopback HTTPS listener needs tls_cert and tls_key" in error_of(tmp_path, remote)


VAULTED = "[credentials.a]\nprovider = 'adobe'\nclient_id = 'x'\nsecret = 'vault:kv/a'\n"


@pytest.mark.parametrize(
    "table, expected",
    [
        ("address = 'http://vault.example.com:8200'\nauth = 'token'\ntoken = 'env:T'",
         "[vault] address: expected an https:// address (http only on loopback)"),
        ("address = 'https://v/x'\nauth = 'token'\ntoken = 'env:T'",
         "[vault] address: expected https://HOST[:PORT]"),
        ("address = 'http://[::1]vault'\nauth = 'token'\ntoken = 'env:T'",
         "[vault] address: expected https://HOST[:PORT], got 'http://[::1]vault'"),
        ("address = 'http://127.0.0.1:82000'\nauth = 'token'\ntoken = 'env:T'",
         "[vault] address: expected https://HOST[:PORT], got 'http://127.0.0.1:82000'"),
        ("address = 'https://v?q#f'\nauth = 'token'\ntoken = 'env:T'",
         "(no path, query, fragment or spaces)"),
        ("address = \"https://evil\\n.example\"\nauth = 'token'\ntoken = 'env:T'",
         "(no path, query, fragment or spaces)"),
        ("address = 'https://user:hunter2@v'\nauth = 'token'\ntoken = 'env:T'",
         "[vault] address: expected https://HOST[:PORT] with no user or password in it"),
        ("address = 'https://v'\nauth = 'approle'\nrole_id = 'r'",
         '[vault] secret_id: auth = "approle" needs role_id and secret_id'),
        ("address = 'https://v'\nauth = 'token'\ntoken = 'vault:kv/t'",
         "[vault] token: Vault's own login cannot come from Vault"),
        ("address = 'https://v'\nauth = 'token'\ntoken = 'file:relative'",
         '[vault] token: expected "keyring"'),
        ("address = 'https://v'\nauth = 'ldap'\ntoken = 'env:T'", "[vault] auth: expected"),
        ("address = 'https://v'\nauth = 'token'\ntoken = 'env:T'\npoll = '0s'",
         "[vault] poll:"),
        ("address = 'https://v'\nauth = 'token'\ntoken = 'env:T'\npassword = 'p'",
         "[vault] password: unknown key"),
    ],
)  # fmt: skip
def test_a_vault_table_names_the_key_that_is_wrong(tmp_path, table, expected):
    error = error_of(tmp_path, f"[vault]\n{table}\n{VAULTED}")
    assert expected in error and "hunter2" not in error


def test_the_key_a_vault_error_names_does_not_depend_on_the_hash_seed(tmp_path):
    """Two keys the login does not use: the error names the same one in every process
    (it once came from a set, whose order string hashing changes from run to run)."""
    import os
    import subprocess
    import sys

    path = write(tmp_path, f"[vault]\naddress = 'https://v'\nauth = 'token'\ntoken = 'env:T'\n"
                           f"role = 'q'\nrole_id = 'r'\n{VAULTED}")  # fmt: skip
    code = f"from broker import config\ntry: config.load({str(path)!r})\n"
    code += "except Exception as e: print(e)"
    said = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout  # fmt: skip
        for seed in range(8)
    }
    assert len(said) == 1 and '[vault] role_id: not used with auth = "token"' in said.pop()


def test_a_vault_table_loads_and_plain_http_is_for_loopback_only(tmp_path):
    for address in ("http://127.0.0.1:8200", "http://[::1]:8200", "http://localhost:8200",
                    "https://vault.example.com:8200/"):  # fmt: skip
        text = f"[vault]\naddress = '{address}'\nauth = 'token'\ntoken = 'env:T'\n{VAULTED}"
        s = config.load(write(tmp_path, text))
        assert s.vault is not None and s.vault.address == address.rstrip("/")
        assert (s.vault.poll, s.vault.timeout) == (30.0, 10.0)


def test_a_readable_vault_login_file_is_named_like_a_secret_file(tmp_path):
    login = tmp_path / "secret-id"
    login.write_text("id")
    login.chmod(0o644)
    text = (f"[vault]\naddress = 'https://v'\nauth = 'approle'\nrole_id = 'r'\n"
            f"secret_id = 'file:{login}'\n{VAULTED}")  # fmt: skip
    problems = [f.problem for f in config.load(write(tmp_path, text)).file_modes() if f.problem]
    assert problems == [
        f"[vault] secret_id file {login} has mode 0644: group or others can read the secret; "
        f"run `chmod 600 {login}` (Kubernetes: defaultMode: 0400)"
    ]

"""The server install of docs/deploy.md, as written, under a real systemd: Debian in nspawn.

A debootstrapped bookworm (cached in /var/tmp between runs) gets this
checkout's steps of "Running under systemd" run as written, from a copy
of the checkout with the test's config.toml in it: the install block in a
chroot (it needs the network), the configure-and-start block inside the booted
system (the secret on its stdin, as a user would paste it). The unit files are
the shipped ones; a drop-in only shortens WatchdogSec= to see the pings. A
demo issuer runs on the container's own loopback, and a probe unit records
what systemd says, then powers the container off. Slow (minutes on a fresh
machine, seconds afterwards); needs root, debootstrap and systemd-container.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from doctext import block

pytestmark = pytest.mark.xdist_group("nspawn")  # one boot, on one worker

ROOT = Path(__file__).resolve().parents[2]
ROOTFS = Path(os.environ.get("TB_NSPAWN_ROOTFS", "/var/tmp/token-broker-nspawn"))
MIRROR = "http://deb.debian.org/debian"
SECRET = "nspawn-secret-value"

ISSUER = f"""[Unit]
Description=demo issuer for the test
Before=token-broker.service
[Service]
ExecStart=/opt/token-broker/bin/python -c "import asyncio, socket; from broker.demo import \\
DemoIssuer, issuer_server; i = DemoIssuer(lifetime=3600); \\
i.add_client('nspawn', '{SECRET}'); sock = socket.create_server(('127.0.0.1', 9000)); \\
asyncio.run(issuer_server(i).serve(sockets=[sock]))"
[Install]
WantedBy=multi-user.target
"""

CONFIG = """[server]
listen = ["127.0.0.1:8765"]
[credentials.adobe]
provider = "oauth2"
client_id = "nspawn"
token_url = "http://127.0.0.1:9000/oauth2/token"
secret = "systemd:adobe"
[[outputs]]
credential = "adobe"
path = "/run/token-broker/adobe.token"
mode = "0640"
group = "adobe-tools"
"""


#: The drop-in docs/deploy.md shows for an output file with a group, verbatim.
OUTPUT_GROUP_DROPIN = block("nspawn-dropin")

READER = """[Unit]
Description=another account that reads the token file, as a tool would
After=token-broker.service
Before=probe.service
[Service]
Type=oneshot
User=reader
SupplementaryGroups=adobe-tools
StandardOutput=file:/results/reader
StandardError=file:/results/reader.err
ExecStart=/bin/sh -c 'for i in $(seq 100); do cat /run/token-broker/adobe.token && exit 0; \
sleep 0.1; done; exit 1'
[Install]
WantedBy=multi-user.target
"""

SETUP = """[Unit]
Description=the configure-and-start steps of docs/deploy.md, as written
Before=probe.service
[Service]
Type=oneshot
WorkingDirectory=/src
StandardInput=file:/src/secret.txt
ExecStart=/bin/sh -ex /usr/local/sbin/setup
[Install]
WantedBy=multi-user.target
"""

PROBE = """[Unit]
Description=record what systemd says, then power off
After=multi-user.target token-broker.service setup.service reader.service
[Service]
Type=oneshot
ExecStart=/bin/sh /usr/local/sbin/probe
[Install]
WantedBy=multi-user.target
"""

PROBE_SCRIPT = """#!/bin/sh
out=/results
sleep 1
# the first connection to the socket starts the service (socket activation)
python3 - > $out/token 2>&1 <<'EOF'
import urllib.request
req = urllib.request.Request("http://127.0.0.1:8765/token", headers={"X-Token-Broker": "1"})
print(urllib.request.urlopen(req, timeout=20).read().decode())
EOF
sleep 4  # WatchdogSec=2s in the test: a missing ping would have killed it by now
systemctl show token-broker.service -p ActiveState,SubState,Type,StatusText,NRestarts,\
Result,TriggeredBy,WatchdogUSec > $out/service
systemctl show token-broker.socket -p ActiveState > $out/socket
systemctl reload token-broker.service; echo "reload=$?" >> $out/service
# ExecReload= (kill -HUP) returns at once: the daemon's RELOADING=1 ... READY=1 may
# follow the reload job's end. Wait (up to 10 s) for it to be running again.
for i in $(seq 50); do
    [ "$(systemctl show -p SubState --value token-broker.service)" = running ] && break
    sleep 0.2
done
systemctl show token-broker.service -p ActiveState,SubState >> $out/service
stat -c '%a %U %G' /run/token-broker/broker.sock > $out/unix 2>&1
stat -c '%a %G' /run/token-broker/adobe.token > $out/output 2>&1
# Not dumpable: the kernel then gives the process's /proc files to root, not to its own user.
pid=$(systemctl show -p MainPID --value token-broker.service)
echo "user=$(ps -o user= -p $pid) proc_owner=$(stat -c %U /proc/$pid/status)" > $out/dump
grep '^Max core file size' /proc/$pid/limits >> $out/dump
journalctl -u token-broker.service --no-pager -o cat > $out/journal 2>&1
systemctl poweroff
"""


# What the shipped unit's StateDirectory= and RuntimeDirectory= give under DynamicUser=
# (/var/lib/NAME a link into /var/lib/private, 0700 and owned by the dynamic user): the
# daemon trusts its directories only when no other user can change them, so the local CA,
# its publication in /run and the cycling state must work there. The probe runs in the
# shipped unit's own sandbox (the file itself, with its command replaced), with directories
# of its own so that it does not race the real service for them.
TLS_PROBE_SCRIPT = """
import asyncio, json, os
from pathlib import Path
from broker import files, tls
from broker.cycling import CycleState, StateFile
out = {"uid": os.geteuid(), "state": str(files.state_dir())}

async def cycle_state(cycling):
    async with cycling.locked():
        await cycling.save(CycleState(credential_id="4711"))
    return (await cycling.load("4711")).credential_id

try:
    cert = tls.ServerCertificate(None, None, ["127.0.0.1"])
    cert.publish(Path(os.environ["RUNTIME_DIRECTORY"]))
    out["cycling"] = asyncio.run(cycle_state(StateFile(files.state_dir(), "adobe")))
    out["published"] = sorted(os.listdir(os.environ["RUNTIME_DIRECTORY"]))
    out["checks"] = [c.ok for c in tls.doctor(cert.files)]
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def tls_probe_unit() -> str:
    """systemd/token-broker.service with the probe as its command (and its own directories)."""
    lines = ["[Unit]", "Description=the local CA in the shipped unit's sandbox",
             "Before=probe.service"]  # fmt: skip
    shipped = (ROOT / "systemd" / "token-broker.service").read_text()
    service = shipped.split("\n[Service]\n", 1)[1].split("\n[Install]\n", 1)[0]
    for line in service.splitlines():
        name = line.partition("=")[0]
        if name in ("Type", "NotifyAccess", "ExecStart", "ExecReload", "Restart", "RestartSec",
                    "WatchdogSec", "LoadCredentialEncrypted", "LoadCredential"):  # fmt: skip
            continue
        if name in ("StateDirectory", "RuntimeDirectory"):
            line += "-probe"
        lines.append(line)
    lines[3:3] = ["[Service]", "Type=oneshot", "StandardOutput=file:/results/tls",
                  "ExecStart=/opt/token-broker/bin/python /usr/local/sbin/tlsprobe.py"]  # fmt: skip
    return "\n".join([*lines, "[Install]", "WantedBy=multi-user.target", ""])


def _chroot() -> str:
    return shutil.which("chroot") or "/usr/sbin/chroot"


def _run(*cmd: str, **kw: object) -> None:
    subprocess.run(cmd, check=True, timeout=900, **kw)  # type: ignore[call-overload]


def readme_blocks() -> tuple[str, str]:
    """The install block and the configure-and-start block of docs/deploy.md, verbatim."""
    return block("nspawn-install"), block("nspawn-configure")


def _prepare() -> None:
    if not (ROOTFS / "usr/lib/systemd/systemd").exists():
        shutil.rmtree(ROOTFS, ignore_errors=True)
        _run("debootstrap", "--variant=minbase",
             "--include=systemd,systemd-sysv,dbus,procps,python3,ca-certificates",
             "bookworm", str(ROOTFS), MIRROR, stdout=subprocess.DEVNULL)  # fmt: skip
    install, configure = readme_blocks()
    # A copy of this checkout, where a user would run the steps, with their config.toml.
    src = ROOTFS / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(
        ROOT, src, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "__pycache__")
    )
    (src / "config.toml").write_text(CONFIG)
    (src / "secret.txt").write_text(SECRET)
    for stale in ("opt/token-broker", "etc/token-broker", "etc/credstore.encrypted"):
        shutil.rmtree(ROOTFS / stale, ignore_errors=True)
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", ROOTFS / "etc/ssl/certs/host-ca.crt")
    shutil.copy("/etc/resolv.conf", ROOTFS / "etc/resolv.conf")
    # The install block, in a chroot: it downloads (apt, PyPI). The host's CA bundle is
    # given to pip because HTTPS here may go through an intercepting proxy.
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "DEBIAN_FRONTEND":
           "noninteractive", "PIP_CERT": "/etc/ssl/certs/host-ca.crt",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_COMPILE": "1"}  # fmt: skip
    _run(_chroot(), str(ROOTFS), "sh", "-exc", f"cd /src && apt-get update -qq && {install}",
         env=env, stdout=subprocess.DEVNULL)  # fmt: skip
    # A group for the token file and an account in it that reads the file (another unit).
    _run(_chroot(), str(ROOTFS), "sh", "-c", "getent group adobe-tools || groupadd --system "
         "adobe-tools; id reader || useradd --system -G adobe-tools reader", env=env,
         stdout=subprocess.DEVNULL)  # fmt: skip
    # The configure-and-start block runs at boot (setup.service), before the probe.
    (ROOTFS / "usr/local/sbin/setup").write_text(configure)
    units = ROOTFS / "etc/systemd/system"
    dropin = units / "token-broker.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "test.conf").write_text("[Service]\nWatchdogSec=2s\n")  # see it ping, quickly
    # What the docs tell a user with a group for an output file to add (systemctl edit).
    (dropin / "override.conf").write_text(OUTPUT_GROUP_DROPIN)
    (units / "issuer.service").write_text(ISSUER)
    (units / "setup.service").write_text(SETUP)
    (units / "probe.service").write_text(PROBE)
    (units / "reader.service").write_text(READER)
    (units / "tlsprobe.service").write_text(tls_probe_unit())
    (ROOTFS / "usr/local/sbin/tlsprobe.py").write_text(TLS_PROBE_SCRIPT)
    (ROOTFS / "usr/local/sbin/probe").write_text(PROBE_SCRIPT)
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    for stale in wants.glob("token-broker*"):
        stale.unlink()
    for name in ("issuer.service", "setup.service", "reader.service", "probe.service",
                 "tlsprobe.service"):  # fmt: skip
        link = wants / name
        link.unlink(missing_ok=True)
        link.symlink_to(f"/etc/systemd/system/{name}")


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [p for p in ("debootstrap", "systemd-nspawn", "chroot") if not shutil.which(p)]
    if missing or os.geteuid() != 0:
        reason = f"needs root and {', '.join(missing) or 'nothing else'}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + ": CI installs debootstrap and systemd-container")
        pytest.skip(reason)
    _prepare()
    results = tmp_path_factory.mktemp("nspawn")
    log = results / "console.log"
    with open(log, "wb") as out:
        subprocess.run(
            ["systemd-nspawn", "-q", "-D", str(ROOTFS), "-b", "--register=no", "--keep-unit",
             "--private-network", f"--bind={results}:/results"],
            stdout=out, stderr=subprocess.STDOUT, timeout=300,
        )  # fmt: skip
    assert (results / "service").exists(), log.read_text(errors="replace")[-3000:]
    return results


def test_service_runs_as_type_notify_with_watchdog(booted: Path):
    service = (booted / "service").read_text()
    assert "Type=notify" in service
    assert "ActiveState=active\nSubState=running" in service
    assert "StatusText=1 credential(s): 1 fresh" in service
    assert "WatchdogUSec=2s" in service and "NRestarts=0" in service
    assert "reload=0" in service and service.rstrip().endswith("SubState=running")


def test_socket_activation_serves_a_token(booted: Path):
    assert "ActiveState=active" in (booted / "socket").read_text()
    assert "TriggeredBy=token-broker.socket" in (booted / "service").read_text()
    token = (booted / "token").read_text().strip()
    assert token.startswith("demo-"), token
    journal = (booted / "journal").read_text()
    assert "listening on 127.0.0.1:8765" in journal
    assert "listening on unix:/run/token-broker/broker.sock" in journal
    assert (booted / "unix").read_text().split()[0] == "660"


def test_the_service_cannot_dump_core(booted: Path):
    dump = (booted / "dump").read_text()
    user = dump.split("user=")[1].split()[0]
    assert user not in ("", "root"), dump  # DynamicUser
    assert "proc_owner=root" in dump, dump  # PR_SET_DUMPABLE 0
    assert re.search(r"Max core file size\s+0\s+0", dump), dump
    assert "cannot" not in (booted / "journal").read_text()


def test_secret_came_from_the_encrypted_credential_and_stays_out_of_the_journal(booted: Path):
    journal = (booted / "journal").read_text()
    assert "refresh adobe ok" in journal
    assert SECRET not in journal
    assert (booted / "token").read_text().strip() not in journal


def test_another_account_in_the_group_reads_the_token_file(booted: Path):
    assert (booted / "output").read_text().split() == ["640", "adobe-tools"]
    token = (booted / "token").read_text().strip()
    read = (booted / "reader").read_text().strip()
    assert read.startswith("demo-"), (booted / "reader.err").read_text()
    # The reader ran before the probe's request: the file held the token then served.
    assert read == token or read.startswith("demo-")


def test_the_local_ca_and_the_cycling_state_work_in_the_units_own_directories(booted: Path):
    """The daemon refuses a state or runtime directory another user could change; what the
    shipped unit gives (StateDirectory= 0700 of the dynamic user, reached through the link
    /var/lib/NAME, RuntimeDirectory= 0711) is trusted: CA, leaf, bundle, publication in /run,
    cycling state."""
    found = json.loads((booted / "tls").read_text())
    assert "error" not in found, found
    assert found["uid"] != 0 and found["state"] == "/var/lib/token-broker-probe", found
    assert found["published"] == ["ca-bundle.crt", "ca.crt"] and found["cycling"] == "4711"
    assert found["checks"] == [True, True, True, True], found

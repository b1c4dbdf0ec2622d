"""broker.configedit: edits in place, written through the one atomic writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker import files
from broker.configedit import ConfigDocument

CONFIG = """\
# kept: a comment of the user's
[credentials.a]
provider = "oauth2"  # and this one
client_id = "a"
token_url = "http://127.0.0.1:9/t"
secret = "env:HOME"
"""


def test_an_edit_keeps_comments_and_the_files_mode(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG)
    cfg.chmod(0o640)
    doc = ConfigDocument(cfg)
    doc.set_client("ci", "00" * 32, ["a"])
    doc.write()
    text = cfg.read_text()
    assert "# kept: a comment of the user's" in text and "# and this one" in text
    assert "[clients.ci]" in text
    assert cfg.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]  # no temporary file left


def test_a_new_file_is_private_in_a_private_directory(tmp_path: Path) -> None:
    cfg = tmp_path / "new" / "config.toml"
    doc = ConfigDocument(cfg)
    table = {"provider": "oauth2", "client_id": "a", "token_url": "http://127.0.0.1:9/t"}
    doc.add_credential("a", {**table, "secret": "env:HOME"})
    doc.write()
    assert cfg.stat().st_mode & 0o777 == 0o600
    assert cfg.parent.stat().st_mode & 0o777 == 0o700


def test_the_rename_is_made_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory is fsynced after the rename, as every file the broker writes."""
    synced: list[Path] = []
    real = files.fsync_dir
    monkeypatch.setattr(files, "fsync_dir", lambda d: (synced.append(d), real(d)))
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG)
    ConfigDocument(cfg).write()
    assert synced == [tmp_path]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file to another user")
def test_root_keeps_the_owner_and_group_of_a_users_config(tmp_path: Path) -> None:
    """`sudo token-broker client add ... --config ~user/...` must not hand the file to root."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG)
    os.chown(cfg, 65534, 65534)
    doc = ConfigDocument(cfg)
    doc.remove_credential("a")
    doc.set_client("ci", "00" * 32, ["*"])
    doc.write()
    st = cfg.stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)

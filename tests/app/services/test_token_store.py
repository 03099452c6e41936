"""The Hugging Face token: OS keyring when usable, else a 0600 file; never logged."""

from __future__ import annotations

import logging
import os
import stat
import sys

import keyring
import pytest
from keyring.backend import KeyringBackend
from keyring.backends import chainer, fail

from app.services.token_store import SERVICE, USERNAME, TokenStore, mask, usable_keyring

TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWx9z1a"


class MemoryKeyring(KeyringBackend):
    """An in-memory keyring backend, as a desktop keyring would behave."""

    priority = 1

    def __init__(self):
        super().__init__()
        self.secrets: dict[tuple[str, str], str] = {}

    def get_password(self, service, username):
        return self.secrets.get((service, username))

    def set_password(self, service, username, password):
        self.secrets[(service, username)] = password

    def delete_password(self, service, username):
        del self.secrets[(service, username)]


class LockedKeyring(MemoryKeyring):
    """A keyring that exists but refuses to store (e.g. the user dismissed the unlock prompt)."""

    def set_password(self, service, username, password):
        raise keyring.errors.PasswordSetError("locked")


@pytest.fixture(autouse=True)
def restore_keyring(tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTH_DATA_DIR", str(tmp_path / "data"))
    before = keyring.get_keyring()
    yield
    keyring.set_keyring(before)


def test_file_fallback_is_private(tmp_path, caplog):
    keyring.set_keyring(fail.Keyring())
    assert usable_keyring() is None
    store = TokenStore()
    assert store.get() is None and store.masked() is None
    with caplog.at_level(logging.DEBUG):
        assert store.set(f"  {TOKEN}\n") == "file"
    path = tmp_path / "data" / "hf_token"
    assert path.read_text() == TOKEN
    if sys.platform != "win32":
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert store.get() == TOKEN
    assert store.masked() == "hf_…9z1a"
    assert TOKEN not in repr(store) and TOKEN not in caplog.text
    store.clear()
    assert not path.exists() and store.get() is None


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_file_fallback_tightens_an_existing_world_readable_file(tmp_path):
    keyring.set_keyring(fail.Keyring())
    path = tmp_path / "data" / "hf_token"
    path.parent.mkdir(parents=True)
    path.write_text("hf_old")
    os.chmod(path, 0o644)
    TokenStore().set(TOKEN)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and path.read_text() == TOKEN


def test_keyring_is_used_when_usable(tmp_path):
    ring = MemoryKeyring()
    keyring.set_keyring(ring)
    store = TokenStore()
    assert store.set(TOKEN) == "keyring (MemoryKeyring)"
    assert ring.secrets == {(SERVICE, USERNAME): TOKEN}
    assert not (tmp_path / "data" / "hf_token").exists()   # no copy on disk
    assert store.get() == TOKEN
    store.clear()
    assert ring.secrets == {} and store.get() is None


def test_saving_to_keyring_removes_an_older_file_copy(tmp_path):
    keyring.set_keyring(fail.Keyring())
    TokenStore().set("hf_oldtoken0000")
    keyring.set_keyring(MemoryKeyring())
    store = TokenStore()
    assert store.get() == "hf_oldtoken0000"    # still readable after a keyring appears
    store.set(TOKEN)
    assert not (tmp_path / "data" / "hf_token").exists() and store.get() == TOKEN


def test_chainer_counts_only_if_it_chains_a_usable_backend():
    class OnlyFail(chainer.ChainerBackend):
        backends = [fail.Keyring()]

    class WithMemory(chainer.ChainerBackend):
        backends = [fail.Keyring(), MemoryKeyring()]

    keyring.set_keyring(OnlyFail())
    assert usable_keyring() is None
    assert TokenStore().backend() == "file"
    keyring.set_keyring(WithMemory())
    assert isinstance(usable_keyring(), WithMemory)


def test_locked_keyring_falls_back_to_the_file(tmp_path, caplog):
    keyring.set_keyring(LockedKeyring())
    with caplog.at_level(logging.WARNING):
        assert TokenStore().set(TOKEN) == "file"
    assert (tmp_path / "data" / "hf_token").read_text() == TOKEN
    assert "refused" in caplog.text and TOKEN not in caplog.text
    assert TokenStore().get() == TOKEN


@pytest.mark.parametrize("bad", ["", "   ", "hf_abc def"])
def test_bad_tokens_are_refused(bad):
    keyring.set_keyring(fail.Keyring())
    with pytest.raises(ValueError, match="token"):
        TokenStore().set(bad)


def test_mask():
    assert mask(TOKEN) == "hf_…9z1a"
    assert mask("abcdefghijkl") == "…ijkl"
    assert mask("hf_short") == "hf_…"   # too short to show a part safely


def test_an_existing_world_readable_token_file_is_narrowed(tmp_path):
    import os
    import stat

    from app.services.token_store import TokenStore

    store = TokenStore(tmp_path)
    path = store.file_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("old")
    os.chmod(path, 0o644)
    store._write_private_file("hf_newtoken9876")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "hf_newtoken9876"

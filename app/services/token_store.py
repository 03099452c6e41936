"""The user's Hugging Face access token: entered once, kept safe, never shown again.

It goes to the OS keyring (Secret Service, KWallet, macOS Keychain, Windows Credential
Locker) when a usable backend exists. Without one, keyring's ``fail`` backend (or a
``chainer`` with nothing usable inside) is active and the token goes to a file in the
user data folder that only the user can read (mode 0600). The token never appears in a
log message, exception or ``repr``; the UI shows only ``masked()`` (``hf_…1a2b``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from app.services.user_data import data_dir

log = logging.getLogger("hearth.app.token")

SERVICE = "hearth"
USERNAME = "huggingface-token"
TOKEN_FILE = "hf_token"


def usable_keyring():
    """Return the active keyring backend if it can really store secrets, else ``None``.

    ``fail.Keyring`` and ``null.Keyring`` store nothing; a ``ChainerBackend`` is only as
    good as the backends it chains, so it counts when any of them is usable.
    """
    try:
        import keyring
    except ImportError:
        return None
    backend = keyring.get_keyring()
    return backend if _backend_usable(backend) else None


def _backend_usable(backend) -> bool:
    from keyring.backends import chainer, fail, null

    if isinstance(backend, (fail.Keyring, null.Keyring)):
        return False
    if isinstance(backend, chainer.ChainerBackend):
        return any(_backend_usable(b) for b in backend.backends)
    # A backend reporting priority <= 0 declares itself unfit for this system.
    try:
        return float(getattr(backend, "priority", 1)) > 0
    except Exception:  # some backends compute priority by probing the system and may raise
        return False


def mask(token: str) -> str:
    """``hf_…last4``: enough to recognise which token is saved, useless to anyone else."""
    prefix = "hf_" if token.startswith("hf_") else ""
    return f"{prefix}…{token[-4:]}" if len(token) > 8 else f"{prefix}…"


class TokenStore:
    """Save, read and forget the Hugging Face token (keyring first, then a 0600 file).

    ``folder`` defaults to the user data folder (read when needed, so ``HEARTH_DATA_DIR``
    set later is honoured).
    """

    def __init__(self, folder: Path | None = None) -> None:
        self._folder = Path(folder) if folder is not None else None

    def __repr__(self) -> str:  # never the token itself
        return f"TokenStore(backend={self.backend()!r}, saved={self.get() is not None})"

    @property
    def file_path(self) -> Path:
        """The fallback file (used only when no keyring backend is usable)."""
        return (self._folder or data_dir()) / TOKEN_FILE

    def backend(self) -> str:
        """Where a token saved now would go: ``"keyring (<backend>)"`` or ``"file"``."""
        kr = usable_keyring()
        return f"keyring ({type(kr).__name__})" if kr is not None else "file"

    def get(self) -> str | None:
        """The saved token, or ``None`` when none is saved."""
        kr = usable_keyring()
        if kr is not None:
            try:
                token = kr.get_password(SERVICE, USERNAME)
            except Exception as exc:  # a locked or broken keyring: fall back to the file
                log.warning("cannot read the keyring (%s); trying the token file", type(exc).__name__)
            else:
                if token:
                    return token
        try:
            token = self.file_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read %s: %s", self.file_path, exc.strerror)
            return None
        return token or None

    def set(self, token: str) -> str:
        """Save ``token`` and return where it went (see ``backend()``).

        Raises:
            ValueError: the token is empty or has spaces inside (a paste gone wrong).
            OSError: neither the keyring nor the file could store it (message says why).
        """
        token = (token or "").strip()
        if not token:
            raise ValueError("the token is empty: paste an access token from https://huggingface.co/settings/tokens")
        if any(c.isspace() for c in token):
            raise ValueError("the token contains spaces: copy it again from https://huggingface.co/settings/tokens")
        kr = usable_keyring()
        if kr is not None:
            try:
                kr.set_password(SERVICE, USERNAME, token)
            except Exception as exc:
                log.warning("the keyring refused the token (%s); saving it to a private file instead",
                            type(exc).__name__)
            else:
                self._remove_file()  # one place only, so clear() really clears
                return self.backend()
        self._write_private_file(token)
        return "file"

    def clear(self) -> None:
        """Forget the token everywhere it may be stored."""
        kr = usable_keyring()
        if kr is not None:
            try:
                if kr.get_password(SERVICE, USERNAME) is not None:
                    kr.delete_password(SERVICE, USERNAME)
            except Exception as exc:
                log.warning("cannot remove the token from the keyring (%s)", type(exc).__name__)
        self._remove_file()

    def masked(self) -> str | None:
        """The saved token as ``hf_…last4`` for display, or ``None``."""
        token = self.get()
        return mask(token) if token else None

    def _write_private_file(self, token: str) -> None:
        path = self.file_path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Create with 0600 from the start, and narrow an existing file before writing: there
        # is no moment when the token sits in a file others can read.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags, 0o600)
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)  # an existing wider file is narrowed *before* the write
            os.write(fd, token.encode("utf-8"))
        finally:
            os.close(fd)
        os.chmod(path, 0o600)

    def _remove_file(self) -> None:
        try:
            self.file_path.unlink()
        except FileNotFoundError:
            pass

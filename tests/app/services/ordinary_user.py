"""Run a test scenario as an ordinary user, whom file permissions stop (root ignores them).

CI may run the tests as root or as an ordinary user; permission cases must hold for the
ordinary user either way. ``ordinary_user`` gives a folder that user owns and a ``run``
that calls the scenario: directly when this process is an ordinary user, else in a
forked child that drops root for ``nobody`` (no exec: the child has this interpreter and
the code under test already loaded). Skips, saying why, where that is impossible. The
scenario must restore the modes it changes (in ``finally``); the folder is removed after.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_SKIP = 77  # the child's exit status when it can't become the ordinary user


class OrdinaryUser:
    def __init__(self, folder: Path, account: pwd.struct_passwd | None) -> None:
        self.folder = folder
        self._account = account

    def run(self, scenario: Callable[..., None], *args) -> None:
        """``scenario(*args)`` as the ordinary user; its failure fails the test."""
        if self._account is None:
            scenario(*args)
            return
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            status = 1
            try:
                os.close(read_end)
                try:
                    os.setgroups([])
                    os.setgid(self._account.pw_gid)
                    os.setuid(self._account.pw_uid)
                except OSError as exc:
                    os.write(write_end, f"can't become {self._account.pw_name}: {exc}".encode())
                    status = _SKIP
                else:
                    scenario(*args)
                    status = 0
            except BaseException:
                os.write(write_end, traceback.format_exc().encode())
            finally:
                os._exit(status)
        os.close(write_end)
        chunks = []
        with os.fdopen(read_end, "rb") as pipe:
            while chunk := pipe.read(65536):
                chunks.append(chunk)
        _, wait_status = os.waitpid(pid, 0)
        said = b"".join(chunks).decode(errors="replace")
        code = os.waitstatus_to_exitcode(wait_status)
        if code == _SKIP:
            pytest.skip(said)
        if code != 0:
            pytest.fail(f"as {self._account.pw_name} (exit status {code}):\n{said}", pytrace=False)


@pytest.fixture
def ordinary_user(tmp_path) -> Iterator[OrdinaryUser]:
    if os.geteuid() != 0:
        yield OrdinaryUser(tmp_path, None)
        return
    if not hasattr(os, "fork"):
        pytest.skip("running as root, and this system can't fork a child to drop root in")
    try:
        account = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root, and there is no 'nobody' account to run as")
    # tmp_path's parents are root's own (0700): a fresh folder in the system's temp folder.
    folder = Path(tempfile.mkdtemp(prefix="hearth-ordinary-user-"))
    try:
        os.chown(folder, account.pw_uid, account.pw_gid)
        yield OrdinaryUser(folder, account)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

"""A full disk under the embedded file (issue 22, item 5) on a live daphne
server: its database file lives on a small tmpfs of the test's own, which a
filler file then fills up. While the disk is full, a turn cannot be saved
and ``/api/health`` must say so (503, ``database: error``), so that a load
balancer stops sending traffic; once the filler is gone, health is 200 and
turns work again.

Mounting a tmpfs needs root (CAP_SYS_ADMIN): without it the module is skipped.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from tests.e2e import Server, new_id, reply
from tests.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic]  # the embedded file in every run

TMPFS_SIZE = "16m"  # the schema takes ~1 MB; room for some turns, filled at will


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A tmpfs of ``TMPFS_SIZE`` mounted for the module."""
    mount_point = tmp_path_factory.mktemp("small-disk")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_disk):
    """A server whose database file is on the small disk (its logs and CLI files are not)."""
    server = Server(tmp_path_factory.mktemp("disk-full"), f"file:{small_disk / 'sessions.db'}")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def fill(disk: Path) -> Path:
    """Write a file until the disk is full."""
    filler = disk / "filler"
    chunk = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(chunk)
    return filler


def health(server: Server) -> tuple[int, dict]:
    status, _, body = server.request("GET", "/api/health", timeout=10)
    return status, body


def test_a_full_disk_fails_health_until_space_is_back(server, small_disk):
    resource, thread = new_id("user"), new_id("thread")
    assert health(server)[0] == 200
    server.chat("Before the disk fills", resource, thread).assert_ok()

    filler = fill(small_disk)
    try:
        # the last good answer is reused for up to a second
        status, body = wait_for(lambda: (answer := health(server))[0] == 503 and answer, timeout=10,
                                interval=0.2, message="/api/health is 503 with the disk full")
        assert body["status"] == "error" and body["checks"]["database"] == "error", body
        # what health warns of: a turn cannot be saved
        failed = server.chat("While the disk is full", resource, new_id("thread"))
        assert failed.status == 503 or failed.last["type"] == "error", failed.describe()
    finally:
        filler.unlink()

    status, body = wait_for(lambda: (answer := health(server))[0] == 200 and answer, timeout=10,
                            interval=0.2, message="/api/health is 200 once space is back")
    assert body["checks"]["database"] == "ok"
    again = server.chat("Space is back", resource, thread).assert_ok()
    assert again.text == reply("Space is back", "Before the disk fills")

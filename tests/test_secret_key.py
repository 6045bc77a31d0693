"""The generated ``SECRET_KEY`` (issue 14, item 7): workers that share a data
dir and start at the same moment, with no ``OMNI_SECRET_KEY``, all end up
with one key, in a file only the server's user can read."""

import os
import stat
import subprocess
import time

import pytest

from tests.e2e import PROJECT_VARS, ROOT, python_bin

pytestmark = pytest.mark.engine_agnostic

WORKERS = 8

# Each worker imports what the settings need, waits for a common start time,
# then loads the settings (as daphne or manage.py does) and prints the key.
# With a "slow" argument making a key takes 0.3 s (a loaded machine): every
# worker is then sure to look for the file before any has written it.
LOAD = """
import sys, time
import django, dj_database_url, secrets, tempfile
from django.core.exceptions import ImproperlyConfigured
start, slow = float(sys.argv[1]), sys.argv[2] == "slow"
if slow:
    make_key = secrets.token_urlsafe
    secrets.token_urlsafe = lambda n: (time.sleep(0.3), make_key(n))[1]
time.sleep(max(0.0, start - time.time()))
from django.conf import settings
print(settings.SECRET_KEY, flush=True)
"""


def start_together(data_dir, count: int, slow: bool = False) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in PROJECT_VARS}
    env.update(OMNI_DATA_DIR=str(data_dir), DJANGO_SETTINGS_MODULE="omni.settings")
    start = time.time() + 1.5  # every worker is up and waiting by then
    args = [python_bin(), "-c", LOAD, str(start), "slow" if slow else "fast"]
    procs = [subprocess.Popen(args, cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(count)]
    keys = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        keys.append(out.strip())
    return keys


@pytest.mark.parametrize("slow", [True, False], ids=["slow-key", "fast-key"])
def test_workers_starting_at_once_share_one_key_readable_by_no_one_else(tmp_path, slow):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    keys = start_together(data_dir, WORKERS, slow)
    path = data_dir / "secret_key"
    assert len(set(keys)) == 1, keys
    assert keys[0] == path.read_text().strip() and len(keys[0]) >= 50
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in data_dir.iterdir() if "secret" in p.name) == ["secret_key"]  # no temp files
    # and the next start reads it
    assert start_together(data_dir, 1) == keys[:1]


def test_a_key_file_others_may_read_is_reported(tmp_path, settings):
    from sessions_app.checks import omni_secret_key_file

    path = tmp_path / "secret_key"
    path.write_text("k" * 50)
    settings.SECRET_KEY_FILE = path
    path.chmod(0o600)
    assert omni_secret_key_file(None) == []
    path.chmod(0o644)
    [warning] = omni_secret_key_file(None)
    assert warning.id == "omni.W002" and "644" in warning.msg and str(path) in warning.hint
    settings.SECRET_KEY_FILE = None  # OMNI_SECRET_KEY set: no file to check
    assert omni_secret_key_file(None) == []


def test_without_hard_links_the_key_file_is_still_created_exclusively(tmp_path, monkeypatch):
    from omni import settings as omni_settings

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # e.g. some network filesystems

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "secret_key"
    omni_settings._create_secret_key(path)
    key = omni_settings._read_secret_key(path)
    assert key and len(key) >= 50
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    omni_settings._create_secret_key(path)  # a second worker keeps the first one's key
    assert omni_settings._read_secret_key(path) == key
    assert [p.name for p in tmp_path.iterdir()] == ["secret_key"]

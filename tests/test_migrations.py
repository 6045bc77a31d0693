"""Migrations: in step with the models, and ``migrate`` builds everything on
an empty data dir (contract §1)."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

# manage.py runs on a data dir's embedded file (DATABASE_URL dropped): whatever the run's engine.
pytestmark = pytest.mark.engine_agnostic

ROOT = Path(__file__).resolve().parent.parent


def manage(*args, data_dir: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    environ.update(OMNI_DATA_DIR=str(data_dir), DJANGO_SETTINGS_MODULE="omni.settings", **env)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300,
    )


def test_models_and_migrations_agree(tmp_path):
    result = manage("makemigrations", "--check", "--dry-run", data_dir=tmp_path / "data")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No changes detected" in result.stdout


def test_migrate_on_an_empty_data_dir_creates_everything(tmp_path):
    data_dir = tmp_path / "fresh" / "data"  # does not exist yet
    result = manage("migrate", "--noinput", data_dir=data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    db = data_dir / "sessions.db"
    assert db.is_file()

    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        indexes = {
            r[0]: r[1] for r in conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name=?",
                ("sessions_app_sessionmapping",),
            )
        }
        unique = [
            [c[2] for c in conn.execute(f"PRAGMA index_info('{name}')")]
            for _, name, is_unique, *_ in conn.execute(
                "PRAGMA index_list('sessions_app_sessionmapping')"
            )
            if is_unique
        ]
        applied = conn.execute("SELECT count(*) FROM django_migrations").fetchone()[0]
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert {"sessions_app_sessionmapping", "django_migrations", "auth_user", "django_session"} <= tables
    assert applied > 0
    assert "idx_session_resource" in indexes
    assert '"updated_at" DESC' in indexes["idx_session_resource"]
    assert ["thread_id", "resource_id"] in unique
    assert journal == "wal"

    # nothing left to apply, and running it again is harmless
    result = manage("migrate", "--noinput", data_dir=data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No migrations to apply" in result.stdout

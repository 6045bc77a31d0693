"""``/api/health`` fails when the database cannot take a write, not only when
it cannot answer a read (issue 22, item 5), on the test run's engine: the
database made read-only (SQLite's ``query_only``, PostgreSQL's
``default_transaction_read_only``) and a filesystem out of space for the
embedded file. A full data dir on a live server: ``test_disk_full``."""

import asyncio
import errno
import os

import pytest
from django.db import connection as default_connection
from django.db.backends.signals import connection_created
from django.test import AsyncClient

from omni import health
from sessions_app.models import HealthBeat

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    """A probe of this test's own, its write due."""
    monkeypatch.setattr(health, "database_probe", health.ThreadProbe("database", health._database))
    monkeypatch.setattr(health, "_last_write", 0.0)


@pytest.fixture
def read_only():
    """Every new connection (the probe's thread opens its own) refuses writes, as the engine's own
    read-only mode does."""

    def refuse_writes(sender, connection, **kwargs):
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("SET default_transaction_read_only = on")
            else:
                cursor.execute("PRAGMA query_only = 1")

    connection_created.connect(refuse_writes)
    yield
    connection_created.disconnect(refuse_writes)


async def health_answer() -> tuple[int, dict]:
    response = await AsyncClient().get("/api/health")
    return response.status_code, response.json()


async def test_a_healthy_database_takes_the_probe_write_and_keeps_one_row():
    status, body = await health_answer()
    assert status == 200 and body["checks"]["database"] == "ok", body
    rows = [row async for row in HealthBeat.objects.all()]
    assert [row.pk for row in rows] == [1]
    health.database_probe = health.ThreadProbe("database", health._database)  # past the reuse of a result
    status, body = await health_answer()
    assert status == 200, body
    # written again only after WRITE_SECONDS: the same row, the same time
    assert [(row.pk, row.written_at) async for row in HealthBeat.objects.all()] == [(1, rows[0].written_at)]


async def test_a_database_that_answers_reads_but_refuses_writes_is_unhealthy(read_only):
    status, body = await health_answer()
    assert status == 503, body
    assert body["status"] == "error" and body["checks"]["database"] == "error", body


async def test_an_embedded_file_out_of_space_is_unhealthy(monkeypatch):
    if default_connection.vendor != "sqlite":
        pytest.skip("the free-space check is the embedded file's (PostgreSQL's disk is its server's)")
    real = os.statvfs

    def full(path):
        stat = real(path)
        return os.statvfs_result((stat.f_bsize, stat.f_frsize, stat.f_blocks, 3, 3, *stat[5:]))

    monkeypatch.setattr(health.os, "statvfs", full)
    status, body = await health_answer()
    assert status == 503 and body["checks"]["database"] == "error", body
    with pytest.raises(OSError) as raised:
        await asyncio.to_thread(health._database)
    assert raised.value.errno == errno.ENOSPC

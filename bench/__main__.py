"""``python -m bench [NAME ...]``: run the project's benchmarks, print a table.

Django is set up on a throwaway database, migrated first and removed after:

* default: the embedded libSQL file in a fresh ``OMNI_DATA_DIR`` under /tmp;
* ``DATABASE_URL=postgres://...``: a scratch database ``omni_bench_<pid>`` on
  that server (the named database itself is never written);
* ``DATABASE_URL=libsql://|ws://|wss://``: the server's database itself (a
  remote libSQL database cannot be created from here); benchmarks delete
  what they wrote.

Add a benchmark: a module ``bench/<name>.py`` with ``run() -> list[tuple[str,
float, str]]`` and its name in ``BENCHMARKS``.
"""

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time

BENCHMARKS = ["store", "turns", "record", "spare", "pool", "resume", "scale", "attachments", "uploads", "queue"]


def setup_django():
    """Point Django at a throwaway database. Returns a cleanup callable."""
    data_dir = tempfile.mkdtemp(prefix="omni-bench-", dir="/tmp")
    os.environ["OMNI_DATA_DIR"] = data_dir
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "omni.settings")
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    remote = connection.vendor == "sqlite" and getattr(connection, "is_remote", False)
    if remote:
        call_command("migrate", verbosity=0, interactive=False)

        def cleanup():
            connection.close()
            shutil.rmtree(data_dir, ignore_errors=True)

        return cleanup

    if connection.vendor == "postgresql":
        connection.settings_dict.setdefault("TEST", {})["NAME"] = f"omni_bench_{os.getpid()}"
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)

    def cleanup():
        from django.db import connections

        connections.close_all()
        connection.creation.destroy_test_db(old_name, verbosity=0)
        shutil.rmtree(data_dir, ignore_errors=True)

    return cleanup


def describe_database() -> str:
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            version = cursor.fetchone()[0]
        return f"PostgreSQL {version} ({connection.settings_dict['NAME']})"
    if getattr(connection, "is_remote", False):
        return f"libSQL server ({connection.settings_dict['NAME']})"
    import sqlite3

    name = connection.settings_dict["NAME"]
    return f"libSQL embedded file, SQLite {sqlite3.sqlite_version} ({name})"


def print_table(rows) -> None:
    width = max([len(name) for name, _, _ in rows] + [9])
    print(f"{'benchmark':<{width}}  {'value':>12}  unit")
    print(f"{'-' * width}  {'-' * 12}  {'-' * 10}")
    for name, value, unit in rows:
        shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"
        print(f"{name:<{width}}  {shown:>12}  {unit}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cleanup = setup_django()
    try:
        print(f"database: {describe_database()}")
        rows = []
        for name in args.names or BENCHMARKS:
            started = time.perf_counter()
            module = importlib.import_module(f"bench.{name}")
            rows += [(f"{name}: {label}", value, unit) for label, value, unit in module.run()]
            print(f"[{name}] done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        print_table(rows)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

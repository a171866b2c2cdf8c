"""Real PostgreSQL for the ledger tests.

`shared_pg` is the instance `scripts/services.sh` keeps on 127.0.0.1:55432
(`$PARLEY_PG_PORT`); each test gets a database of its own on it (dropped afterwards).
`private_pg` is a server of one test only, on a free port, in a data directory of its
own: the test may stop and start it. Both are Debian's packages, run as the postgres user
with trust authentication on loopback only. Queries go through `psql`.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_PORT = int(os.environ.get("PARLEY_PG_PORT", "55432"))


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(x) for x in Path(p).parent.name.split(".") if x.isdigit()])
    if not found:
        pytest.fail("PostgreSQL is not installed: run `make services` (scripts/services.sh installs and starts it)")
    return Path(found[-1])


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []


def psql(port: int, sql: str, db: str = "postgres") -> list[list[str]]:
    """Runs `sql`; the rows of its last statement, as lists of strings."""
    r = subprocess.run(
        ["psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-tA", "-F", "\t", "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        raise AssertionError(f"psql failed ({r.returncode}): {r.stderr.strip()}\nSQL: {sql}")
    return [line.split("\t") for line in r.stdout.splitlines() if line]


def ready(port: int) -> bool:
    return subprocess.run([str(pg_bin() / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)], timeout=10).returncode == 0


class Database:
    """A database of one test on a server."""

    def __init__(self, port: int, name: str):
        self.port = port
        self.name = name
        self.url = f"postgres://postgres@127.0.0.1:{port}/{name}?sslmode=disable"

    def sql(self, query: str) -> list[list[str]]:
        return psql(self.port, query, self.name)

    def scalar(self, query: str) -> str:
        rows = self.sql(query)
        assert rows, f"no row from {query}"
        return rows[0][0]


def new_database(port: int) -> Database:
    name = f"parley_test_{uuid.uuid4().hex[:12]}"
    psql(port, f"CREATE DATABASE {name}")
    return Database(port, name)


@pytest.fixture
def shared_pg():
    if not ready(SHARED_PORT):
        subprocess.run([str(REPO / "scripts/services.sh")], check=True, timeout=600)
    db = new_database(SHARED_PORT)
    yield db
    try:
        psql(SHARED_PORT, f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)")
    except AssertionError:
        pass


class PrivatePostgres:
    """A PostgreSQL server of this test only, on a free port, that the test may stop."""

    def __init__(self, port: int):
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="parley-pg-private-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        if os.getuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(
            [*_as_postgres(), str(pg_bin() / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-instructions"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.db: Database | None = None

    def start(self) -> None:
        subprocess.run(
            [*_as_postgres(), str(pg_bin() / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start",
             "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off"],
            check=True,
            capture_output=True,
            timeout=90,
        )
        deadline = time.monotonic() + 30
        while not ready(self.port):
            if time.monotonic() > deadline:
                raise AssertionError(f"private PostgreSQL did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        if self.db is None:
            self.db = new_database(self.port)

    def stop(self) -> None:
        subprocess.run(
            [*_as_postgres(), str(pg_bin() / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-m", "fast", "stop"],
            capture_output=True,
            timeout=90,
        )

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_pg():
    from conftest import free_port

    pg = PrivatePostgres(free_port())
    pg.start()
    yield pg
    pg.cleanup()

"""A real, throwaway PostgreSQL for the tests, found or started once per test process.

Where it comes from, in order:

1. ``IMID_REMS_TEST_POSTGRES_URL`` (e.g. ``postgresql://postgres@127.0.0.1:5432/postgres``): an existing
   server; the role needs CREATEDB. Every test gets its own freshly created database with a random
   name (dropped afterwards), so parallel runs against one server do not collide.
2. PostgreSQL server binaries (Debian: ``apt-get install postgresql`` puts ``initdb``/``pg_ctl`` in
   ``/usr/lib/postgresql/<version>/bin``): a private cluster in a temp directory on a free port of
   127.0.0.1, trust authentication, fsync off (a test cluster has nothing to lose), stopped and removed
   when the test process exits. initdb refuses to run as root, so as root it runs as the ``postgres``
   system user via ``runuser -u postgres --``. Starting takes about a second.
3. Otherwise the PostgreSQL tests are skipped with the reason, unless ``IMID_REMS_REQUIRE_POSTGRES=1``
   (CI), which turns that into a failure.

Use it from a fixture::

    @pytest.fixture
    def pg_url() -> Iterator[str]:
        with postgres.fresh_database() as url:  # skips or fails as above
            yield url
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import URL, make_url

ENV_URL = "IMID_REMS_TEST_POSTGRES_URL"
ENV_REQUIRE = "IMID_REMS_REQUIRE_POSTGRES"
SYSTEM_USER = "postgres"


class PostgresUnavailable(Exception):
    """No PostgreSQL server could be found or started; the message says why."""


_WATCHDOG = """
import json, shutil, subprocess, sys
stop_cmd, base_dir = json.loads(sys.argv[1])
sys.stdin.buffer.read()  # returns when the test process closes the pipe or dies, however it dies
subprocess.run(stop_cmd, capture_output=True, timeout=60, check=False)
shutil.rmtree(base_dir, ignore_errors=True)
"""


@dataclass
class PrivateCluster:
    """A cluster started by this module; `stop` shuts it down and deletes its directory.

    A watchdog process (its own session, so Ctrl-C and ``timeout`` do not reach it) holds a pipe from
    the test process and stops the cluster when the pipe closes: at `stop`, and also when the test
    process is killed before its atexit handlers can run, so no postgres is left behind."""

    base_dir: Path
    port: int
    bin_dir: Path
    run_as: tuple[str, ...]
    watchdog: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{SYSTEM_USER}@127.0.0.1:{self.port}/postgres"

    @property
    def stop_command(self) -> list[str]:
        pg_ctl = str(self.bin_dir / "pg_ctl")
        return [*self.run_as, pg_ctl, "-D", str(self.base_dir / "data"), "-m", "immediate", "-w", "stop"]

    def start_watchdog(self) -> None:
        self.watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, json.dumps([self.stop_command, str(self.base_dir)])],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.watchdog is not None and self.watchdog.stdin is not None:
            self.watchdog.stdin.close()
            try:
                self.watchdog.wait(timeout=60)
                return
            except subprocess.TimeoutExpired:
                pass
        subprocess.run(self.stop_command, check=False, capture_output=True, timeout=30)
        shutil.rmtree(self.base_dir, ignore_errors=True)


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` with initdb and pg_ctl, else the PATH's."""
    candidates = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: _version_key(p.parent.name),
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise PostgresUnavailable(f"{what} failed (exit {done.returncode}): {' | '.join(tail)}")


def start_private_cluster(bin_dir: Path) -> PrivateCluster:
    """initdb + pg_ctl start in a new temp directory (as the postgres user when we are root)."""
    run_as: tuple[str, ...] = ()
    base_dir = Path(tempfile.mkdtemp(prefix="imid-rems-pg-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            shutil.rmtree(base_dir, ignore_errors=True)
            raise PostgresUnavailable(
                f"running as root and there is no {SYSTEM_USER!r} system user to run initdb as"
            ) from None
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(base_dir, ignore_errors=True)
            raise PostgresUnavailable("running as root and runuser (util-linux) is not installed")
        os.chown(base_dir, account.pw_uid, account.pw_gid)
        run_as = (runuser, "-u", SYSTEM_USER, "--")
    data = base_dir / "data"
    try:
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", SYSTEM_USER, "-A", "trust", "-E", "UTF8"]
        _run(
            [*run_as, *initdb, "--locale=C", "--no-sync"],
            "initdb",
        )
        last_error: PostgresUnavailable | None = None
        for _attempt in range(3):  # the free port may be taken between probing and binding it
            port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} -k {base_dir} -c fsync=off -c synchronous_commit=off"
                " -c full_page_writes=off"
            )
            cmd = [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base_dir / "server.log")]
            try:
                _run([*cmd, "-w", "-t", "30", "-o", options, "start"], "pg_ctl start")
            except PostgresUnavailable as exc:
                log = base_dir / "server.log"
                detail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
                last_error = PostgresUnavailable(f"{exc} | {' | '.join(detail)}")
                continue
            cluster = PrivateCluster(base_dir=base_dir, port=port, bin_dir=bin_dir, run_as=run_as)
            try:
                cluster.start_watchdog()
            except BaseException:
                cluster.stop()
                raise
            return cluster
        assert last_error is not None
        raise last_error
    except BaseException:
        shutil.rmtree(base_dir, ignore_errors=True)
        raise


_lock = threading.Lock()
_server: str | PostgresUnavailable | None = None


def server_url() -> str:
    """The admin URL (libpq form) of the test server, starting the private cluster on first use.
    Raises `PostgresUnavailable` (remembered: later calls fail fast the same way)."""
    global _server
    with _lock:
        if _server is None:
            _server = _find_or_start()
        if isinstance(_server, PostgresUnavailable):
            raise _server
        return _server


def _find_or_start() -> str | PostgresUnavailable:
    external = os.environ.get(ENV_URL, "").strip()
    if external:
        return _libpq_url(external)
    bin_dir = find_bin_dir()
    if bin_dir is None:
        return PostgresUnavailable(
            f"no PostgreSQL: {ENV_URL} is not set and no initdb/pg_ctl in /usr/lib/postgresql/*/bin or on "
            "PATH (Debian: apt-get install postgresql)"
        )
    try:
        cluster = start_private_cluster(bin_dir)
    except (PostgresUnavailable, OSError, subprocess.SubprocessError) as exc:
        return exc if isinstance(exc, PostgresUnavailable) else PostgresUnavailable(f"cannot start PostgreSQL: {exc}")
    atexit.register(cluster.stop)
    return cluster.url


def _libpq_url(url: str) -> str:
    """psycopg wants ``postgresql://``; accept the SQLAlchemy spelling ``postgresql+psycopg://`` too."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def require_server_url() -> str:
    """`server_url`, or skip the test with the reason (fail instead under IMID_REMS_REQUIRE_POSTGRES=1)."""
    try:
        return server_url()
    except PostgresUnavailable as exc:
        if os.environ.get(ENV_REQUIRE, "").strip() in ("1", "true", "yes"):
            pytest.fail(f"{ENV_REQUIRE}=1 but {exc}", pytrace=False)
        pytest.skip(f"PostgreSQL tests skipped: {exc} (set {ENV_REQUIRE}=1 to make this an error)")


@contextlib.contextmanager
def fresh_database(prefix: str = "imid_rems_test") -> Iterator[str]:
    """Create an empty database with a unique name, yield its SQLAlchemy URL
    (``postgresql+psycopg://...``), and drop it afterwards (disconnecting anyone still connected)."""
    admin = require_server_url()
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        pytest.fail(f"cannot create a test database on {_redacted(admin)}: {exc}", pytrace=False)
    url: URL = make_url(admin).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _redacted(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)

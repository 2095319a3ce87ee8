"""A throwaway PostgreSQL server for tests: initdb into a temp folder, a free port on 127.0.0.1, stopped at the end.

The Debian package (``scripts/install_postgres.sh``) puts the binaries under ``/usr/lib/postgresql/<ver>/bin``.
initdb refuses to run as root, so as root the server runs as the unprivileged ``postgres`` user (``nobody``
where that does not exist) in a folder it owns. Connections are ``trust`` on 127.0.0.1 only: a test server.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "vforge"


def find_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/<ver>/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(os.path.realpath(on_path)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> str | None:
    """None when we are not root (run as ourselves), else an unprivileged account that exists."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists for initdb")


class PostgresServer:
    """One server; ``url(dbname)`` creates a fresh database on it and returns its SQLAlchemy URL."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.user = _server_user()
        # not under pytest's tmp_path: /tmp/pytest-of-root is 0700, which the server's user cannot enter
        self.root = Path(tempfile.mkdtemp(prefix="vforge-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._databases = 0

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        out = subprocess.run([str(self.bin_dir / args[0]), *args[1:]], user=self.user, capture_output=True,
                             text=True, timeout=120, cwd=self.root)
        if out.returncode:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"{args[0]} failed ({out.returncode}): {out.stderr[-2000:]}\n{log[-2000:]}")
        return out

    def start(self) -> PostgresServer:
        stop_orphans(self.bin_dir)
        (self.root / "owner.pid").write_text(str(os.getpid()))  # so a later session can stop it if we die
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync")
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w",
                  "-t", "60", "start")
        return self

    def url(self, dbname: str | None = None) -> str:
        """A new, empty database (``db<N>`` unless named) and its ``postgresql://`` URL."""
        import psycopg

        self._databases += 1
        dbname = dbname or f"db{self._databases}"
        # autocommit: CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        # the driver named: SQLAlchemy < 2.1 would take postgresql:// for psycopg2
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def stop_orphans(bin_dir: Path) -> list[Path]:
    """Stop the servers of test sessions that were killed before their teardown (their owner.pid is gone)."""
    stopped = []
    for owner in Path(tempfile.gettempdir()).glob("vforge-pg-*/owner.pid"):
        try:
            os.kill(int(owner.read_text()), 0)
            continue  # its session is still running
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        data = owner.parent / "data"
        if (data / "postmaster.pid").exists():
            subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           user=_server_user(), capture_output=True, timeout=60)
        shutil.rmtree(owner.parent, ignore_errors=True)
        stopped.append(owner.parent)
    return stopped

"""postgres_instance - a throw-away PostgreSQL server on a unix socket, for tests.

NAME
    postgres_instance - initdb, start, stop, kill and restart a private PostgreSQL

SYNOPSIS
    with PostgresInstance() as server:
        server.create_database("policy")
        url = server.url("policy")      # postgresql:///policy?host=DIR&port=PORT&user=postgres
        server.stop(); server.start()   # an outage, and the return
        server.kill()                   # SIGKILL: the crash case

DESCRIPTION
    Each instance is a cluster of its own (initdb) in a temporary directory,
    listening on a unix socket in that directory and on no TCP port
    (listen_addresses = ''); the port number only names the socket file.
    Authentication is trust: only processes of this machine that can reach
    the directory connect. Durability is traded for speed (fsync,
    synchronous_commit and full_page_writes off): a test cluster is thrown
    away.

    PostgreSQL facts this module depends on (Debian 12, PostgreSQL 15):
    - initdb and postgres refuse to run as root, so a root caller runs them
      as the `postgres` system user (the Debian package makes it), which
      must own the data directory and reach the socket directory.
    - The server binaries live in /usr/lib/postgresql/VERSION/bin, off PATH.
    - The postmaster runs as our child (not through pg_ctl, whose daemon
      would be nobody's child to reap); SIGINT is a fast shutdown: open
      transactions roll back, connections close.
    - SIGKILL of the postmaster leaves its children to notice and exit; a
      start before they have gone fails (shared memory still in use), and
      a later one recovers from the WAL.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from procs import alive, children, wait_ready

SERVER_USER = "postgres"
KEEP_DIRECTORY_ENV = "RELAYMILTER_KEEP_POSTGRES"  # =1 keeps the cluster for debugging


def server_binaries() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin with initdb, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda path: int(Path(path).parent.parent.name))
    return Path(found[-1]).parent if found else None


class PostgresError(RuntimeError):
    """The server would not start or stop; the message holds its log."""


class PostgresInstance:
    """See the module docstring."""

    def __init__(self) -> None:
        binaries = server_binaries()
        if binaries is None:
            raise PostgresError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/"
                                "initdb): run `scripts/install-debian-deps test`")
        self.binaries = binaries
        self.directory = Path(tempfile.mkdtemp(prefix="relaymilter-pg-"))
        self.directory.chmod(0o755)     # the server user creates its socket here
        self.data = self.directory / "data"
        self.log_path = self.directory / "server.log"
        self.port = _socket_number()
        self._process: subprocess.Popen | None = None
        self._user = pwd.getpwnam(SERVER_USER) if os.geteuid() == 0 else None
        if self._user is not None:
            os.chown(self.directory, self._user.pw_uid, self._user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-E", "UTF8",
                  "--locale=C", "-U", SERVER_USER, "--no-sync")

    # ----------------------------------------------------------- addresses ---

    def url(self, database: str = "postgres") -> str:
        """A libpq URL that reaches database over the unix socket."""
        return f"postgresql:///{database}?host={self.directory}&port={self.port}&user={SERVER_USER}"

    @property
    def socket_path(self) -> Path:
        return self.directory / f".s.PGSQL.{self.port}"

    def create_database(self, name: str) -> str:
        """A new, empty database (from template0); its URL."""
        with self._admin() as connection:
            connection.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with self._admin() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(self.url(), autocommit=True, connect_timeout=5)

    # ---------------------------------------------------------- life cycle ---

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server as our child; returns once it accepts connections."""
        settings = {"listen_addresses": "", "unix_socket_directories": str(self.directory),
                    "port": str(self.port), "fsync": "off", "synchronous_commit": "off",
                    "full_page_writes": "off", "shared_buffers": "16MB",
                    "max_connections": "100"}
        options = [argument for name, value in settings.items()
                   for argument in ("-c", f"{name}={value}")]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [str(self.binaries / "postgres"), "-D", str(self.data), *options],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **self._as_user())
        wait_ready(self._process, self._accepting, timeout, self.kill,
                   lambda message: PostgresError(f"postgres {message}"), self.log_tail, 0.05)

    def _accepting(self) -> bool:
        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def stop(self) -> None:
        """A fast shutdown (SIGINT): open transactions roll back, connections close."""
        if not self.running:
            return
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL of the postmaster; returns once its children have gone too (they
        notice the postmaster's death), so that a start() can follow."""
        if not self.running:
            return
        waiting = children(self._process.pid)
        self._process.kill()
        self._process.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(map(alive, waiting)):
            time.sleep(0.05)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        if os.environ.get(KEEP_DIRECTORY_ENV) != "1":
            shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "PostgresInstance":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------- helpers ---

    def _as_user(self) -> dict:
        """subprocess arguments that run a program as the server user (when root)."""
        user = self._user
        if user is None:
            return {"env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}}
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [],
                "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}}

    def _run(self, program: str, *arguments: str) -> None:
        done = subprocess.run([str(self.binaries / program), *arguments], capture_output=True,
                              text=True, timeout=60, cwd=self.directory, **self._as_user())
        if done.returncode != 0:
            raise PostgresError(f"{program} {' '.join(arguments)}: exit {done.returncode}\n"
                                f"{done.stdout}{done.stderr}")


def _socket_number() -> int:
    """A port number free on loopback, though nothing listens there: it names the
    socket file, and a free one keeps a stray TCP listener from confusing anyone."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

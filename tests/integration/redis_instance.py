"""redis_instance - a throw-away redis-server on a unix socket, for tests.

NAME
    redis_instance - start, kill and restart a private Redis

SYNOPSIS
    with RedisInstance() as server:
        url = server.url()          # unix:///tmp/relaymilter-redis-XXXX/redis.sock
        server.kill(); server.start()

DESCRIPTION
    Each instance runs redis-server as our child, in a temporary directory
    of its own, listening on a unix socket there and on no TCP port
    (port 0; a benchmark may ask for one on 127.0.0.1), with no persistence (no RDB snapshots, no AOF): what a test
    counts is gone with the instance or a kill, the "Redis lost" case.
    --unixsocketperm 777: relaymilter may run as another user.

    Redis facts this module depends on (Debian 12, Redis 7.0):
    - `redis-server --port 0 --unixsocket PATH` listens on the socket only;
      it runs as root when started by root (a warning, no refusal).
    - --save "" and --appendonly no: nothing written to disk.
    - It answers PING once the socket accepts connections.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import redis

from procs import wait_ready

REDIS_SERVER = shutil.which("redis-server", path=os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/bin", "/usr/sbin"]))


class RedisError(RuntimeError):
    """redis-server would not start; the message holds its log."""


class RedisInstance:
    """See the module docstring."""

    def __init__(self, tcp_port: int = 0) -> None:
        """tcp_port: also listen on 127.0.0.1 at that port (benchmarks); 0 = none."""
        if REDIS_SERVER is None:
            raise RedisError("redis-server is not installed: run `scripts/install-debian-deps "
                             "test`")
        self.directory = Path(tempfile.mkdtemp(prefix="relaymilter-redis-"))
        self.directory.chmod(0o755)
        self.socket_path = self.directory / "redis.sock"
        self.log_path = self.directory / "redis.log"
        self.tcp_port = tcp_port
        self._process: subprocess.Popen | None = None

    def url(self, database: int = 0) -> str:
        return f"unix://{self.socket_path}?db={database}"

    def tcp_url(self, database: int = 0) -> str:
        return f"redis://127.0.0.1:{self.tcp_port}/{database}"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=5)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.tcp_port), "--bind", "127.0.0.1",
                 "--unixsocket", str(self.socket_path),
                 "--unixsocketperm", "777", "--save", "", "--appendonly", "no",
                 "--dir", str(self.directory), "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_ready(self._process, self._answering, timeout, self.kill,
                   lambda message: RedisError(f"redis-server {message}"),
                   lambda: self.log_path.read_text(errors="replace")[-2000:])

    def _answering(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: every count is lost."""
        if self.running:
            self._process.kill()
            self._process.wait()
        self.socket_path.unlink(missing_ok=True)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "RedisInstance":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

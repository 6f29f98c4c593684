"""sessionwatch - close milter connections that outlive [milter] session_timeout.

NAME
    sessionwatch - a bound on the length of every milter connection

DESCRIPTION
    libmilter's timeout ([milter] timeout) bounds each read, not a session:
    a peer that sends one byte a second is never idle, completes no
    command, and holds one libmilter thread for ever; if it trickles the
    first command it never reaches a callback at all. libmilter offers no
    hook at accept time and no way to close a connection, so this watcher
    looks at the process's own descriptors (/proc/self/fd) every few
    seconds instead. It recognises the milter's accepted connections by
    their local address, which is the listening address (a unix socket's
    path; an inet socket's port), the listening socket itself excluded,
    and shuts down (SHUT_RDWR) through a duplicate of its descriptor any
    connection open longer than the bound. libmilter's read then ends as
    for a peer that hung up: it runs the close callback and closes its own
    descriptor. The watcher never closes libmilter's descriptor itself.

    A socket is known by its inode, not its descriptor number: a number
    closed and reused between two looks is a new connection, and the
    duplicate is checked to be that inode before it is used.

    Postfix and Sendmail open one milter connection per SMTP session. A
    legitimate session that outlives the bound loses the milter for the
    rest of that session: its next MAIL or RCPT gets the MTA's milter
    default action (Postfix milter_default_action = tempfail, Sendmail
    F=T: 4xx, retried later), never an accept that skipped the checks.

    Linux only (/proc); elsewhere the watcher logs that it is off.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from typing import Callable

from relaymilter.endpoint import SocketSpec
from relaymilter.recorder import NO_METRICS, Recorder

log = logging.getLogger(__name__)

FD_DIRECTORY = "/proc/self/fd"
SOCKET_LINK = "socket:["        # readlink of a socket's descriptor: socket:[INODE]


class SessionWatch:
    """Shuts down milter connections open longer than limit seconds.

    Its tables belong to its own thread (sweep() is called from nowhere
    else once start() ran), so they need no lock.
    """

    def __init__(self, listen: SocketSpec, limit: float, metrics: Recorder = NO_METRICS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.listen, self.limit, self._metrics, self._clock = listen, limit, metrics, clock
        self.interval = max(0.5, min(5.0, limit / 10))
        self._opened: dict[int, float] = {}     # inode -> when first seen
        self._ignored: set[int] = set()          # inodes of other sockets, and closed ones
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start watching; False (logged) where /proc/self/fd cannot be read."""
        if not os.path.isdir(FD_DIRECTORY):
            log.warning("[milter] session_timeout is not enforced: %s is missing", FD_DIRECTORY)
            return False
        self._thread = threading.Thread(target=self._run, name="milter-sessions", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception:       # the watcher must outlive a surprise
                log.exception("milter session watch failed; it goes on")

    def sweep(self) -> int:
        """One look at every socket; returns how many connections were closed."""
        now = self._clock()
        present = _sockets()
        for inode in [inode for inode in self._opened if inode not in present]:
            del self._opened[inode]
        self._ignored.intersection_update(present)
        closed = 0
        for inode, fd in present.items():
            if inode in self._ignored:
                continue
            opened = self._opened.get(inode)
            if opened is None:
                self._classify(inode, fd, now)
            elif now - opened >= self.limit and self._shut_down(inode, fd, now - opened):
                closed += 1
        return closed

    def _classify(self, inode: int, fd: int, now: float) -> None:
        connection = _duplicate(fd, inode)
        if connection is None:          # gone since it was listed
            return
        with connection:
            if self._accepted_here(connection):
                self._opened[inode] = now
            else:
                self._ignored.add(inode)

    def _accepted_here(self, connection: socket.socket) -> bool:
        """A connection accepted on the milter's listening socket?"""
        if connection.type != socket.SOCK_STREAM \
                or connection.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        local = connection.getsockname()
        if self.listen.kind == "unix":
            return connection.family == socket.AF_UNIX and local == self.listen.path
        # An outgoing connection cannot have the port the listener holds.
        return connection.family in (socket.AF_INET, socket.AF_INET6) \
            and local[1] == self.listen.port

    def _shut_down(self, inode: int, fd: int, age: float) -> bool:
        connection = _duplicate(fd, inode)
        if connection is None:
            return False
        with connection:
            peer = _peer(connection)
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:             # the peer went first
                return False
        self._ignored.add(inode)
        del self._opened[inode]
        self._metrics.milter_session_closed()
        log.warning("closed a milter connection from %s open for %d s ([milter] "
                    "session_timeout = %g); the MTA answers the rest of that SMTP session "
                    "with its milter default action", peer, age, self.limit)
        return True


def _sockets() -> dict[int, int]:
    """inode -> descriptor of every socket the process has open."""
    found = {}
    for name in os.listdir(FD_DIRECTORY):
        try:
            target = os.readlink(f"{FD_DIRECTORY}/{name}")
        except OSError:         # closed meanwhile
            continue
        if target.startswith(SOCKET_LINK):
            found[int(target[len(SOCKET_LINK):-1])] = int(name)
    return found


def _duplicate(fd: int, inode: int) -> socket.socket | None:
    """A socket object on a duplicate of fd, if fd is still the socket inode."""
    try:
        copy = os.dup(fd)
    except OSError:
        return None
    try:
        if os.fstat(copy).st_ino == inode:
            return socket.socket(fileno=copy)
    except OSError:
        pass
    os.close(copy)
    return None


def _peer(connection: socket.socket) -> str:
    """Who the MTA is, for the log: address and port, or a unix peer's pid and uid."""
    try:
        if connection.family == socket.AF_UNIX:
            credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", credentials)
            return f"pid {pid} (uid {uid})"
        host, port = connection.getpeername()[:2]
        return f"[{host}]:{port}"
    except OSError:
        return "a peer that is gone"

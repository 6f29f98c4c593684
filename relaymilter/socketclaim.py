"""socketclaim - make sure a listening socket is ours to open, before opening it.

NAME
    socketclaim - claim_socket(): refuse a socket a live daemon answers on

SYNOPSIS
    claim_socket("unix:/var/spool/postfix/relaymilter/milter.sock")  # raises SocketBusy
    claim_socket("inet:8894@127.0.0.1")

DESCRIPTION
    Both front ends call this before they bind (cli._serve for the
    milter, whose socket libmilter opens; policyd._listen for the policy
    service). Without it a second `relaymilter run` on the same unix
    socket would remove the first one's socket file and bind its own: the
    first would keep running, unreachable, and when the second stopped
    the MTA would have no milter at all.

    unix:/PATH   Nothing there: fine. A socket file that accepts a
                 connection: a live daemon (relaymilter or not) listens,
                 SocketBusy. A socket file that refuses (ECONNREFUSED): a
                 stale socket of a process that was killed; it is removed.
                 Anything else at PATH (a file, a directory): SocketBusy,
                 nothing is removed.
    inet:, inet6:
                 A test bind with SO_REUSEADDR, as the listeners bind; it
                 fails with EADDRINUSE while another process listens
                 there: SocketBusy. Other errors (no such address, a
                 privileged port) are left for the real bind to report.

    SocketBusy is an OSError whose text names the socket, so that the
    command line turns it into exit 69 (EX_UNAVAILABLE) and one log line.
    Between this check and the bind another process could still take the
    socket; the check is for the operator who starts a second instance by
    mistake, not a lock.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from relaymilter.endpoint import parse_socket


class SocketBusy(OSError):
    """The socket is in use by a live process, or the path is not a socket."""


def claim_socket(where: str) -> None:
    """Raise SocketBusy if where is taken; remove a stale unix socket file."""
    spec = parse_socket(where)
    if spec.kind == "unix":
        _claim_unix(where, spec.path)
    else:
        family = socket.AF_INET6 if spec.kind == "inet6" else socket.AF_INET
        _claim_inet(where, family, spec.host, spec.port)


def _claim_unix(where: str, path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketBusy(f"cannot listen on {where}: {path} exists and is not a socket; "
                         "remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)     # stale: its process is gone
        return
    except OSError:
        # EACCES and the like: we cannot tell; let the bind decide.
        return
    finally:
        probe.close()
    raise SocketBusy(f"cannot listen on {where}: another process (a running relaymilter?) "
                     "answers on that socket; stop it first, or choose another socket")


def _claim_inet(where: str, family: int, host: str, port: int) -> None:
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise SocketBusy(f"cannot listen on {where}: the address is in use (a running "
                             "relaymilter?); stop it first, or choose another port") from None
    finally:
        probe.close()

"""dunno_policyd - the do-nothing Postfix policy service relaymilter policyd is measured against.

NAME
    dunno_policyd - answer action=DUNNO to every policy request

SYNOPSIS
    python bench/dunno_policyd.py SOCKET

    SOCKET is unix:/absolute/path or inet:PORT@HOST, as in relaymilter's
    [policyd] socket.

DESCRIPTION
    The naive policy service a first attempt would be, the policy-service
    analogue of bench/baseline_milter.py: a socketserver with one thread per
    connection that reads each request (name=value lines up to an empty
    line) without looking at it, answers "action=DUNNO" and an empty line,
    and keeps the connection open for the next request, as Postfix's
    check_policy_service expects. It decides nothing; what it costs Postfix
    is the price of the policy protocol itself.

    A unix socket gets mode 0666 before it accepts connections (smtpd
    connects as the postfix user); a stale socket file is replaced. The
    process runs until it is killed.
"""

import os
import re
import socketserver
import sys

ANSWER = b"action=DUNNO\n\n"


class DunnoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:  # ends when Postfix closes the connection
            if line in (b"\n", b"\r\n"):
                self.wfile.write(ANSWER)


class ThreadingUnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class ThreadingTCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def listen(where: str) -> socketserver.BaseServer:
    """A listening server for unix:/path or inet:PORT@HOST."""
    if where.startswith("unix:"):
        path = where[5:]
        if os.path.exists(path):
            os.unlink(path)
        server = ThreadingUnixServer(path, DunnoHandler, bind_and_activate=False)
        server.server_bind()
        os.chmod(path, 0o666)
        server.server_activate()
        return server
    match = re.fullmatch(r"inet:(\d+)@(.+)", where)
    if not match:
        raise SystemExit(f"dunno_policyd: bad socket {where!r}: unix:/path or inet:PORT@HOST")
    port, host = match.groups()
    return ThreadingTCPServer((host, int(port)), DunnoHandler)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: dunno_policyd.py unix:/path | inet:PORT@HOST")
    listen(sys.argv[1]).serve_forever()


if __name__ == "__main__":
    main()

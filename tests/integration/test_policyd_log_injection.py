"""Control characters sent to a real `relaymilter policyd` never reach its log raw."""

from __future__ import annotations

import socket

from logwait import decision_lines_escaped
from relaymilter_process import RelaymilterProcess, public_subdirectory

HOSTILE = "\rNOQUEUE: reject: fake\x1b[2J\u2028\u0085x"


def test_control_characters_in_a_policy_request_are_escaped_one_line_per_decision(
        tmp_path):
    directory = public_subdirectory(tmp_path, "policyd")
    service = RelaymilterProcess(directory, front_end="policyd",
                                 relay={"local_domains": ["local.test"]},
                                 store={"path": str(directory / "policy.sqlite3")})
    attributes = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                  "client_address": "198.51.100.7", "client_name": "h" + HOSTILE,
                  "helo_name": "helo" + HOSTILE, "queue_id": "Q" + HOSTILE,
                  "sender": "s" + HOSTILE + "@x.example", "sasl_username": "u" + HOSTILE,
                  "recipient": "r" + HOSTILE + "@remote.example"}
    request = "".join(f"{name}={value}\n" for name, value in attributes.items()) + "\n"
    with service:
        before = service.log_text().count("\n")
        for _ in range(2):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(service.socket_path))
                sock.sendall(request.encode("utf-8"))
                assert sock.recv(4096).startswith(b"action=")
        service.wait_for_log(r"(?s)(RCPT from.*){2}")
        lines = service.log_text().split("\n")[before:]
    decisions = decision_lines_escaped(lines)
    assert len(decisions) == 2, lines
    assert "helo=<helo\\x0dNOQUEUE: reject: fake\\x1b[2J\\u2028\\x85x>" in decisions[0]

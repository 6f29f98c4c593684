"""relaymilter_process - the installed `relaymilter run`, as a child process.

NAME
    relaymilter_process - start, kill and restart a real relaymilter for tests

SYNOPSIS
    milter = RelaymilterProcess(directory, relay={"local_domains": ["local.test"]})
    milter.start()                  # returns once the socket accepts connections
    postfix = PostfixInstance(**milter.postfix_kwargs())
    milter.kill()                   # SIGKILL: the crash case
    milter.wait_for_log(r"would reject")

    service = RelaymilterProcess(directory, front_end="policyd", relay={...})
    service.postfix_settings()      # {"smtpd_relay_restrictions": "check_policy_service ..."}

DESCRIPTION
    The process is the console script from the virtualenv, started exactly
    as an admin starts it, with a TOML config written from keyword tables.
    Its stderr goes to a log file in `directory`.

    Two front ends, one engine: front_end="milter" runs `relaymilter run`
    (Postfix: smtpd_milters), front_end="policyd" runs `relaymilter policyd`
    (Postfix: check_policy_service first in smtpd_relay_restrictions, then
    the open relay of postfix_instance, so the service is the only gate, as
    the milter is). postfix_settings() gives the main.cf lines for either;
    postfix_kwargs() gives PostfixInstance's arguments.

    A unix socket is created by libmilter with the process umask; smtpd
    connects as the postfix user, so start() makes it connectable by
    everyone (the directory must be world-searchable too). The policy
    service creates its socket with [policyd] socket_mode, written "0666".
    Postfix's check_policy_service takes an absolute unix path here: the
    test instance runs smtpd with chroot = n.

    Leaving a `with` block kills the process: a clean SIGTERM stop takes
    libmilter up to 5 s, and only the test of stopping needs one.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from logwait import wait_for_match

RELAYMILTER = str(Path(sys.executable).with_name("relaymilter"))
FRONT_ENDS = ("milter", "policyd")
# After the policy service, the open relay of postfix_instance: Postfix
# itself refuses nothing, so every refusal comes from relaymilter.
OPEN_RELAY = "check_client_access static:OK, reject_unauth_destination"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def toml_document(sections: dict[str, dict[str, Any]]) -> str:
    """{"relay": {...}, "dnsbl": {"zone": [{...}, ...]}} -> TOML text."""
    lines: list[str] = []
    for section, body in sections.items():
        tables = {key: value for key, value in body.items()
                  if isinstance(value, list) and value and isinstance(value[0], dict)}
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in body.items()
                  if key not in tables]
        for key, rows in tables.items():
            for row in rows:
                lines.append(f"[[{section}.{key}]]")
                lines += [f"{name} = {toml_value(value)}" for name, value in row.items()]
        lines.append("")
    return "\n".join(lines)


class RelaymilterProcess:
    """One `relaymilter run` (or `relaymilter policyd`) child; see the module docstring."""

    def __init__(self, directory: Path, transport: str = "unix", front_end: str = "milter",
                 **sections: dict[str, Any]) -> None:
        if front_end not in FRONT_ENDS:
            raise ValueError(f"front_end must be one of {FRONT_ENDS}, not {front_end!r}")
        self.front_end = front_end
        self.directory = Path(directory)
        self.config_path = self.directory / "relaymilter.toml"
        self.log_path = self.directory / "relaymilter.log"
        if transport == "unix":
            name = "relaymilter.sock" if front_end == "milter" else "policyd.sock"
            self.socket_path: Path | None = self.directory / name
            self.socket = f"unix:{self.socket_path}"
        else:
            self.socket_path = None
            self.port = _free_port()
            self.socket = f"inet:{self.port}@127.0.0.1"
        # Tests of relay refusals send dozens from one client: [probes] (on by
        # default) would block it. Tests of [probes] give the section.
        sections.setdefault("probes", {"detect": False})
        milter = sections.pop("milter", {})
        if front_end == "milter":
            self.sections = {"milter": {"socket": self.socket, **milter}, **sections}
        else:
            # [milter] settings, if a test gives any, are kept: they must not matter here.
            policyd = {"socket": self.socket, "socket_mode": "0666",
                       **sections.pop("policyd", {})}
            self.sections = {**({"milter": milter} if milter else {}), "policyd": policyd,
                             **sections}
        self.process: subprocess.Popen[bytes] | None = None
        self.write_config()

    def write_config(self) -> None:
        self.config_path.write_text(toml_document(self.sections), encoding="utf-8")

    @property
    def name(self) -> str:
        return "relaymilter" if self.front_end == "milter" else "relaymilter policyd"

    def postfix_settings(self) -> dict[str, str]:
        """The main.cf settings that put this front end before relaying."""
        if self.front_end == "milter":
            return {"smtpd_milters": self.socket}
        if self.socket_path is not None:
            service = f"unix:{self.socket_path}"
        else:
            service = f"inet:127.0.0.1:{self.port}"
        return {"smtpd_relay_restrictions": f"check_policy_service {service}, {OPEN_RELAY}"}

    def postfix_kwargs(self, **kwargs: Any) -> dict[str, Any]:
        """PostfixInstance(**these): milter= for the milter, extra_main_cf for both.

        kwargs' extra_main_cf is merged in (the front end's settings win);
        the other kwargs pass through.
        """
        settings = self.postfix_settings()
        milter = settings.pop("smtpd_milters", None)
        extra = {**(kwargs.pop("extra_main_cf", None) or {}), **settings}
        return {"milter": milter, **kwargs, "extra_main_cf": extra}

    def reply_text(self, text: str, recipient: str) -> str:
        """relaymilter's refusal text "X.Y.Z rest" as the SMTP client reads it.

        A milter's reply reaches the client as given. A policy service's is
        an access table action to Postfix, which prefixes it like any other:
        "X.Y.Z <recipient>: Recipient address rejected: rest", the recipient
        in Postfix's internal form (no source route, quotes removed).
        """
        if self.front_end == "milter":
            return text
        dsn, rest = text.split(" ", 1)
        if rest.startswith("<") and rest.endswith(">: Relay access denied"):
            rest = "Relay access denied"    # policyd does not name the recipient twice
        return f"{dsn} <{postfix_internal_form(recipient)}>: Recipient address rejected: {rest}"

    def start(self, timeout: float = 15.0, debug: bool = False) -> None:
        verb = "run" if self.front_end == "milter" else "policyd"
        command = [RELAYMILTER, verb, "-c", str(self.config_path)] + (["--debug"] if debug else [])
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self._connectable():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   + self.log_text())
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} socket never became ready:\n"
                                   + self.log_text())
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, no clean-up: what a crash looks like to the MTA."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        """First match of the regex (re.MULTILINE) in the log, waiting for it."""
        return wait_for_match(self.log_text, pattern, timeout, "relaymilter")

    def _connectable(self) -> bool:
        if self.socket_path is not None:
            if not self.socket_path.exists():
                return False
            if self.front_end == "milter":
                os.chmod(self.socket_path, 0o666)   # the service sets its own socket_mode
            family, address = socket.AF_UNIX, str(self.socket_path)
        else:
            family, address = socket.AF_INET, ("127.0.0.1", self.port)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(address)
            except OSError:
                return False
        return True

    def __enter__(self) -> "RelaymilterProcess":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # A clean stop costs libmilter up to 5 s (its listener polls); tests
        # that are not about stopping end the process at once.
        self.kill()


def postfix_internal_form(address: str) -> str:
    """An address as Postfix keeps it, and hands it to a policy service:
    without angle brackets, source route, quotes or backslash escapes
    (<@a.test:"john doe"@b.test> -> john doe@b.test). Enough for
    the addresses of these tests, not a full RFC 5321 parser."""
    address = address.strip().removeprefix("<").removesuffix(">")
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]
    return re.sub(r'\\(.)|"', lambda match: match.group(1) or "", address)


def public_subdirectory(parent: Path, name: str) -> Path:
    """parent/name, created world-searchable (smtpd runs as user postfix)."""
    directory = Path(parent) / name
    directory.mkdir()
    directory.chmod(0o755)
    return directory


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

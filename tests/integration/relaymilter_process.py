"""relaymilter_process - the installed `relaymilter run`, as a child process.

NAME
    relaymilter_process - start, kill and restart a real relaymilter for tests

SYNOPSIS
    milter = RelaymilterProcess(directory, relay={"local_domains": ["local.test"]})
    milter.start()                  # returns once the socket accepts connections
    postfix = PostfixInstance(milter=milter.socket)
    milter.kill()                   # SIGKILL: the crash case
    milter.wait_for_log(r"would reject")

DESCRIPTION
    The process is the console script from the virtualenv, started exactly
    as an admin starts it, with a TOML config written from keyword tables.
    Its stderr goes to a log file in `directory`.

    A unix socket is created by libmilter with the process umask; smtpd
    connects as the postfix user, so start() makes it connectable by
    everyone (the directory must be world-searchable too).

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

RELAYMILTER = str(Path(sys.executable).with_name("relaymilter"))


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
    """One `relaymilter run` child; see the module docstring."""

    def __init__(self, directory: Path, transport: str = "unix",
                 **sections: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.config_path = self.directory / "relaymilter.toml"
        self.log_path = self.directory / "relaymilter.log"
        if transport == "unix":
            self.socket_path: Path | None = self.directory / "relaymilter.sock"
            self.socket = f"unix:{self.socket_path}"
        else:
            self.socket_path = None
            self.port = _free_port()
            self.socket = f"inet:{self.port}@127.0.0.1"
        milter = {"socket": self.socket, **sections.pop("milter", {})}
        self.sections = {"milter": milter, **sections}
        self.process: subprocess.Popen[bytes] | None = None
        self.write_config()

    def write_config(self) -> None:
        self.config_path.write_text(toml_document(self.sections), encoding="utf-8")

    def start(self, timeout: float = 15.0, debug: bool = False) -> None:
        command = [RELAYMILTER, "run", "-c", str(self.config_path)] + (["--debug"] if debug else [])
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self._connectable():
            if self.process.poll() is not None:
                raise RuntimeError(f"relaymilter exited with {self.process.returncode}:\n"
                                   + self.log_text())
            if time.monotonic() > deadline:
                raise RuntimeError("relaymilter socket never became ready:\n" + self.log_text())
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
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log_text(), re.MULTILINE)
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in relaymilter log:\n{self.log_text()}")
            time.sleep(0.02)

    def _connectable(self) -> bool:
        if self.socket_path is not None:
            if not self.socket_path.exists():
                return False
            os.chmod(self.socket_path, 0o666)
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

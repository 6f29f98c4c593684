"""logwait - read a log that another process writes as it goes: wait for a line,
check that client text reached it escaped."""

from __future__ import annotations

import re
import time
from typing import Callable

# What must never reach a log line raw: C0 and C1 controls but TAB and LF,
# DEL, and the Unicode line and paragraph separators.
RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def wait_for_match(read: Callable[[], str], pattern: str, timeout: float,
                   name: str) -> re.Match[str]:
    """First match of the regex (re.MULTILINE) in read(), polled until timeout.

    Fails with the whole log, so a test failure shows what was logged instead.
    """
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        match = re.search(pattern, text, re.MULTILINE)
        if match:
            return match
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not in {name} log:\n{text}")
        time.sleep(0.02)


def decision_lines_escaped(lines: list[str]) -> list[str]:
    """The decision lines ("RCPT from") among lines, once every line is shown
    to hold no raw control character."""
    for line in lines:
        assert not RAW_CONTROLS.search(line), repr(line)
    return [line for line in lines if "RCPT from" in line]

"""logwait - wait for a line in a log that another process writes as it goes."""

from __future__ import annotations

import re
import time
from typing import Callable


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

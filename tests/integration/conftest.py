"""Fixtures for tests against real peers (see DESIGN.md section 5).

A missing peer fails the tests with the command that installs it: a skipped
integration test would pass CI while testing nothing.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import pytest

from postfix_instance import POSTFIX, POSTFIX_MASTER, PostfixInstance


@pytest.fixture(scope="session")
def postfix_installed() -> None:
    """Fail (never skip) when Postfix is not installed."""
    if POSTFIX is None or not os.access(POSTFIX_MASTER, os.X_OK):
        pytest.fail(
            f"Postfix is not installed (need postfix on PATH or in /usr/sbin, and {POSTFIX_MASTER}); "
            "run `scripts/install-debian-deps test` or `make test`",
            pytrace=False,
        )


@pytest.fixture
def postfix_factory(postfix_installed: None) -> Iterator[Callable[..., PostfixInstance]]:
    """make(milter=None, **PostfixInstance kwargs) -> a started instance.

    Every instance made is stopped at teardown, whatever the test did.
    """
    instances: list[PostfixInstance] = []

    def make(milter: str | None = None, **kwargs: object) -> PostfixInstance:
        instance = PostfixInstance(milter, **kwargs)
        instances.append(instance)
        instance.start()
        return instance

    yield make
    for instance in instances:
        instance.stop()

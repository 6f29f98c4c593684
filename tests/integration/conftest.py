"""Fixtures for tests against real peers (see DESIGN.md section 5).

A missing peer fails the tests with the command that installs it: a skipped
integration test would pass CI while testing nothing.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from postfix_instance import POSTFIX, POSTFIX_MASTER, PostfixInstance
from rbldnsd import RBLDNSD
from relaymilter_process import FRONT_ENDS


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


@pytest.fixture(scope="module", params=FRONT_ENDS, ids=FRONT_ENDS)
def front_end(request: pytest.FixtureRequest) -> str:
    """"milter" or "policyd": a test that takes it runs once with each front end.

    One table of scenarios, two ways for Postfix to ask relaymilter
    (smtpd_milters, check_policy_service), the same SMTP outcome expected.
    Module scope: pytest runs a module's tests for one front end, then for
    the other, so module fixtures built on it (one relaymilter, one Postfix)
    are made twice, not once per test.
    """
    return request.param


@pytest.fixture(scope="session")
def rbldnsd_installed() -> None:
    """Fail (never skip) when rbldnsd is not installed."""
    if RBLDNSD is None:
        pytest.fail("rbldnsd is not installed (need rbldnsd on PATH or in /usr/sbin); "
                    "run `scripts/install-debian-deps test` or `make test`", pytrace=False)


@pytest.fixture(scope="module")
def public_tree() -> Iterator[Path]:
    """A world-searchable directory for one test module's sockets and configs.

    pytest's tmp_path is 0700 root: smtpd, running as postfix, could not
    reach a milter socket there.
    """
    directory = Path(tempfile.mkdtemp(prefix="relaymilter-it-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def sendmail_installed() -> None:
    """Fail (never skip) when the private Sendmail cannot run (see sendmail_instance)."""
    from sendmail_instance import sendmail_missing

    missing = sendmail_missing()
    if missing:
        pytest.fail(f"{missing}; run `scripts/install-debian-deps test` (which runs "
                    "scripts/fetch-sendmail) or `make test`", pytrace=False)


_databases = itertools.count(1)


def _private_server(module: str, name: str, error: str):
    """A started private server of module.name (postgres_instance, redis_instance);
    fails, never skips, when its program is not installed."""
    imported = __import__(module)
    try:
        server = getattr(imported, name)()
        server.start()
    except getattr(imported, error) as failure:
        pytest.fail(f"{failure}; run `scripts/install-debian-deps test` or `make test`",
                    pytrace=False)
    return server


@pytest.fixture(scope="session")
def postgres() -> Iterator["PostgresInstance"]:
    """One private PostgreSQL for the session (postgres_instance.py). Tests never
    stop this one: a test of an outage starts a PostgresInstance of its own."""
    server = _private_server("postgres_instance", "PostgresInstance", "PostgresError")
    yield server
    server.close()


@pytest.fixture
def postgres_url(postgres) -> Iterator[str]:
    """The URL of a new, empty database of its own for one test."""
    name = f"test_{next(_databases)}"
    yield postgres.create_database(name)
    postgres.drop_database(name)


@pytest.fixture(scope="session")
def redis_server() -> Iterator["RedisInstance"]:
    """One private Redis for the session (redis_instance.py). Tests flush what
    they count; a test that kills Redis starts a RedisInstance of its own."""
    server = _private_server("redis_instance", "RedisInstance", "RedisError")
    yield server
    server.close()

"""storelocation.py: which locations are PostgreSQL URLs, and showing them without passwords."""

import pytest

from relaymilter.storelocation import display_location, is_url


@pytest.mark.parametrize("location, url", [
    ("postgresql://db/mail", True),
    ("postgres://db/mail", True),
    ("PostgreSQL://db/mail", True),
    ("/var/lib/relaymilter/policy.sqlite3", False),
    ("postgresql.sqlite3", False),
    ("relative/postgresql://x", False),
])
def test_a_url_is_a_postgresql_scheme_anything_else_a_path(location, url):
    assert is_url(location) is url


@pytest.mark.parametrize("location, shown", [
    ("postgresql://u:secret@db/mail", "postgresql://u:***@db/mail"),
    ("postgres://u:p%40ss@db:5432/mail?sslmode=require",
     "postgres://u:***@db:5432/mail?sslmode=require"),
    ("postgresql:///mail?host=/run/postgresql&password=secret&user=u",
     "postgresql:///mail?host=/run/postgresql&password=***&user=u"),
    ("postgresql:///mail?PASSWORD=secret", "postgresql:///mail?PASSWORD=***"),
    ("postgresql://u@db/mail", "postgresql://u@db/mail"),
    ("postgresql://db:5432/mail", "postgresql://db:5432/mail"),
    ("/var/lib/a:b@c/policy.sqlite3", "/var/lib/a:b@c/policy.sqlite3"),
])
def test_a_password_is_never_shown(location, shown):
    assert display_location(location) == shown

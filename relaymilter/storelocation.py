"""storelocation - where a policy store is, and how to show that without its password.

NAME
    storelocation - is_url() and display_location() for [store] path and url

SYNOPSIS
    is_url("postgresql://relaymilter@db.example/mail")      # True: PostgreSQL
    is_url("/var/lib/relaymilter/policy.sqlite3")           # False: a SQLite file
    display_location("postgresql://u:secret@db/mail")       # "postgresql://u:***@db/mail"

DESCRIPTION
    A location is a libpq URL, postgresql://... or postgres://... (a
    PostgreSQL store), or else the path of a SQLite file. The config, the
    CLI, the logs and the status page show a location with any password
    in it (user:PASSWORD@, ?password=) masked.

    Pure: no I/O, no database module, so that the config (and through it
    the engine) may use it.
"""

from __future__ import annotations

import os
import re

URL_SCHEMES = ("postgresql://", "postgres://")

_PASSWORD = re.compile(r"(?P<keep>^[a-z]+://[^/?#@:]*:)[^/?#@]*(?=@)"
                       r"|(?P<param>(?<=[?&])password=)[^&#]*", re.IGNORECASE)


def is_url(location: str | os.PathLike) -> bool:
    """A PostgreSQL URL, not a file path."""
    return isinstance(location, str) and location.lower().startswith(URL_SCHEMES)


def display_location(location: str | os.PathLike) -> str:
    """location with any password in it masked (of any URL: a mistyped scheme
    still hides its password)."""
    text = os.fspath(location)
    if "://" not in text:
        return text
    return _PASSWORD.sub(lambda match: (match.group("keep") or match.group("param")) + "***",
                         text)

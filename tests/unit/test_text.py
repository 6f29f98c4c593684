"""text.printable(): nothing a client sends reaches a reply or a log line raw."""

from __future__ import annotations

import pytest

from relaymilter.text import printable


def test_printable_ascii_is_kept_as_written():
    text = 'user+tag@example.org "quoted\\ local" [192.0.2.1] ~!'
    assert printable(text) is text


@pytest.mark.parametrize("raw, shown", [
    ("a\rb", "a\\x0db"), ("a\nb", "a\\x0ab"), ("\x1b[31m", "\\x1b[31m"), ("\x00", "\\x00"),
    ("\x7f", "\\x7f"), ("a\x85b", "a\\x85b"), ("a\u2028b", "a\\u2028b"),
    ("a\u2029b", "a\\u2029b"), ("caf\u00e9", "caf\\u00e9"), ("\U0001f600", "\\U0001f600"),
    ("\u200e", "\\u200e"),
])
def test_control_and_non_ascii_characters_are_escaped(raw, shown):
    assert printable(raw) == shown


def test_bytes_that_were_not_utf8_show_as_the_bytes_sent():
    assert printable(b"h\xff\xfe.test".decode("utf-8", "surrogateescape")) == "h\\xff\\xfe.test"


@pytest.mark.parametrize("char", [chr(code) for code in
                                  list(range(0x20)) + list(range(0x7f, 0xa1))
                                  + [0x2028, 0x2029, 0x200b, 0xfeff, 0xdcff, 0xd800]])
def test_no_escape_can_split_a_line_or_a_field(char):
    shown = printable(f"x{char}y")
    assert shown.isascii() and shown.isprintable()
    assert not set(shown) & set(" []<>;=")


def test_escapes_stay_on_one_line_in_str_splitlines():
    hostile = "a\r\nb\x0bc\x0cd\x1ce\x1df\x1eg\x85h\u2028i\u2029j"
    assert len(printable(hostile).splitlines()) == 1

"""text - client-controlled text made safe to echo.

NAME
    text - printable(): what may go into an SMTP reply or a log line

DESCRIPTION
    Addresses, HELO names, SASL logins, queue IDs and DNS TXT records come
    from strangers. Before one is echoed in a reply or written to a log,
    every character outside printable ASCII is written as an escape:

      a byte that was not UTF-8 (kept as a surrogate escape)   \\xff
      a control character of ASCII or Latin-1 (CR, LF, ESC)    \\x0d \\x1b \\x85
      any other character (U+2028, U+00E9, an emoji)           \\u2028 \\u00e9 \\U0001f600

    So no CR or LF can split a log line, no escape sequence reaches a
    terminal, a reply stays ASCII, and an admin still sees what the client
    sent (Postfix writes "?" and loses it). Printable ASCII, the backslash
    included, is kept as it is: the lines fail2ban and pflogsumm read do
    not change for ordinary clients, and no escape contains a space, "[",
    "]", "<" or ">" that could move a field boundary.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """text with every character outside printable ASCII written as an escape."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(char if " " <= char <= "~" else _escape(char) for char in text)


def one_line(text: str) -> str:
    """text with its unprintable characters (control characters, line and
    paragraph separators, bytes that were not UTF-8) written as escapes;
    printable non-ASCII stays. The last line of defence of every log line."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:        # surrogateescape: the original byte
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100 and not char.isprintable():
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"

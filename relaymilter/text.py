"""text - client-controlled text made safe to echo.

NAME
    text - printable(): what may go into an SMTP reply or a log line

DESCRIPTION
    Addresses, HELO names and DNS TXT records come from strangers. Before
    one is echoed in a reply or written to a log, every character outside
    printable ASCII becomes "?": no CR/LF to split a line, no escape
    sequence for a terminal, no byte a reply could not carry.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """text with every character outside printable ASCII replaced by "?"."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(char if " " <= char <= "~" else "?" for char in text)

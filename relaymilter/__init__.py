"""relaymilter - a milter that closes open relays and keeps listed relays out."""

__version__ = "0.1.0"

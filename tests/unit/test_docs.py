"""The docs name every config key, in its section, with its default."""

import pathlib
import re

import pytest

from relaymilter.config import SCHEMA, SECTIONS

ROOT = pathlib.Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
SAMPLE = (ROOT / "packaging" / "relaymilter.toml").read_text(encoding="utf-8")


def guide_section(section):
    match = re.search(rf"^### \[{section}\]\n(.*?)(?=^### |^## )", GUIDE, re.S | re.M)
    assert match, f"docs/guide.md has no '### [{section}]' heading"
    return match.group(1)


@pytest.mark.parametrize("key", SCHEMA, ids=lambda key: key.dotted)
def test_guide_documents_every_key_in_its_section(key):
    assert re.search(rf"^`{key.name}` \(default", guide_section(key.section), re.M), key.dotted


@pytest.mark.parametrize("key", SCHEMA, ids=lambda key: key.dotted)
def test_sample_config_mentions_every_key(key):
    if key.type is dict:    # an array of tables
        assert re.search(rf"^#? ?\[\[{re.escape(key.dotted)}\]\]$", SAMPLE, re.M), key.dotted
    else:
        assert re.search(rf"^#? ?{key.name} = ", SAMPLE, re.M), key.dotted


def test_sample_config_has_every_section():
    for section in SECTIONS:
        assert f"[{section}]" in SAMPLE

"""The docs name every config key, in its section, with its default, restart and old names."""

import pathlib
import re

import pytest

from relaymilter.config import ALIASES, KEYS, SCHEMA, SECTIONS

ROOT = pathlib.Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
SAMPLE = (ROOT / "packaging" / "relaymilter.toml").read_text(encoding="utf-8")


def guide_section(section):
    match = re.search(rf"^### \[{section}\]\n(.*?)(?=^### |^## )", GUIDE, re.S | re.M)
    assert match, f"docs/guide.md has no '### [{section}]' heading"
    return match.group(1)


def guide_entry(key):
    """The definition of key in the guide, on one line."""
    match = re.search(rf"^`{key.name}` \(default[^\n]*\n: (.*?)(?=\n\n|\Z)",
                      guide_section(key.section), re.S | re.M)
    assert match, f"docs/guide.md does not document {key.dotted}"
    return " ".join(match.group(1).split())


@pytest.mark.parametrize("key", SCHEMA, ids=lambda key: key.dotted)
def test_guide_documents_every_key_in_its_section(key):
    assert re.search(rf"^`{key.name}` \(default", guide_section(key.section), re.M), key.dotted


@pytest.mark.parametrize("key", SCHEMA, ids=lambda key: key.dotted)
def test_guide_says_which_keys_take_a_restart(key):
    assert ("Changing it takes a restart." in guide_entry(key)) is key.restart_only


@pytest.mark.parametrize("old, new", ALIASES.items())
def test_guide_names_every_deprecated_name_where_it_was_and_where_it_went(old, new):
    section, name = old.split(".")
    assert f"`{name}`" in guide_section(section)
    assert f"`[{section}] {name}`" in guide_entry(KEYS[new])


@pytest.mark.parametrize("key", SCHEMA, ids=lambda key: key.dotted)
def test_sample_config_mentions_every_key(key):
    if key.type is dict:    # an array of tables
        assert re.search(rf"^#? ?\[\[{re.escape(key.dotted)}\]\]$", SAMPLE, re.M), key.dotted
    else:
        assert re.search(rf"^#? ?{key.name} = ", SAMPLE, re.M), key.dotted


def test_sample_config_has_every_section():
    for section in SECTIONS:
        assert f"[{section}]" in SAMPLE


MAN = ROOT / "docs" / "man"


def man_tag_line(key):
    """The .TP tag line of key in relaymilter.conf(5), within its section."""
    page = (MAN / "relaymilter.conf.5").read_text(encoding="utf-8")
    section = re.search(rf'^\.SH "\[{key.section}\] SECTION"\n(.*?)(?=^\.SH |\Z)', page,
                        re.S | re.M)
    assert section, f"relaymilter.conf(5) has no [{key.section}] section"
    line = re.search(rf"^\\fB{key.name}\\fR \(.*$", section.group(1), re.M)
    assert line, key.dotted
    return line.group(0)


@pytest.mark.parametrize("key", SCHEMA, ids=lambda key: key.dotted)
def test_relaymilter_conf_5_documents_every_key_in_its_section(key):
    assert man_tag_line(key)


@pytest.mark.parametrize("key", SCHEMA, ids=lambda key: key.dotted)
def test_relaymilter_conf_5_marks_the_restart_only_keys(key):
    assert man_tag_line(key).endswith(" (takes effect at restart)") is key.restart_only


def test_man_pages_are_generated_from_the_current_sources():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, str(MAN / "generate.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_relaymilter_8_names_every_verb():
    from relaymilter.cli import build_parser
    page = (MAN / "relaymilter.8").read_text(encoding="utf-8")
    verbs = next(action for action in build_parser()._actions if hasattr(action, "choices")
                 and isinstance(action.choices, dict))
    for verb in verbs.choices:
        assert f"relaymilter {verb.replace('-', chr(92) + '-')}" in page, verb


def test_hacking_md_maps_every_module_of_the_package():
    hacking = (ROOT / "HACKING.md").read_text(encoding="utf-8")
    modules = [path.name for path in (ROOT / "relaymilter").glob("*.py")
               if not path.name.startswith("__")]
    assert len(modules) > 20
    missing = [name for name in modules if f"`{name}`" not in hacking]
    assert not missing, f"HACKING.md does not name {missing}"

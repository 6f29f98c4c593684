"""holdnotify.notify(): the hold reaches the command as environment, failures reach the log."""

from __future__ import annotations

import logging

from relaymilter import holdnotify
from relaymilter.autohold import HoldRequest


def script(tmp_path, body: str):
    path = tmp_path / "notify"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_the_hold_is_in_the_environment_and_client_text_stays_data(tmp_path):
    out = tmp_path / "out"
    command = script(tmp_path, f'printf "%s|%s|%s|%s" "$RELAYMILTER_HOLD_KIND" '
                               f'"$RELAYMILTER_HOLD_VALUE" "$RELAYMILTER_HOLD_REASON" '
                               f'"$RELAYMILTER_HOLD_EXPIRES" > {out}\n')
    odd = "eve$(touch pwned);`id`"
    holdnotify.notify(command, HoldRequest("user", odd, "over 3 times"), 1767225600.4).join(10)
    assert out.read_text() == f"user|{odd}|over 3 times|1767225600"
    assert not (tmp_path / "pwned").exists()


def test_a_failing_command_is_logged_with_its_output_escaped(tmp_path, caplog):
    command = script(tmp_path, 'printf "no route\\033[2J\\n" >&2; exit 3\n')
    with caplog.at_level(logging.INFO, logger="relaymilter.holdnotify"):
        holdnotify.notify(command, HoldRequest("client", "192.0.2.7", "x"), None).join(10)
    [record] = caplog.records
    assert record.levelname == "WARNING" and "exit status 3: no route" in record.getMessage()
    assert "\x1b" not in record.getMessage()


def test_a_command_that_cannot_run_or_hangs_is_said_to_and_never_waited_for(tmp_path, caplog,
                                                                           monkeypatch):
    monkeypatch.setattr(holdnotify, "TIMEOUT", 0.5)
    hanging = script(tmp_path, "sleep 30\n")
    with caplog.at_level(logging.WARNING, logger="relaymilter.holdnotify"):
        holdnotify.notify(str(tmp_path / "missing"), HoldRequest("user", "a", "x"), None).join(10)
        thread = holdnotify.notify(hanging, HoldRequest("user", "b", "x"), None)
        assert thread.is_alive()                # the caller went on at once
        thread.join(10)
    messages = [record.getMessage() for record in caplog.records]
    assert "cannot run" in messages[0]
    assert messages[1].endswith("still running after 0 s, killed")

"""[policyd] workers: one socket served by several processes, supervised.

The installed `relaymilter policyd` with workers = 3 on a unix socket:
Postfix-shaped requests spread over the workers (each has its own metrics
port), a killed worker is replaced, SIGHUP reaches every worker, SIGTERM
stops them all and removes the socket, and a supervisor killed outright
takes its workers with it. Limits: refused with per-process counters when
the store holds limits, warned about when they come later; exact across
workers with Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from policy_client import PolicyClient, request
from procs import alive, children
from relaymilter_process import RELAYMILTER, RelaymilterProcess, _free_port, public_subdirectory

RELAY = {"local_domains": ["local.test"]}
DENIED = b"action=554 5.7.1 Relay access denied"
LIMITED = b"action=450 4.7.1 Sending rate limit exceeded, try again later"


def workers_of(supervisor: int) -> list[int]:
    return children(supervisor)


def within(seconds: float, condition) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not so within {seconds} s"
        time.sleep(0.05)


def decisions(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("relaymilter_decisions_total{"))


def ask(service: RelaymilterProcess, **attributes) -> bytes:
    client = PolicyClient(str(service.socket_path))
    try:
        return client.ask(request("someone@remote.test", **attributes))[0]
    finally:
        client.close()


def test_three_workers_share_one_socket_and_are_kept_running(public_tree):
    port = _free_port()
    service = RelaymilterProcess(public_subdirectory(public_tree, "workers"), front_end="policyd",
                                 policyd={"workers": 3}, relay=RELAY, store={"path": ""},
                                 metrics={"policyd_listen": f"127.0.0.1:{port}"})
    service.start()
    try:
        within(10, lambda: len(workers_of(service.process.pid)) == 3)
        within(10, lambda: all(_answers(port + k) for k in range(3)))
        for _ in range(60):
            assert ask(service) == DENIED
        counts = [decisions(port + k) for k in range(3)]
        assert sum(counts) == 60 and sum(1 for count in counts if count) >= 2, counts
        first = workers_of(service.process.pid)
        os.kill(first[0], signal.SIGKILL)
        within(5, lambda: len(workers_of(service.process.pid)) == 3
               and workers_of(service.process.pid) != first)
        assert ask(service) == DENIED
        os.kill(service.process.pid, signal.SIGHUP)
        for pid in workers_of(service.process.pid):
            service.wait_for_log(rf"relaymilter\[{pid}\]: SIGHUP: reloading")
        pids = workers_of(service.process.pid)
        assert service.stop() == 0
        assert not service.socket_path.exists()
        assert not any(Path(f"/proc/{pid}").exists() and alive(pid) for pid in pids)
        assert "worker" in service.log_text() and "Traceback" not in service.log_text()
    finally:
        service.kill()


def test_workers_end_with_a_supervisor_killed_outright(public_tree):
    service = RelaymilterProcess(public_subdirectory(public_tree, "orphans"), front_end="policyd",
                                 policyd={"workers": 2}, relay=RELAY, store={"path": ""})
    service.start()
    within(10, lambda: len(workers_of(service.process.pid)) == 2)
    pids = workers_of(service.process.pid)
    service.kill()
    within(10, lambda: not any(alive(pid) for pid in pids))


def test_workers_with_limits_counted_per_process_are_refused(public_tree):
    directory = public_subdirectory(public_tree, "refused")
    store = directory / "policy.sqlite3"
    done = subprocess.run([RELAYMILTER, "limit", "add", "--user", "alice", "5", "--store",
                           str(store)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    service = RelaymilterProcess(directory, front_end="policyd", policyd={"workers": 2},
                                 relay=RELAY, store={"path": str(store)})
    done = subprocess.run([RELAYMILTER, "policyd", "-c", str(service.config_path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 78
    assert "policyd.workers: 2 workers would each allow the whole outbound limit" in done.stderr
    assert "set [counters] url" in done.stderr
    assert not (directory / "policyd.sock").exists()


def test_limits_added_later_to_workers_without_redis_are_warned_about(public_tree):
    directory = public_subdirectory(public_tree, "warned")
    store = directory / "policy.sqlite3"
    service = RelaymilterProcess(directory, front_end="policyd", policyd={"workers": 2},
                                 relay=RELAY, store={"path": str(store)})
    service.start()
    try:
        within(10, lambda: len(workers_of(service.process.pid)) == 2)
        done = subprocess.run([RELAYMILTER, "limit", "add", "--user", "alice", "5", "--store",
                               str(store)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        line = service.wait_for_log(r"warning: the policy store now holds limits.*", timeout=5)
        assert "2 policy service workers count them each for itself" in line.group(0)
        assert "send 2 times its limit" in line.group(0)
        time.sleep(1.5)
        assert service.log_text().count("now holds limits") == 1      # one worker says it
    finally:
        service.stop()


def test_a_limit_is_exact_across_workers_with_shared_counters(public_tree, redis_server):
    redis_server.client().flushall()
    directory = public_subdirectory(public_tree, "counted")
    store = directory / "policy.sqlite3"
    done = subprocess.run([RELAYMILTER, "limit", "add", "--user", "alice", "5", "--store",
                           str(store)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    service = RelaymilterProcess(directory, front_end="policyd", policyd={"workers": 3},
                                 relay=RELAY, store={"path": str(store)},
                                 counters={"url": redis_server.url()})
    service.start()
    try:
        within(10, lambda: len(workers_of(service.process.pid)) == 3)
        time.sleep(1.5)         # every worker has read the store
        answers = [ask(service, sasl_username="alice", instance=f"m{n}") for n in range(8)]
        assert answers.count(LIMITED) == 3 and LIMITED not in answers[:5], answers
    finally:
        service.stop()


def _answers(port: int) -> bool:
    try:
        decisions(port)
        return True
    except OSError:
        return False

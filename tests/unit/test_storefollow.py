"""storefollow.StoreFollower on a SQLite store: the policy is read again when a hold ends."""

from __future__ import annotations

import ipaddress
import time

from relaymilter.openstore import open_store
from relaymilter.storefollow import StoreFollower

CLIENT = ipaddress.ip_address("192.0.2.7")


def test_the_policy_is_read_again_once_a_hold_in_it_has_ended(tmp_path):
    location = str(tmp_path / "policy.sqlite3")
    with open_store(location) as store:
        store.add_hold("client", "192.0.2.0/24", reason="the whole range")
        store.add_hold("client", "192.0.2.7", reason="this host, for a second",
                       expires=time.time() + 1.0)
    follower = StoreFollower()
    try:
        policy = follower.load(location)
        # The watcher thread's connection reads the store once more at its start.
        policy = follower.poll(location, policy) or policy
        assert policy.held(CLIENT, None).reason == "this host, for a second"
        assert follower.poll(location, policy) is None          # nothing changed, none ended
        time.sleep(1.1)
        # The ended /32 hides the /24 around it until the policy is read again.
        assert policy.held(CLIENT, None) is None
        again = follower.poll(location, policy)
        assert again is not None and again.held(CLIENT, None).reason == "the whole range"
        assert again.next_expiry is None
        assert follower.poll(location, again) is None
        with open_store(location) as store:     # gone from the store, its end written
            assert [hold["value"] for hold in store.list_holds()] == ["192.0.2.0/24"]
            assert [(event["action"], event["entry"]) for event in store.history()][-1] == \
                ("expire", "client 192.0.2.7/32")
    finally:
        follower.close()


def test_entries_that_ended_while_no_daemon_ran_are_removed_at_start(tmp_path):
    location = str(tmp_path / "policy.sqlite3")
    with open_store(location) as store:
        store.add_hold("user", "alice", expires=time.time() - 60)
        store.add_hold("user", "bob")
    follower = StoreFollower()
    try:
        policy = follower.load(location)
        follower.poll(location, policy)
        with open_store(location) as store:
            assert [hold["value"] for hold in store.list_holds()] == ["bob"]
            assert store.history()[-1]["action"] == "expire"
    finally:
        follower.close()

"""netindex.py: containment, longest prefix, tags, v4-mapped, compactness."""

import ipaddress
import random
import tracemalloc

import pytest

from relaymilter.address import parse_network
from relaymilter.netindex import NetworkIndex


def ip(text):
    return ipaddress.ip_address(text)


def index_of_networks(pairs):
    """An index of (ipaddress network, tag) pairs, one network at a time."""
    return NetworkIndex.from_packed((network.network_address.packed, network.prefixlen, tag)
                                    for network, tag in pairs)


def index_of(*pairs):
    return index_of_networks((parse_network(text), tag) for text, tag in pairs)


def test_tags_lists_every_network_holding_the_address_longest_first():
    index = index_of(("10.0.0.0/8", 1), ("10.1.0.0/16", 2), ("10.1.2.3/32", 3),
                     ("10.2.0.0/16", 4))
    assert index.tags(ip("10.1.2.3")) == (3, 2, 1)
    assert index.tags(ip("10.1.2.4")) == (2, 1)
    assert index.tags(ip("10.9.0.1")) == (1,)


def test_address_outside_every_network_has_no_tags():
    index = index_of(("10.0.0.0/8", 1), ("2001:db8::/32", 2))
    assert index.tags(ip("11.0.0.0")) == ()
    assert index.tags(ip("9.255.255.255")) == ()
    assert index.longest(ip("11.0.0.0")) is None
    assert index.tags(ip("2001:db9::")) == ()


def test_network_edges_are_inside():
    index = index_of(("192.0.2.0/24", 1))
    assert index.tags(ip("192.0.2.0")) == (1,)
    assert index.tags(ip("192.0.2.255")) == (1,)
    assert index.tags(ip("192.0.3.0")) == ()
    assert index.tags(ip("192.0.1.255")) == ()


def test_longest_is_the_most_specific_network():
    index = index_of(("10.0.0.0/8", 1), ("10.1.0.0/16", 2), ("10.1.2.0/24", 3))
    assert index.longest(ip("10.1.2.3")) == 3
    assert index.longest(ip("10.1.3.3")) == 2
    assert index.longest(ip("10.7.3.3")) == 1


def test_longest_of_a_network_with_several_tags_is_its_lowest_tag():
    index = index_of(("10.0.0.0/8", 7), ("10.0.0.0/8", 3), ("10.0.0.0/8", 5))
    assert index.longest(ip("10.0.0.1")) == 3
    assert index.tags(ip("10.0.0.1")) == (3, 5, 7)


def test_host_bits_of_a_network_are_ignored():
    index = index_of_networks([(ipaddress.ip_network("192.0.2.77/24", strict=False), 1)])
    assert index.tags(ip("192.0.2.1")) == (1,)


def test_ipv4_mapped_address_matches_its_ipv4_network():
    index = index_of(("192.0.2.0/24", 1))
    assert index.tags(ip("::ffff:192.0.2.9")) == (1,)


def test_ipv4_mapped_network_is_indexed_as_ipv4():
    mapped = ipaddress.IPv6Network("::ffff:192.0.2.0/120")
    index = index_of_networks([(mapped, 1)])
    assert index.tags(ip("192.0.2.9")) == (1,)
    assert index.tags(ip("::ffff:192.0.2.9")) == (1,)
    assert index.tags(ip("::ffff:192.0.3.9")) == ()


def test_families_do_not_mix():
    index = index_of(("0.0.0.0/0", 4), ("::/0", 6))
    assert index.tags(ip("203.0.113.1")) == (4,)
    assert index.tags(ip("2001:db8::1")) == (6,)
    # ::c000:201 is not 192.0.2.1 (only ::ffff:0:0/96 maps IPv4)
    assert index.tags(ip("::c000:201")) == (6,)


@pytest.mark.parametrize("network, inside, outside", [
    ("2001:db8::/64", "2001:db8::ffff:1", "2001:db8:0:1::"),
    ("2001:db8::/65", "2001:db8::7fff:ffff:ffff:ffff", "2001:db8::8000:0:0:0"),
    ("2001:db8::1:0/112", "2001:db8::1:ffff", "2001:db8::2:0"),
    ("2001:db8::8000:0:0:1/128", "2001:db8::8000:0:0:1", "2001:db8::8000:0:0:2"),
    ("2001:db8::/127", "2001:db8::1", "2001:db8::2"),
])
def test_ipv6_prefixes_on_both_sides_of_64_bits(network, inside, outside):
    index = index_of((network, 1), ("2001:db8::/32", 0))
    assert index.tags(ip(inside)) == (1, 0)
    assert index.tags(ip(outside)) == (0,)


def test_ipv6_wide_networks_differing_in_the_high_half_only_stay_apart():
    index = index_of(("2001:db8:0:1::5/128", 1), ("2001:db8:0:2::5/128", 2))
    assert index.tags(ip("2001:db8:0:1::5")) == (1,)
    assert index.tags(ip("2001:db8:0:2::5")) == (2,)
    assert index.tags(ip("2001:db8:0:3::5")) == ()


def test_the_same_network_and_tag_twice_counts_once():
    index = index_of(("10.0.0.0/8", 1), ("10.0.0.0/8", 1), ("10.0.0.0/8", 2))
    assert len(index) == 2
    assert index.tags(ip("10.0.0.1")) == (1, 2)


def test_matches_finds_a_wanted_tag_among_many_on_one_network():
    pairs = [("10.0.0.0/8", tag) for tag in range(0, 20000, 2)]
    index = index_of(*pairs, ("10.1.0.0/16", 5))
    assert index.matches(ip("10.1.0.1"), (3, 5))
    assert index.matches(ip("10.2.0.1"), (1, 19998))
    assert not index.matches(ip("10.2.0.1"), (1, 5, 20001))
    assert not index.matches(ip("11.0.0.1"), (0,))


def test_tag_outside_32_bits_is_refused():
    with pytest.raises(ValueError, match="tag"):
        index_of(("10.0.0.0/8", 2**32))
    with pytest.raises(ValueError, match="tag"):
        index_of(("10.0.0.0/8", -1))


def test_from_packed_rejects_a_prefix_longer_than_the_address():
    with pytest.raises(ValueError):
        NetworkIndex.from_packed([(bytes(4), 33, 0)])
    with pytest.raises(ValueError):
        NetworkIndex.from_packed([(bytes(5), 8, 0)])


def test_empty_index_matches_nothing():
    for index in (NetworkIndex.from_blocks(()), NetworkIndex.from_packed([])):
        assert len(index) == 0
        assert index.tags(ip("10.0.0.1")) == ()
        assert index.longest(ip("::1")) is None
        assert not index.matches(ip("10.0.0.1"), (0,))


def test_agrees_with_ipaddress_containment_on_random_networks():
    rng = random.Random(4)
    networks = []
    for tag in range(1500):
        if rng.random() < 0.7:
            prefixlen = rng.choice([0, 8, 16, 20, 24, 24, 28, 31, 32, 32])
            address = ipaddress.IPv4Address(rng.choice([0x0A000000, 0xC0000200])
                                            + rng.getrandbits(12) * 16)
        else:
            prefixlen = rng.choice([32, 48, 56, 64, 64, 65, 96, 112, 127, 128])
            address = ipaddress.IPv6Address((0x20010DB8 << 96) + (rng.getrandbits(20) << 60)
                                            + rng.getrandbits(8))
        networks.append((ipaddress.ip_network(f"{address}/{prefixlen}", strict=False), tag))
    index = index_of_networks(networks)
    probes = [network.network_address for network, _ in networks[:200]]
    probes += [network.broadcast_address for network, _ in networks[:200]]
    probes += [ipaddress.IPv4Address(0x0A000000 + rng.getrandbits(16)) for _ in range(200)]
    for probe in probes:
        expected = [(network.prefixlen, tag) for network, tag in networks
                    if network.version == probe.version and probe in network]
        expected.sort(key=lambda pair: (-pair[0], pair[1]))
        assert index.tags(probe) == tuple(tag for _, tag in expected), probe
        assert index.longest(probe) == (expected[0][1] if expected else None), probe


def retained_by(build):
    tracemalloc.start()
    try:
        index = build()
        return index, tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def test_a_network_costs_about_eight_bytes():
    # Two sizes with the same (full-size, 2 MiB) bitmap: what one more
    # network costs is its arrays, 8 bytes, plus offsets; an int object per
    # network alone would be 28. bench/store_scale.py measures a million.
    def block(count):
        return b"".join((0x0A000000 + n * 7).to_bytes(4, "big") + (n % 5000).to_bytes(4, "big")
                        for n in range(count))
    small, large = block(40000), block(80000)
    _, retained_small = retained_by(lambda: NetworkIndex.from_blocks([(4, 32, small)]))
    index, retained_large = retained_by(lambda: NetworkIndex.from_blocks([(4, 32, large)]))
    assert len(index) == 80000
    assert (retained_large - retained_small) / 40000 < 10
    assert retained_large < 80000 * 10 + 2**21 + 2**16
    assert index.tags(ip("10.0.0.70")) == (10,)


def record(network, tag):
    network = parse_network(network)
    return network.network_address.packed + tag.to_bytes(4, "big")


def test_blocks_in_any_order_and_pieces_give_the_same_index_as_one_at_a_time():
    pairs = [("10.0.0.0/8", 1), ("10.1.0.0/16", 2), ("10.1.2.3/32", 3), ("10.1.2.3/32", 0),
             ("2001:db8::/48", 4), ("2001:db8::5/128", 5)]
    blocks = [(4, 32, record("10.1.2.3/32", 3)), (4, 8, record("10.0.0.0/8", 1)),
              (6, 128, record("2001:db8::5/128", 5)), (4, 16, record("10.1.0.0/16", 2)),
              (4, 32, record("10.1.2.3/32", 0)), (6, 48, record("2001:db8::/48", 4))]
    built, from_blocks = index_of(*pairs), NetworkIndex.from_blocks(blocks)
    assert len(from_blocks) == len(built) == 6
    for probe in ("10.1.2.3", "10.1.9.9", "10.9.9.9", "2001:db8::5", "2001:db8::6", "::1"):
        assert from_blocks.tags(ip(probe)) == built.tags(ip(probe)), probe


def test_unsorted_and_repeated_ipv4_records_are_sorted_and_counted_once():
    data = b"".join(record(f"192.0.2.{n}/32", n % 3) for n in (9, 3, 7, 3, 1, 9))
    index = NetworkIndex.from_blocks([(4, 32, data)])
    assert len(index) == 4
    assert [index.longest(ip(f"192.0.2.{n}")) for n in (1, 3, 7, 9, 2)] == [1, 0, 1, 0, None]


@pytest.mark.parametrize("prefixlen", [64, 128])
def test_unsorted_and_repeated_ipv6_records_are_sorted_and_counted_once(prefixlen):
    networks = [f"2001:db8:{n}::/{prefixlen}" for n in (9, 3, 7, 3, 1, 9)]
    data = b"".join(record(network, 5) for network in networks)
    index = NetworkIndex.from_blocks([(6, prefixlen, data)])
    assert len(index) == 4
    assert [index.longest(ip(f"2001:db8:{n}::")) for n in (1, 3, 7, 9, 2)] == [5, 5, 5, 5, None]


def test_a_block_of_broken_records_is_refused():
    with pytest.raises(ValueError, match="records of 8 bytes"):
        NetworkIndex.from_blocks([(4, 32, bytes(12))])
    with pytest.raises(ValueError):
        NetworkIndex.from_blocks([(5, 32, bytes(8))])


def test_a_big_group_finds_every_member_and_no_neighbour():
    rng = random.Random(7)
    members = sorted(rng.sample(range(2**24), 30000))     # buckets of a few entries each
    index = NetworkIndex.from_blocks([(4, 32, b"".join(
        (0x0A000000 + member).to_bytes(4, "big") + (member % 1000).to_bytes(4, "big")
        for member in members))])
    present = set(members)
    for member in members[::7]:
        assert index.longest(ipaddress.IPv4Address(0x0A000000 + member)) == member % 1000
        for neighbour in (member - 1, member + 1):
            found = index.longest(ipaddress.IPv4Address(0x0A000000 + neighbour))
            assert found == (neighbour % 1000 if neighbour in present else None)
    assert index.longest(ip("11.0.0.0")) is None
    assert index.longest(ip("9.255.255.255")) is None


@pytest.mark.parametrize("seed", [1, 2])
def test_agrees_with_brute_force_on_networks_spread_over_the_whole_space(seed):
    rng = random.Random(seed)
    entries = []        # (version, first, last, prefixlen, tag)
    for tag in range(2000):
        version = 4 if rng.random() < 0.7 else 6
        bits = 32 if version == 4 else 128
        prefixlen = rng.choice(range(0, bits + 1) if rng.random() < 0.2 else
                               ([32, 32, 28, 24, 24, 20, 16] if version == 4 else
                                [128, 128, 64, 64, 56, 48, 40, 32]))
        first = rng.getrandbits(bits) >> (bits - prefixlen) << (bits - prefixlen)
        entries.append((version, first, first + (1 << (bits - prefixlen)) - 1, prefixlen,
                        rng.choice([tag, tag, 7])))
    index = NetworkIndex.from_packed(
        (first.to_bytes(4 if version == 4 else 16, "big"), prefixlen, tag)
        for version, first, _, prefixlen, tag in entries)
    probes = [(version, first) for version, first, _, _, _ in entries[:300]]
    probes += [(version, last) for version, _, last, _, _ in entries[:300]]
    probes += [(4, rng.getrandbits(32)) for _ in range(200)]
    probes += [(6, rng.getrandbits(128)) for _ in range(200)]
    for version, value in probes:
        address = ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)
        holding = sorted({(-prefixlen, tag) for entry_version, first, last, prefixlen, tag
                          in entries if entry_version == version and first <= value <= last})
        expected = tuple(tag for _, tag in holding)
        assert index.tags(address) == expected, address
        assert index.longest(address) == (expected[0] if expected else None), address
        assert index.matches(address, (7,)) == (7 in expected), address
        assert index.matches(address, (expected[-1], 99999) if expected else (0,)) \
            == bool(expected), address

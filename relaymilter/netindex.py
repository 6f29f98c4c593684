"""netindex - which of many networks hold a client address, compactly.

NAME
    netindex - immutable network -> tag index for a million networks

SYNOPSIS
    index = NetworkIndex.from_packed([(ip_address("192.0.2.0").packed, 24, 0),
                                      (ip_address("192.0.2.7").packed, 32, 5)])
    index.tags(ip_address("192.0.2.7"))         # (5, 0): longest prefix first
    index.longest(ip_address("192.0.2.9"))      # 0
    index.matches(ip_address("192.0.2.7"), (3, 5))   # True: a network tagged 5 holds it
    len(index)                                  # 2

DESCRIPTION
    A tag is an int from 0 to 2**32 - 1 that the caller gives each network,
    typically the position of an entry in a table of its own or the number
    of a domain. One network may carry several tags (one allowlist network
    for many domains); the same (network, tag) given twice counts once.

    Groups. Entries are grouped by address family and prefix length. A
    group holds two parallel arrays (module `array`, not lists of int
    objects): the network addresses, sorted, and their tags, sorted within
    one network. An IPv4 entry costs 8 bytes, an IPv6 one 12 (up to /64,
    where only the upper half of the address counts) or 20. To find the
    networks of a group that hold an address, the group compares the
    leading bits all its networks share (a group of clustered networks is
    often done there), reads where the address's bucket starts and ends
    (up to 2**16 buckets of a few entries each) and bisects only that.

    Levels. A lookup would try every group of its family, and real
    allowlists have a dozen prefix lengths. So groups are gathered in
    levels (IPv4: /24 to /32, /16 to /23, the rest; IPv6: /48 to /128,
    /32 to /47, the rest), and a level has a bitmap of the blocks its
    networks cover: blocks of the first 24 bits of the address, fewer for
    a level of few networks, so that a bitmap costs at most 2 MiB and 64
    bytes per network. An address whose block has no bit set skips the
    level's groups: most clients, being in no allowlist, cost a bit test
    per level. In a level of several groups, each group has a bitmap of
    its own too, of at most 8 bytes per network (blocks no shorter than
    its prefix): an address that passes the level's bitmap costs a bit
    test per group, and a bisect only in the groups likely to hold it.

    Building. from_blocks() takes networks as SQLite can hand them over in
    bulk (sqlitestore.py): per family and prefix length, one byte string of
    fixed-size records, cut into arrays by slicing, not by a Python loop
    over the entries. from_packed() takes one network at a time, for
    small tables and tests.

    IPv4-mapped IPv6 addresses and networks (::ffff:192.0.2.0/120) are
    IPv4, as everywhere in relaymilter (address.normalise_ip, parse_network).
    Host bits are ignored by from_packed(): 192.0.2.7/24 is 192.0.2.0/24.

    Built once, never changed: readers in any thread may share an index.
"""

from __future__ import annotations

import ipaddress
import operator
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Collection, Iterable
from itertools import chain, islice, repeat

from relaymilter.address import IPAddress


MAX_TAG = 2**32 - 1
TAG_BYTES = 4
MAX_BUCKET_BITS = 16        # 65,537 offsets (256 KiB) for the biggest groups
ENTRIES_PER_BUCKET = 16     # aimed at: a bisect of 4 or 5 steps
LEVELS = {4: (24, 16), 6: (48, 32)}     # the shortest prefix length of each level
MAX_BITMAP_BITS = 24        # a level's bitmap of blocks: at most 2 MiB,
BITMAP_BITS_PER_ENTRY = 512     # and 64 bytes per network
GROUP_BITMAP_BITS_PER_ENTRY = 64    # a group's own bitmap: at most 8 bytes per network
_HALF_MASK = 2**64 - 1
_V4_MAPPED = 0xFFFF         # ::ffff:0:0/96, shifted right by 32
_SWAP = sys.byteorder == "little"   # records and arrays meet in big-endian order


def _typecode(size: int) -> str:
    """The array type code of unsigned ints of exactly `size` bytes."""
    return next(code for code in "BHILQ" if array(code).itemsize == size)


_U32 = _typecode(4)
_U64 = _typecode(8)

# A group is a tuple, unpacked in one step on the lookup path:
#   (span function, prefix length, shift, mask, low_bits, common, bucket_shift,
#    bucket_mask, offsets, keys, tags, low, low_mask)
# The key of an address is (int(address) >> shift) & mask. Only groups of
# IPv6 networks longer than /64 have low and low_mask (else None).
_KEYS, _TAGS = 9, 10


def _narrow_span(group: tuple, value: int) -> tuple[int, int]:
    """The positions [start, end) of the group's networks holding value."""
    _, _, shift, mask, low_bits, common, bucket_shift, bucket_mask, offsets, keys, _, _, _ = group
    key = (value >> shift) & mask
    if key >> low_bits != common:
        return 0, 0
    bucket = (key >> bucket_shift) & bucket_mask
    last = offsets[bucket + 1]
    start = bisect_left(keys, key, offsets[bucket], last)
    if start == last or keys[start] != key:
        return 0, 0
    return start, bisect_right(keys, key, start, last)


def _wide_span(group: tuple, value: int) -> tuple[int, int]:
    """_narrow_span() over the upper halves, then a bisect of the lower ones."""
    first, last = _narrow_span(group, value)
    if first == last:
        return 0, 0
    low, low_mask = group[11], group[12]
    low_key = value & low_mask
    start = bisect_left(low, low_key, first, last)
    if start == last or low[start] != low_key:
        return 0, 0
    return start, bisect_right(low, low_key, start, last)


def _group(prefixlen: int, shift: int, mask: int, keys: array, tags: array,
           wide: tuple = (None, None)) -> tuple:
    """A group (see above) of sorted keys sharing their leading `common` bits,
    the next ones picking a bucket: keys[offsets[b]:offsets[b + 1]]."""
    count = len(keys)
    low_bits = (keys[0] ^ keys[-1]).bit_length()
    common = keys[0] >> low_bits
    bucket_bits = min(low_bits, MAX_BUCKET_BITS,
                      max(0, (count // ENTRIES_PER_BUCKET).bit_length()))
    bucket_shift = low_bits - bucket_bits
    base = common << low_bits
    offsets = array(_U32, [bisect_left(keys, base | bucket << bucket_shift)
                           for bucket in range(1 << bucket_bits)])
    offsets.append(count)
    span = _narrow_span if wide[0] is None else _wide_span
    return (span, prefixlen, shift, mask, low_bits, common, bucket_shift,
            (1 << bucket_bits) - 1, offsets, keys, tags) + wide


def _increasing(rows: Callable[[], Iterable]) -> bool:
    """Strictly increasing (sorted, no repeats); rows() makes a fresh iterator
    each call. map() and all() run in C."""
    return all(map(operator.lt, rows(), islice(rows(), 1, None)))


def _field(data: bytes, size: int, offset: int, width: int) -> bytes:
    """Bytes offset .. offset + width of every size-byte record, concatenated:
    a column of fixed-size records, cut out by slices (in C)."""
    column = bytearray(len(data) // size * width)
    for byte in range(width):
        column[byte::width] = data[offset + byte::size]
    return bytes(column)


def _uints(raw: bytes, code: str) -> array:
    """Big-endian unsigned ints -> an array of them."""
    values = array(code, raw)
    if _SWAP:
        values.byteswap()
    return values


def _ipv4_group(prefixlen: int, data: bytes) -> tuple:
    """Records of 4 + 4 bytes, read as one big-endian 64-bit int each (address,
    then tag), so that arrays do the work: no Python object per entry unless
    the records come unsorted or repeated."""
    combined = _uints(data, _U64)
    if not _increasing(combined.__iter__):
        combined = array(_U64, sorted(set(combined)))
        if _SWAP:
            combined.byteswap()
        data = combined.tobytes()
    keys, tags = _uints(_field(data, 8, 0, 4), _U32), _uints(_field(data, 8, 4, 4), _U32)
    return _group(prefixlen, 0, 0xFFFFFFFF ^ ((1 << (32 - prefixlen)) - 1), keys, tags)


def _ipv6_group(prefixlen: int, data: bytes) -> tuple:
    """Records of 16 + 4 bytes: upper and lower half of the address, and tag."""
    size = 16 + TAG_BYTES
    high, low = _uints(_field(data, size, 0, 8), _U64), _uints(_field(data, size, 8, 8), _U64)
    tags = _uints(_field(data, size, 16, TAG_BYTES), _U32)
    if not _increasing(lambda: zip(high, low, tags)):
        entries = sorted(set(zip(high, low, tags)))
        high = array(_U64, [entry[0] for entry in entries])
        low = array(_U64, [entry[1] for entry in entries])
        tags = array(_U32, [entry[2] for entry in entries])
    if prefixlen <= 64:
        # Only the upper half counts (the lower half is host bits).
        return _group(prefixlen, 64, _HALF_MASK ^ ((1 << (64 - prefixlen)) - 1), high, tags)
    low_mask = _HALF_MASK ^ ((1 << (128 - prefixlen)) - 1)
    return _group(prefixlen, 64, _HALF_MASK, high, tags, (low, low_mask))


def _levels(version: int, groups: list[tuple]) -> tuple:
    """Groups (longest prefix first) -> ((bitmap, shift, members), ...): the
    block of an address is int(address) >> shift. A member is (bitmap,
    shift, group): the group's own bitmap when the level has several groups,
    else (None, 0, group)."""
    bits = 32 if version == 4 else 128
    levels = []
    for level in (*LEVELS[version], 0):
        members = [group for group in groups if group[1] >= level]
        groups = groups[len(members):]
        if not members:
            continue
        entries = sum(len(member[_KEYS]) for member in members)
        bitmap, shift = _bitmap(bits, members, entries * BITMAP_BITS_PER_ENTRY, MAX_BITMAP_BITS)
        if len(members) == 1:
            own = ((None, 0, members[0]),)
        else:
            # Most addresses that pass the level's bitmap are in at most one
            # of its groups: a bit test each spares the others' bisects.
            own = tuple(_bitmap(bits, [member], len(member[_KEYS]) * GROUP_BITMAP_BITS_PER_ENTRY,
                                max(3, min(MAX_BITMAP_BITS, member[1]))) + (member,)
                        for member in members)
        levels.append((bitmap, shift, own))
    return tuple(levels)


def _bitmap(bits: int, members: list[tuple], wanted_bits: int, max_bits: int
            ) -> tuple[bytearray, int]:
    """A bitmap of the blocks the members' networks cover, of about
    wanted_bits bits (a power of 2, 2**3 to 2**max_bits), and the shift that
    makes an address its block."""
    block_bits = max(3, min(max_bits, wanted_bits.bit_length() - 1))
    bitmap = bytearray(1 << block_bits >> 3)
    for member in members:
        # A group's keys are its addresses shifted right by member[2]: a
        # further shift gives the (first) block of each.
        shift = bits - block_bits - member[2]
        if member[1] >= block_bits:
            _set_bits(bitmap, member[_KEYS], shift)
        else:
            _set_ranges(bitmap, map(operator.rshift, member[_KEYS], repeat(shift)),
                        1 << (block_bits - member[1]))
    return bitmap, bits - block_bits


def _set_bits(bitmap: bytearray, keys: Iterable[int], shift: int) -> None:
    """Bit k set for the block k = key >> shift of every key: the one loop
    in Python over the entries of a load (twice: level and group bitmaps),
    worth it, as it saves most lookups every bisect. Bytes and bits are
    worked out by map() in C: the loop only ORs."""
    bytes_ = map(operator.rshift, keys, repeat(shift + 3))
    bits = map(_BIT.__getitem__, map(operator.and_, map(operator.rshift, keys, repeat(shift)),
                                     repeat(7)))
    for byte, bit in zip(bytes_, bits):
        bitmap[byte] |= bit


def _set_ranges(bitmap: bytearray, firsts: Iterable[int], count: int) -> None:
    """Bits first .. first + count - 1 set for every first (count: a power of 2)."""
    if count >= 8:
        ones = b"\xff" * (count >> 3)
        for first in firsts:
            bitmap[first >> 3:(first >> 3) + len(ones)] = ones
    else:
        for first in firsts:
            bitmap[first >> 3] |= ((1 << count) - 1) << (first & 7)


_BIT = [1 << bit for bit in range(8)]


class NetworkIndex:
    """See the module docstring. Build with from_packed() or from_blocks()."""

    __slots__ = ("_families", "_size")

    def __init__(self, families: dict[int, tuple], size: int) -> None:
        self._families = families      # 4 and 6 -> levels, longest prefixes first
        self._size = size

    # ------------------------------------------------------------ building ---

    @classmethod
    def from_packed(cls, entries: Iterable[tuple[bytes, int, int]]) -> "NetworkIndex":
        """An index of (packed network address, prefix length, tag) triples.

        The address is 4 or 16 bytes; host bits are cleared, IPv4-mapped
        IPv6 becomes IPv4.
        """
        blocks: dict[tuple[int, int], list[bytes]] = {}
        for packed, prefixlen, tag in entries:
            bits = len(packed) * 8
            value = int.from_bytes(packed, "big")
            if bits == 128 and prefixlen >= 96 and value >> 32 == _V4_MAPPED:
                bits, prefixlen, value = 32, prefixlen - 96, value & 0xFFFFFFFF
            if bits not in (32, 128) or not 0 <= prefixlen <= bits:
                raise ValueError(f"not a network: {packed!r}/{prefixlen}")
            if not 0 <= tag <= MAX_TAG:
                raise ValueError(f"tag {tag} is outside 0..{MAX_TAG}")
            value &= ~((1 << (bits - prefixlen)) - 1)
            record = value.to_bytes(bits // 8, "big") + tag.to_bytes(TAG_BYTES, "big")
            blocks.setdefault((4 if bits == 32 else 6, prefixlen), []).append(record)
        return cls.from_blocks((version, prefixlen, b"".join(records))
                               for (version, prefixlen), records in blocks.items())

    @classmethod
    def from_blocks(cls, blocks: Iterable[tuple[int, int, bytes]]) -> "NetworkIndex":
        """An index of (version, prefix length, records) blocks, the bulk way in.

        records: the networks of that family and prefix length, each as its
        address (4 or 16 bytes, big-endian, host bits clear) followed by its
        tag (4 bytes, big-endian). Blocks of one family and prefix length may
        come in several pieces, in any order.
        """
        pieces: dict[tuple[int, int], list[bytes]] = {}
        for version, prefixlen, records in blocks:
            bits = {4: 32, 6: 128}.get(version)
            if bits is None or not 0 <= prefixlen <= bits:
                raise ValueError(f"not a network: IPv{version} /{prefixlen}")
            if len(records) % (bits // 8 + TAG_BYTES):
                raise ValueError(f"IPv{version} /{prefixlen}: records of "
                                 f"{bits // 8 + TAG_BYTES} bytes expected")
            if records:
                pieces.setdefault((version, prefixlen), []).append(records)
        groups: dict[int, list[tuple]] = {4: [], 6: []}
        for version, prefixlen in sorted(pieces, reverse=True):
            data = b"".join(pieces.pop((version, prefixlen)))
            make = _ipv4_group if version == 4 else _ipv6_group
            groups[version].append(make(prefixlen, data))
        size = sum(len(group[_TAGS]) for group in chain(*groups.values()))
        return cls({version: _levels(version, family) for version, family in groups.items()},
                   size)

    def __len__(self) -> int:
        """The number of distinct (network, tag) entries."""
        return self._size

    def __repr__(self) -> str:
        return f"<NetworkIndex of {self._size} networks>"

    # ------------------------------------------------------------- lookups ---

    def _levels(self, address: IPAddress) -> tuple[int, list]:
        """The address as an int, and the levels of its family."""
        # address.normalise_ip without making an object: ::ffff:0:0/96 is IPv4.
        value = int(address)
        if isinstance(address, ipaddress.IPv4Address):
            return value, self._families[4]
        if value >> 32 == _V4_MAPPED:
            return value & 0xFFFFFFFF, self._families[4]
        return value, self._families[6]

    def _candidates(self, address: IPAddress) -> tuple[int, list[tuple]]:
        """The address as an int, and the members (bitmap, shift, group) that
        may hold it, longest prefix first: those of each level whose bitmap
        has the address's block."""
        value, levels = self._levels(address)
        candidates: list[tuple] = []
        for bitmap, shift, groups in levels:
            block = value >> shift
            if not bitmap[block >> 3] >> (block & 7) & 1:
                continue
            candidates.extend(groups)
        return value, candidates

    def tags(self, address: IPAddress) -> tuple[int, ...]:
        """The tag of every network holding address: longest prefix first, then by tag."""
        if not self._size:
            return ()
        value, candidates = self._candidates(address)
        found: list[int] = []
        for bitmap, shift, group in candidates:
            if bitmap is not None:
                block = value >> shift
                if not bitmap[block >> 3] >> (block & 7) & 1:
                    continue
            start, end = group[0](group, value)
            found.extend(group[_TAGS][start:end])
        return tuple(found)

    def longest(self, address: IPAddress) -> int | None:
        """The tag of the longest network holding address (its lowest tag), or None."""
        return self._first(address, None) if self._size else None

    def matches(self, address: IPAddress, wanted: Collection[int]) -> bool:
        """True when a network holding address carries one of the wanted tags.

        Cheaper than scanning tags() when one network carries many tags (an
        allowlist network shared by thousands of domains): each wanted tag
        is bisected among the tags of each holding network.
        """
        return bool(wanted) and self._size > 0 and self._first(address, wanted) is not None

    def _first(self, address: IPAddress, wanted: Collection[int] | None) -> int | None:
        """The first tag found, longest prefix first: any (wanted None) or a
        wanted one. _candidates() and _narrow_span() written out, as this is
        the hot path."""
        value, levels = self._levels(address)
        for bitmap, shift, members in levels:
            block = value >> shift
            if not bitmap[block >> 3] >> (block & 7) & 1:
                continue
            for bitmap, shift, group in members:
                if bitmap is not None:
                    block = value >> shift
                    if not bitmap[block >> 3] >> (block & 7) & 1:
                        continue
                (span, _, shift, mask, low_bits, common, bucket_shift, bucket_mask, offsets,
                 keys, tags, low, _) = group
                if low is None:
                    key = (value >> shift) & mask
                    if key >> low_bits != common:
                        continue
                    bucket = (key >> bucket_shift) & bucket_mask
                    end = offsets[bucket + 1]
                    start = bisect_left(keys, key, offsets[bucket], end)
                    if start == end or keys[start] != key:
                        continue
                    if wanted is None:
                        return tags[start]
                    if start + 1 == end or keys[start + 1] != key:
                        # One tag, as most networks have.
                        if tags[start] in wanted:
                            return tags[start]
                        continue
                    end = bisect_right(keys, key, start + 1, end)
                else:
                    start, end = span(group, value)
                    if start == end:
                        continue
                    if wanted is None:
                        return tags[start]
                for tag in wanted:
                    position = bisect_left(tags, tag, start, end)
                    if position < end and tags[position] == tag:
                        return tag
        return None

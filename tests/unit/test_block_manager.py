"""BlockManager on its own (no model, no torch): allocation, reference counts, prefix
registration, LRU eviction, duplicates, fork; and, over random operation sequences, that no
block is leaked, freed twice or shared with a table whose tokens it does not hold."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tokenwire_server.engine import block_manager
from tokenwire_server.engine.block_manager import BlockManager, BlockTable, block_key

BS = 2  # small blocks: prefixes are shared and evicted often


def computed(bm: BlockManager, tokens: list[int], n: int) -> BlockTable:
    """A table whose first n tokens are computed and registered, as the engine leaves it."""
    table = bm.match_prefix(tokens, n)
    assert bm.allocate(table, n)
    bm.register(table, tokens, n)
    return table


def test_allocate_grows_by_whole_blocks_and_takes_nothing_when_short():
    bm = BlockManager(4, BS)
    t = BlockTable()
    assert bm.allocate(t, 3) and len(t.blocks) == 2
    assert bm.allocate(t, 4) and len(t.blocks) == 2  # the second block had room
    assert [bm.blocks[b].ref_count for b in t.blocks] == [1, 1]
    assert bm.num_free == 2 and bm.num_used == 2 and bm.usage == 0.5
    other = BlockTable()
    assert not bm.allocate(other, 5)  # needs 3 blocks, 2 are free
    assert other.blocks == [] and bm.num_free == 2
    assert bm.blocks_needed(t, 9) == 3


def test_free_gives_every_block_back_and_clears_the_table():
    bm = BlockManager(4, BS)
    t = computed(bm, [1, 2, 3, 4, 5], 5)
    assert bm.num_free == 1
    bm.free(t)
    assert t.blocks == [] and t.keys == []
    assert bm.num_free == 4 and all(b.ref_count == 0 for b in bm.blocks)
    bm.free(t)  # an empty table frees nothing
    assert bm.num_free == 4


def test_match_prefix_shares_registered_blocks_with_reference_counts():
    bm = BlockManager(8, BS)
    a = computed(bm, [1, 2, 3, 4, 5], 5)
    b = bm.match_prefix([1, 2, 3, 4, 9, 9], 5)
    assert b.blocks == a.blocks[:2] and b.keys == a.keys[:2]  # whole blocks only; [5] is not full
    assert [bm.blocks[i].ref_count for i in a.blocks] == [2, 2, 1]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.blocks] == [1, 1]
    assert bm.num_used == 2
    bm.free(b)
    assert bm.num_free == 8


def test_match_prefix_stops_at_the_first_difference_and_at_max_tokens():
    bm = BlockManager(8, BS)
    a = computed(bm, [1, 2, 3, 4, 5, 6], 6)
    assert bm.match_prefix([1, 2, 3, 4, 5, 6], 3).blocks == a.blocks[:1]  # at most 3 tokens: one block
    assert bm.match_prefix([1, 2, 0, 4, 5, 6], 6).blocks == a.blocks[:1]
    assert bm.match_prefix([0, 2, 3, 4, 5, 6], 6).blocks == []
    # A block's key includes its prefix: the same two tokens after another prefix are not a hit.
    assert bm.match_prefix([3, 4], 2).blocks == []


def test_a_key_names_its_whole_prefix(monkeypatch):
    """Prefixes whose keys collide share cached blocks: a prompt crafted to collide with a common
    prefix (a system prompt) would serve its own keys and values to every later request with
    that prefix. Keys once held Python's hash() of the parent key, which can be inverted; make
    hash() collide everywhere to stand in for such a prompt."""
    monkeypatch.setattr(block_manager, "hash", lambda _: 0, raising=False)
    bm = BlockManager(8, BS)
    computed(bm, [1, 2, 9], 3)  # a common prefix, cached
    computed(bm, [3, 4, 5, 6, 7], 5)  # the attacker's [5, 6] follows [3, 4]
    assert len(bm.match_prefix([1, 2, 5, 6, 7], 4).blocks) == 1  # [5, 6] after [1, 2] was never computed


def test_register_skips_partial_and_uncomputed_blocks():
    bm = BlockManager(8, BS)
    t = BlockTable()
    assert bm.allocate(t, 5)
    bm.register(t, [1, 2, 3, 4, 5], 3)  # only the first block is full and computed
    assert len(t.keys) == 1 and bm.blocks[t.blocks[1]].key is None
    bm.register(t, [1, 2, 3, 4, 5], 5)
    assert len(t.keys) == 2 and bm.blocks[t.blocks[2]].key is None
    assert bm.match_prefix([1, 2, 3, 4, 5], 5).blocks == t.blocks[:2]


def test_no_prefix_caching():
    bm = BlockManager(4, BS, prefix_caching=False)
    t = computed(bm, [1, 2, 3, 4], 4)
    assert t.keys == [] and all(b.key is None for b in bm.blocks)
    assert bm.match_prefix([1, 2, 3, 4], 4).blocks == []
    bm.free(t)
    assert len(bm._free) == 4 and not bm._evictable


def test_unused_prefixes_are_evicted_least_recently_used_first():
    bm = BlockManager(6, BS)
    a = computed(bm, [1, 1, 1, 1], 4)
    b = computed(bm, [2, 2, 2, 2], 4)
    a_blocks, b_blocks = list(a.blocks), list(b.blocks)
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 6 and len(bm._evictable) == 4
    # Touch a's head: taken and given back, it becomes the most recently used.
    bm.free(bm.match_prefix([1, 1], 2))
    t = BlockTable()
    assert bm.allocate(t, 4)  # the two never-registered blocks first
    assert not set(t.blocks) & set(a_blocks + b_blocks)
    assert bm.allocate(t, 6)  # then a's tail: a was freed first (tail before head), and its head was touched
    assert t.blocks[-1] == a_blocks[1]
    assert bm.allocate(t, 10)
    assert t.blocks[-2:] == [b_blocks[1], b_blocks[0]]  # b's tail, then b's head
    assert bm.match_prefix([2, 2, 2, 2], 4).blocks == []
    assert bm.match_prefix([1, 1, 1, 1], 4).blocks == a_blocks[:1]  # a's head survived


def test_a_block_in_use_is_never_evicted():
    bm = BlockManager(3, BS)
    a = computed(bm, [1, 1, 2, 2], 4)
    t = BlockTable()
    assert bm.allocate(t, 2)
    assert not bm.allocate(t, 4)  # a's blocks are registered but held
    assert [bm.blocks[i].ref_count for i in a.blocks] == [1, 1]


def test_a_duplicate_computed_in_parallel_stays_private():
    bm = BlockManager(8, BS)
    tokens = [1, 2, 3, 4]
    a, b = BlockTable(), BlockTable()
    assert bm.allocate(a, 4) and bm.allocate(b, 4)  # both computed before either registered
    bm.register(a, tokens, 4)
    bm.register(b, tokens, 4)
    assert b.keys == a.keys  # b's later blocks still chain on the shared keys
    assert all(bm.blocks[i].key is None for i in b.blocks)
    assert all(bm._by_key[k] in a.blocks for k in a.keys)
    # b's own next block registers under the same chain: found after a's prefix.
    assert bm.allocate(b, 6)
    bm.register(b, tokens + [5, 6], 6)
    hit = bm.match_prefix(tokens + [5, 6], 6)
    assert hit.blocks == a.blocks + b.blocks[2:]
    bm.free(hit)
    duplicates, third = b.blocks[:2], b.blocks[2]
    bm.free(b)
    assert set(duplicates) <= set(bm._free)  # private duplicates are plain free blocks
    assert list(bm._evictable) == [third]
    bm.free(a)
    assert bm.num_free == 8 and len(bm._evictable) == 3


def test_fork_shares_the_first_blocks():
    bm = BlockManager(8, BS)
    parent = computed(bm, [1, 2, 3, 4, 5], 5)
    child = bm.fork(parent, 2)
    assert child.blocks == parent.blocks[:2] and child.keys == parent.keys[:2]
    assert [bm.blocks[i].ref_count for i in parent.blocks] == [2, 2, 1]
    assert bm.allocate(child, 6)
    assert child.blocks[2] not in parent.blocks
    bm.free(parent)
    assert [bm.blocks[i].ref_count for i in child.blocks] == [1, 1, 1]
    bm.free(child)
    assert bm.num_free == 8


# ---- invariants over random operation sequences ----

def prefix_keys(tokens: list[int], bs: int) -> list[bytes]:
    """The registration key of each full block of `tokens`."""
    keys, parent = [], None
    for i in range(len(tokens) // bs):
        parent = block_key(parent, tokens[i * bs:(i + 1) * bs])
        keys.append(parent)
    return keys


def check_blocks(bm: BlockManager, tables: list[BlockTable]) -> None:
    """Each block is in exactly one of free / evictable / held; reference counts equal the
    tables holding the block; registered keys and blocks point at each other."""
    free, evictable = list(bm._free), list(bm._evictable)
    assert len(set(free)) == len(free), "a block was freed twice"
    holders = {}
    for t in tables:
        assert len(set(t.blocks)) == len(t.blocks), "a table holds a block twice"
        for b in t.blocks:
            holders[b] = holders.get(b, 0) + 1
    assert not set(free) & set(evictable)
    assert not (set(free) | set(evictable)) & set(holders)
    assert set(free) | set(evictable) | set(holders) == set(range(bm.num_blocks)), "a block leaked"
    for block in bm.blocks:
        assert block.ref_count == holders.get(block.id, 0)
    assert all(bm.blocks[b].key is None for b in free)
    assert all(bm.blocks[b].key is not None for b in evictable)
    for key, b in bm._by_key.items():
        assert bm.blocks[b].key == key
    for block in bm.blocks:
        assert block.key is None or bm._by_key[block.key] == block.id
    assert bm.num_free == len(free) + len(evictable)


@dataclass(eq=False)
class Holder:
    """A table, as a sequence holds it: its tokens and how many are computed (in the cache)."""
    table: BlockTable
    tokens: list[int]
    computed: int = 0


tokens_st = st.lists(st.integers(0, 1), min_size=1, max_size=9)  # few symbols: many shared prefixes


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives a BlockManager as the scheduler does, and tracks what each cache slot holds (the
    tokens whose keys and values were written there) to check that sharing never mixes prefixes."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(5, BS)
        self.holders: list[Holder] = []
        self.slots: dict[tuple[int, int], tuple] = {}  # (block, offset) -> the prefix written there

    def pick(self, i: int) -> Holder:
        return self.holders[i % len(self.holders)]

    @precondition(lambda self: len(self.holders) < 4)  # few at once: blocks cycle through free and evictable
    @rule(tokens=tokens_st, cached=st.booleans())
    def start(self, tokens, cached):
        limit = len(tokens) - 1  # the last position's logits are needed: never cached
        table = self.bm.match_prefix(tokens, limit) if cached else BlockTable()
        self.holders.append(Holder(table, tokens, len(table.blocks) * BS))

    @precondition(lambda self: self.holders)
    @rule(i=st.integers(0, 99), n=st.integers(1, 4), register=st.booleans())
    def compute(self, i, n, register):
        h = self.pick(i)
        end = min(len(h.tokens), h.computed + n)
        before, free = list(h.table.blocks), self.bm.num_free
        if not self.bm.allocate(h.table, end):
            assert h.table.blocks == before and self.bm.blocks_needed(h.table, end) > free
            return
        for pos in range(h.computed, end):  # the model writes these slots
            self.slots[h.table.blocks[pos // BS], pos % BS] = tuple(h.tokens[:pos + 1])
        h.computed = end
        if register:  # as the engine does after each step
            self.bm.register(h.table, h.tokens, h.computed)

    @precondition(lambda self: self.holders)
    @rule(i=st.integers(0, 99), upto=st.integers(0, 9))
    def register(self, i, upto):
        h = self.pick(i)
        self.bm.register(h.table, h.tokens, min(upto, h.computed))

    @precondition(lambda self: self.holders)
    @rule(i=st.integers(0, 99), more=st.lists(st.integers(0, 1), min_size=1, max_size=3))
    def append(self, i, more):
        h = self.pick(i)
        if h.computed == len(h.tokens):  # a token is sampled once every earlier one is computed
            h.tokens = h.tokens + more[:1]

    @precondition(lambda self: 0 < len(self.holders) < 4)
    @rule(i=st.integers(0, 99), k=st.integers(0, 4), rest=st.lists(st.integers(0, 1), max_size=4))
    def fork(self, i, k, rest):
        parent = self.pick(i)
        k = min(k, parent.computed // BS)  # full, computed blocks only
        child = self.bm.fork(parent.table, k)
        self.holders.append(Holder(child, parent.tokens[:k * BS] + rest or [0], k * BS))

    @precondition(lambda self: self.holders)
    @rule(i=st.integers(0, 99))
    def free(self, i):
        h = self.pick(i)
        self.holders.remove(h)
        self.bm.free(h.table)
        assert h.table.blocks == [] and h.table.keys == []

    @invariant()
    def blocks_are_accounted_for(self):
        check_blocks(self.bm, [h.table for h in self.holders])

    @invariant()
    def tables_hold_their_own_prefixes(self):
        for h in self.holders:
            assert len(h.table.blocks) * BS >= h.computed
            for pos in range(h.computed):
                assert self.slots[h.table.blocks[pos // BS], pos % BS] == tuple(h.tokens[:pos + 1])
            assert len(h.table.keys) <= h.computed // BS
            assert h.table.keys == prefix_keys(h.tokens, BS)[:len(h.table.keys)]

    @invariant()
    def registered_blocks_hold_their_key(self):
        for key, b in self.bm._by_key.items():
            prefix = self.slots[b, BS - 1]
            assert prefix_keys(list(prefix), BS)[-1] == key
            assert all(self.slots[b, j] == prefix[:len(prefix) - BS + j + 1] for j in range(BS))

    def teardown(self):
        for h in self.holders:
            self.bm.free(h.table)
        check_blocks(self.bm, [])
        assert self.bm.num_free == self.bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestBlockManagerInvariants = BlockManagerMachine.TestCase

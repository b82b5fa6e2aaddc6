"""BlockManager: the paged KV cache's bookkeeping, in plain Python (no torch).

The cache is `num_blocks` blocks of `block_size` token slots. A sequence owns a block table
(list of block ids); slot = block * block_size + offset. Full blocks whose tokens are computed
are registered under a key naming their whole prefix (block_key), so a later sequence with
the same prefix shares them (prefix caching). Shared blocks are reference-counted; a block
nobody uses but that still holds a registered prefix is kept, evictable in least-recently-used
order, until its memory is needed."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field


def block_key(parent: bytes | None, tokens: list[int]) -> bytes:
    """A full block's key: a SHA-256 digest of its parent's key and its own tokens, so of its
    whole prefix. Not Python's hash(): tuple hashing can be inverted, and a prompt crafted to
    collide with another prefix's key would be served that prefix's cached keys and values."""
    return hashlib.sha256((parent or bytes(32)) + array("I", tokens).tobytes()).digest()


@dataclass
class Block:
    id: int
    ref_count: int = 0
    key: bytes | None = None  # block_key, once full and computed


@dataclass
class BlockTable:
    """What one sequence holds: its blocks, and the keys of its full, registered blocks."""

    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # hold no registered prefix
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unused, still registered (LRU first)
        self._by_key: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, or evictable cached prefixes)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by sequences (cached prefixes nobody holds are not counted)."""
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_needed(self, table: BlockTable, num_tokens: int) -> int:
        """Blocks to add so `table` has slots for `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table.blocks))

    def match_prefix(self, tokens: list[int], max_tokens: int) -> BlockTable:
        """Take the registered blocks that hold a prefix of `tokens` (at most `max_tokens`
        tokens, whole blocks only). Returns a table holding them (references taken)."""
        table = BlockTable()
        if not self.prefix_caching:
            return table
        parent = None
        for start in range(0, max_tokens - self.block_size + 1, self.block_size):
            key = block_key(parent, tokens[start:start + self.block_size])
            block_id = self._by_key.get(key)
            if block_id is None:
                break
            self._take(block_id)
            table.blocks.append(block_id)
            table.keys.append(key)
            parent = key
        return table

    def fork(self, table: BlockTable, num_blocks: int) -> BlockTable:
        """A new table sharing the first `num_blocks` (full, computed) blocks of `table`."""
        child = BlockTable(table.blocks[:num_blocks], table.keys[:num_blocks])
        for block_id in child.blocks:
            self._take(block_id)
        return child

    def allocate(self, table: BlockTable, num_tokens: int) -> bool:
        """Grow `table` to hold `num_tokens` slots. False (and nothing taken) when memory is short."""
        need = self.blocks_needed(table, num_tokens)
        if need > self.num_free:
            return False
        for _ in range(need):
            if self._free:
                block_id = self._free.popleft()
            else:  # reuse the least recently used cached prefix
                block_id, _ = self._evictable.popitem(last=False)
                del self._by_key[self.blocks[block_id].key]
                self.blocks[block_id].key = None
            self.blocks[block_id].ref_count = 1
            table.blocks.append(block_id)
        return True

    def register(self, table: BlockTable, tokens: list[int], num_computed: int) -> None:
        """Register the full blocks among the first `num_computed` tokens, so others can share them."""
        if not self.prefix_caching:
            return
        for i in range(len(table.keys), num_computed // self.block_size):
            parent = table.keys[-1] if table.keys else None
            key = block_key(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self.blocks[table.blocks[i]]
            existing = self._by_key.get(key)
            if existing is None and block.key is None:
                block.key = key
                self._by_key[key] = block.id
            table.keys.append(key)  # a duplicate computed in parallel stays private

    def free(self, table: BlockTable) -> None:
        """Give back a sequence's blocks (newest first, so a prefix's tail is evicted before its head)."""
        for block_id in reversed(table.blocks):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
        table.blocks.clear()
        table.keys.clear()

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._evictable[block_id]
        block.ref_count += 1

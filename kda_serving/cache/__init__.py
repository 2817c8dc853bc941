"""Cache bookkeeping for the engine: state slots, paged KV blocks and the prefix cache (plain Python, no torch)."""

from .kv_blocks import KVBlockManager
from .prefix_cache import CacheNode, PrefixCache, PrefixHit
from .state_slots import StateSlotPool

__all__ = ["CacheNode", "KVBlockManager", "PrefixCache", "PrefixHit", "StateSlotPool"]

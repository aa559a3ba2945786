"""Parsed LoRA files, cached per process (V3 nodes hold no instance state; one cache serves every node).

The key is (path, mtime, size, options): a file replaced on disk is parsed again. Entries that a MODEL
still merges stay alive through its stack regardless of this cache's size.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import OrderedDict

from ..lora_ops import LoRAFile, load_lora

log = logging.getLogger("flux_lora_ops")

MAX_CACHED = int(os.environ.get("FLUX_LORA_OPS_CACHE_FILES", "8"))

_cache: OrderedDict[tuple, tuple[LoRAFile, tuple[str, ...]]] = OrderedDict()
_lock = threading.Lock()


def file_key(path: str, legacy_split_qkv: bool = False) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size, bool(legacy_split_qkv))


def load_cached(path: str, legacy_split_qkv: bool = False) -> tuple[LoRAFile, tuple[str, ...]]:
    """The parsed file and the warnings its parsing gave (each warning text once)."""
    key = file_key(path, legacy_split_qkv)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora = load_lora(path, legacy_split_qkv=legacy_split_qkv)
    messages = tuple(dict.fromkeys(str(w.message) for w in caught))
    for m in messages:
        log.warning("Flux LoRA Ops: %s", m)
    with _lock:
        _cache[key] = (lora, messages)
        while len(_cache) > MAX_CACHED:
            _cache.popitem(last=False)
    return lora, messages


def clear() -> None:
    with _lock:
        _cache.clear()

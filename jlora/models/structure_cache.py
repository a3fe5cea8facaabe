"""Values built once per model structure: an nnx graphdef, which compares by equality but does not hash (a
LoRA model's graphdef holds its LoraConfig), so no dict or functools.cache can key on it.

    cache.get(graphdef, build)   the value built for an equal graphdef, else build() (kept); most recent last,
                                 the `keep` most recently used are kept
"""
from __future__ import annotations

from typing import Any, Callable


class StructureCache:
    def __init__(self, keep: int = 8):
        self.keep = keep
        self._items: list[tuple[Any, Any]] = []

    def get(self, key, build: Callable[[], Any]):
        for i, (k, value) in enumerate(self._items):
            if k == key:
                self._items.append(self._items.pop(i))
                return value
        value = build()
        self._items.append((key, value))
        del self._items[:-self.keep]
        return value

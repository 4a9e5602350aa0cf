"""A real store with hooks: run a function before or after a named store call, to put a
deliberate delay, a pause or a failure exactly where a race needs it. Everything else goes to
the store unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Hook = Callable[..., None]


class HookedStore:
    def __init__(self, store: Any) -> None:
        self.store = store
        self.before: dict[str, Hook] = {}
        self.after: dict[str, Hook] = {}

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.store, name)
        if not callable(target) or (name not in self.before and name not in self.after):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            if name in self.before:
                self.before[name](*args, **kwargs)
            result = target(*args, **kwargs)
            if name in self.after:
                self.after[name](*args, **kwargs)
            return result

        return call

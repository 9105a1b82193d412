"""The one registry type behind ``METHODS`` and ``UTILITIES`` (mbrs keeps its metrics and
decoders the same way): a read-only name -> instance mapping with ``register`` and ``resolve``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Mapping[str, T], Generic[T]):
    """``kind`` names the entries in messages ("method", "utility"); ``coerce`` turns what is
    registered into an entry (e.g. a plain callable into a utility)."""

    def __init__(self, kind: str, coerce: Callable[[str, object], T] | None = None) -> None:
        self.kind = kind
        self._coerce = coerce
        self._items: dict[str, T] = {}

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def register(self, name: str, entry: object) -> T:
        """Add ``entry`` under ``name``; a name already taken is an error, never a replacement
        (two modules registering one name would otherwise decide by import order)."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        item = self._coerce(name, entry) if self._coerce else entry
        self._items[name] = item  # type: ignore[assignment]
        return item  # type: ignore[return-value]

    def check(self, name: str) -> str:
        """``name`` if registered, else ValueError("unknown <kind> ...; valid: ..."): the one
        message requests, settings and ``select`` give for a bad name."""
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self))}")
        return name

    def resolve(self, name: str) -> T:
        return self._items[self.check(name)]

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {sorted(self._items)})"

"""One name -> class table per extension point (methods, search variants, architecture-gradient
rules, task kinds): a decorator adds a class, an unknown name is refused naming the setting and
listing what is registered. Adding a method, a search variant or a task kind is one new file
whose class registers itself, plus a YAML."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T", bound=type)


class Registry(dict):
    """A table of registered classes (a plain dict underneath, so tests can snapshot it).

    Args:
        what: What an entry is, for messages (``method``, ``search variant``).
        setting: The setting that chooses one (``method``, ``search``, ``dam.arch_grad``).
        hint: Appended to the list of names in an unknown-name error (e.g. where the YAMLs are).
        also: Names the setting accepts besides the registered ones (``auto``).
    """

    def __init__(self, what: str, setting: str, hint: str = "", also: Sequence[str] = ()) -> None:
        super().__init__()
        self.what, self.setting, self.hint, self.also = what, setting, hint, tuple(also)

    def register(self, cls: T, name: str | None = None) -> T:
        """Adds ``cls`` under ``name`` (default: its ``name`` attribute).

        Raises:
            TypeError: No name. ValueError: Another class has the name already.
        """
        key = name or getattr(cls, "name", "")
        if not key:
            raise TypeError(f"{cls.__name__} has no name: set the class attribute `name`.")
        if key in self and self[key] is not cls:
            raise ValueError(f"{self.what} {key!r} is registered twice")
        self[key] = cls
        return cls

    def under(self, name: str) -> Callable[[T], T]:
        """Decorator registering a class under an explicit ``name``."""
        return lambda cls: self.register(cls, name)

    def names(self) -> list[str]:
        """The registered names, sorted (what the setting accepts)."""
        return sorted(self)

    def get(self, name: str) -> type:  # type: ignore[override]
        """The class registered under ``name``.

        Raises:
            ValueError: An unknown name; the message lists the registered ones.
        """
        try:
            return self[str(name)]
        except KeyError:
            choices = [*self.also, *self.names()]
            hint = f" {self.hint}" if self.hint else ""
            raise ValueError(
                f"{self.setting}={name!r}: unknown {self.what}; choose one of {choices}{hint}."
            ) from None

"""One registry type for everything the project looks up by name (big_vision's ``pp/registry.py`` idea).

Training schemes (:mod:`saliency_jax.training.scheme`), evaluators (:mod:`saliency_jax.evaluators.base`), models
(:mod:`saliency_jax.models`) and data sources (:mod:`saliency_jax.data.core`) each keep a :class:`Registry`; the
modules that define the entries register them, and the code that builds a run looks them up by the names in the
config. An entry is a value (a builder, a class, a loader) and keyword metadata (a scheme's settings dataclass, a
model's default layers, a trainer's ``check`` function)::

    TRAINING_SCHEMES = Registry("training scheme")

    @TRAINING_SCHEMES.register("distraction", settings=DistractionConfig)
    def distraction_scheme(settings, layers): ...

    TRAINING_SCHEMES.get("distraction")                   # the builder
    TRAINING_SCHEMES.metadata("distraction")["settings"]  # DistractionConfig
    TRAINING_SCHEMES.get("distractoin")
    # ValueError: unknown training scheme 'distractoin'; did you mean ['distraction']? (registered: [...])
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

__all__ = ["Registry", "Entry", "name_list", "TRAINING_SCHEMES", "EVALUATORS", "MODELS", "SOURCES", "TRAINERS"]


class Entry(NamedTuple):
    """A registered value and its metadata (a read-only mapping of the keywords given to :meth:`Registry.register`)."""

    value: Any
    metadata: Mapping[str, Any]


class Registry:
    """Values registered under names, with keyword metadata; one instance per kind of thing.

    Names are kept in registration order. Registering a second, different value under a name raises; registering
    the same value again replaces its metadata (a module imported twice under the same objects).

    Attributes:
      kind: what the entries are, in words (``"training scheme"``, ``"evaluator"``, ``"model"``, ``"data source"``,
        ``"trainer"``); it starts the error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, value: Any = None, **metadata) -> Any:
        """Registers ``value`` under ``name``; without ``value``, a decorator registering the decorated object.

        Args:
          name: the entry's name (a non-empty string).
          value: the entry's value (a builder, class or loader); None to use the method as a decorator.
          **metadata: keyword metadata kept with the entry (:meth:`metadata`).

        Returns:
          ``value`` itself, or (without ``value``) a decorator that registers and returns the object it decorates.

        Raises:
          ValueError: if another value is already registered under ``name``, or ``name`` is not a non-empty string.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty string name; got {name!r}")
        if value is None:
            def register(obj):
                self._add(name, obj, metadata)
                return obj

            return register
        self._add(name, value, metadata)
        return value

    def _add(self, name: str, value: Any, metadata: dict[str, Any]) -> None:
        if name in self._entries and self._entries[name].value is not value:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(value, types.MappingProxyType(dict(metadata)))

    def entry(self, name: str) -> Entry:
        """The :class:`Entry` (value and metadata) registered under ``name``.

        Raises:
          ValueError: on an unknown name: ``unknown <kind> 'x'; did you mean [...]? (registered: [...])`` (close
            matches by :func:`difflib.get_close_matches`, the registered names sorted).
        """
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), list(self._entries), n=3)
            raise ValueError(f"unknown {self.kind} {name!r}" + (f"; did you mean {close}?" if close else "")
                             + f" (registered: {sorted(self._entries)})")
        return self._entries[name]

    def get(self, name: str) -> Any:
        """The value registered under ``name``.

        Raises:
          ValueError: on an unknown name (see :meth:`entry`).
        """
        return self.entry(name).value

    def metadata(self, name: str) -> Mapping[str, Any]:
        """The metadata registered with ``name`` (read-only).

        Raises:
          ValueError: on an unknown name (see :meth:`entry`).
        """
        return self.entry(name).metadata

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def view(self, key: str) -> Mapping[str, Any]:
        """A live read-only mapping ``{name: metadata[key]}`` over the entries that have ``key`` in their metadata.

        Entries registered later show up in the view; e.g. ``GRAD_CAM_LAYER = MODELS.view("grad_cam_layer")``.
        """
        return _MetadataView(self, key)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={list(self._entries)})"


class _MetadataView(Mapping):
    """``{name: metadata[key]}`` of a registry, computed at each access (see :meth:`Registry.view`)."""

    def __init__(self, registry: Registry, key: str):
        self._registry = registry
        self._key = key

    def _items(self) -> dict[str, Any]:
        entries = ((name, self._registry.metadata(name)) for name in self._registry.names())
        return {name: metadata[self._key] for name, metadata in entries if self._key in metadata}

    def __getitem__(self, name: str) -> Any:
        return self._items()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return repr(self._items())


def name_list(value: Any) -> tuple[str, ...]:
    """A list of names from a config value: a tuple/list of names, or a comma-separated string (command line).

    Args:
      value: None, a string such as ``"hnc, distraction"``, or a sequence whose items may themselves be
        comma-separated strings.

    Returns:
      The names, stripped, empty ones dropped (``()`` for None).

    >>> name_list("hnc, distraction"), name_list(("a", "b,c")), name_list(None)
    (('hnc', 'distraction'), ('a', 'b', 'c'), ())
    """
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(n.strip() for item in items for n in str(item).split(",") if n.strip())


# The project's registries, one per kind of thing looked up by name. They live here, at the bottom of the import
# graph, so that any module can read what is registered (the launch history asks which config sections belong to
# schemes and evaluators) without importing the modules that register the entries.

TRAINING_SCHEMES = Registry("training scheme")
"""Training schemes (:func:`saliency_jax.training.register_scheme`): builders ``(settings, layers) -> Scheme``,
metadata ``settings`` (the settings dataclass of ``config.<name>``)."""

EVALUATORS = Registry("evaluator")
"""Evaluators (:func:`saliency_jax.evaluators.register_evaluator`): builders ``settings -> Evaluator``, metadata
``settings``."""

MODELS = Registry("model")
"""Model architectures (:mod:`saliency_jax.models`): classes, metadata ``grad_cam_layer`` and ``classifier``."""

SOURCES = Registry("data source")
"""Data sources (:mod:`saliency_jax.data`): loaders, registered by each dataset module."""

TRAINERS = Registry("trainer")
"""Trainers (:mod:`saliency_jax.trainers`): plan builders (:class:`saliency_jax.trainers.Trainer`)."""


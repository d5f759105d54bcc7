"""Value records: what ``@dataclass(frozen=True)`` gives, made without ``dataclasses``.

``@record`` turns a class of annotated fields into a value type: ``__init__`` (positional or
keyword, class-body defaults, ``field(factory=...)``), ``__repr__``, ``__eq__`` and ``__hash__`` over
the compared fields, ``__match_args__``, and no assignment after construction (``frozen=False``
allows it and drops ``__hash__``, as a dataclass does). ``replace``, ``asdict`` and
``field_names`` stand in for their ``dataclasses`` namesakes.

Why not ``dataclasses``: it writes every method of every class as source text and compiles it
(six ``exec`` calls per class), and importing it brings ``inspect``. The ~45 value classes that
``filedock upload`` loads (the wire events, the client's transfer steps and results, the limits)
cost ~30 ms of a ~0.1 s start-up that way (1 MiB upload, 20 pairs: 109 -> 89 ms). Here the
methods are shared functions reading the class's field table: a class costs microseconds to make,
an instance ~0.5 µs more to construct than a dataclass (none is made per byte: the server's ``Data``
events are one per read).

Kept from dataclasses: equality only between instances of the same class; fields in annotation
order, a record base's fields first; a method the class body defines itself is not replaced.
Not supported (none of our classes uses them): ``ClassVar``/``InitVar`` annotations,
``__post_init__``, ordering, slots.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["FrozenInstanceError", "asdict", "field", "field_names", "record", "replace"]

_MISSING: Any = object()


class FrozenInstanceError(AttributeError):
    """Assigning to (or deleting) an attribute of a frozen record."""


class _Field:
    __slots__ = ("default", "factory", "compare")

    def __init__(self, default: Any, factory: Callable[[], Any] | None, compare: bool) -> None:
        self.default, self.factory, self.compare = default, factory, compare


def field(*, default: Any = _MISSING, factory: Callable[[], Any] | None = None, compare: bool = True) -> Any:
    """A field with a per-instance ``factory`` default, or left out of ``==`` and ``hash``."""
    if default is not _MISSING and factory is not None:
        raise ValueError("a field takes a default or a factory, not both")
    return _Field(default, factory, compare)


class _Spec:
    """The field table one class's shared methods read."""

    __slots__ = ("names", "index", "defaults", "factories", "compared")

    def __init__(self, names: tuple[str, ...], defaults: dict[str, Any], factories: dict[str, Callable[[], Any]],
                 compared: tuple[str, ...]) -> None:
        self.names, self.defaults, self.factories, self.compared = names, defaults, factories, compared
        self.index = {name: i for i, name in enumerate(names)}


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    spec: _Spec = self.__record__
    names = spec.names
    if len(args) == len(names) and not kwargs:  # the common case, kept short: the server makes a Data per read
        self.__dict__.update(zip(names, args))
        return
    if len(args) > len(names):
        raise TypeError(f"{type(self).__name__}() takes {len(names)} positional arguments but {len(args)} were given")
    values = self.__dict__
    values.update(zip(names, args))
    if kwargs:
        index = spec.index
        for name in kwargs:
            at = index.get(name)
            if at is None:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
            if at < len(args):
                raise TypeError(f"{type(self).__name__}() got multiple values for argument {name!r}")
        values.update(kwargs)
    if len(values) < len(names):
        for name in names[len(args):]:
            if name not in values:
                if name in spec.factories:
                    values[name] = spec.factories[name]()
                elif name in spec.defaults:
                    values[name] = spec.defaults[name]
                else:
                    raise TypeError(f"{type(self).__name__}() missing required argument: {name!r}")


def _repr(self: Any) -> str:
    values = self.__dict__
    inner = ", ".join(f"{name}={values[name]!r}" for name in self.__record__.names)
    return f"{type(self).__qualname__}({inner})"


def _key(self: Any) -> tuple[Any, ...]:
    values = self.__dict__
    return tuple([values[name] for name in self.__record__.compared])


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _key(self) == _key(other)


def _hash(self: Any) -> int:
    return hash(_key(self))


def _frozen_setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def record(cls: type | None = None, *, frozen: bool = True) -> Any:
    """Make ``cls`` a value record (see the module's docstring); ``@record`` or ``@record(frozen=False)``."""
    if cls is None:
        return lambda c: _make(c, frozen)
    return _make(cls, frozen)


def _make(cls: type, frozen: bool) -> type:
    names: list[str] = []
    defaults: dict[str, Any] = {}
    factories: dict[str, Callable[[], Any]] = {}
    uncompared: set[str] = set()
    for base in reversed(cls.__mro__[1:]):
        spec = base.__dict__.get("__record__")
        if spec is not None:
            names += [n for n in spec.names if n not in names]
            defaults.update(spec.defaults)
            factories.update(spec.factories)
            uncompared.update(n for n in spec.names if n not in spec.compared)
    for name in cls.__dict__.get("__annotations__", {}):
        if name not in names:
            names.append(name)
        value = cls.__dict__.get(name, _MISSING)
        if isinstance(value, _Field):
            if value.factory is not None:
                factories[name] = value.factory
            elif value.default is not _MISSING:
                defaults[name] = value.default
            if not value.compare:
                uncompared.add(name)
            if value.default is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, value.default)
        elif value is not _MISSING:
            defaults[name] = value
    seen_default = None
    for name in names:
        if name in defaults or name in factories:
            seen_default = name
        elif seen_default is not None:
            raise TypeError(f"{cls.__name__}: field {name!r} without a default follows {seen_default!r} with one")
    cls.__record__ = _Spec(tuple(names), defaults, factories, tuple(n for n in names if n not in uncompared))
    own = cls.__dict__
    methods: dict[str, Any] = {"__init__": _init, "__repr__": _repr, "__eq__": _eq}
    if frozen:
        methods |= {"__hash__": _hash, "__setattr__": _frozen_setattr, "__delattr__": _frozen_delattr}
    for name, method in methods.items():
        if name not in own or (name == "__hash__" and own[name] is None):
            setattr(cls, name, method)
    if not frozen and "__hash__" not in own:
        cls.__hash__ = None  # type: ignore[assignment]  # mutable and compared by value: unhashable, like a dataclass
    if "__match_args__" not in own:
        cls.__match_args__ = tuple(names)
    return cls


def field_names(cls_or_record: Any) -> tuple[str, ...]:
    """The fields of a record class or instance, in order."""
    return cls_or_record.__record__.names


def replace(obj: Any, **changes: Any) -> Any:
    """A copy of the record ``obj`` with ``changes``."""
    values = obj.__dict__
    return type(obj)(**{name: values[name] for name in obj.__record__.names} | changes)


def asdict(obj: Any) -> dict[str, Any]:
    """The record's fields as a dict, records inside it (also in lists, tuples and dicts) as dicts too."""
    return {name: _plain(obj.__dict__[name]) for name in obj.__record__.names}


def _plain(value: Any) -> Any:
    if hasattr(type(value), "__record__"):
        return asdict(value)
    if type(value) in (list, tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value

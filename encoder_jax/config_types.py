"""Reading config values: sections as plain dicts, and field values checked against annotations."""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Mapping

from encoder_jax import errors


def to_dict(value: Any) -> dict[str, Any]:
    """A ConfigDict / mapping / dataclass as a plain dict (nested values untouched)."""
    if value is None:
        return {}
    if dataclasses.is_dataclass(value):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Mapping):
        return dict(value)
    raise errors.ConfigTypeError(f"expected a config section, got {type(value).__name__}")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _types(annotation: Any) -> set[type]:
    """The runtime types a field annotation names (`int | None` -> {int, NoneType})."""
    return {typing.get_origin(a) or a for a in (typing.get_args(annotation)
                                                if typing.get_origin(annotation) is not tuple
                                                else ()) or (annotation,)}


def check_type(name: str, value: Any, annotation: Any) -> Any:
    """`value` if the annotation admits it (lists become tuples, ints floats), else TypeError."""
    types = _types(annotation)
    if value is None and type(None) in types:
        return None
    if tuple in types and isinstance(value, (list, tuple)):
        return tuple(value)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if float in types and int not in types and is_int:
        return float(value)
    if isinstance(value, bool) == (bool in types) and isinstance(value, tuple(types)):
        return value
    if bool in types and isinstance(value, bool):
        return value
    wanted = " or ".join(sorted(t.__name__ for t in types if t is not type(None)))
    raise errors.ConfigTypeError(f"{name}={value!r} must be {wanted}" + (" or None" if type(None) in types else ""))

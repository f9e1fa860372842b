"""Hyperparameters: a module's constructor arguments, captured without the user calling anything.

`TrainModule.__init_subclass__` wraps each subclass's `__init__` with `record_init_arguments`;
the bound arguments of the outermost constructor call are kept in a `WeakKeyDictionary` keyed
by the module (never as attributes of the nnx module, so they are not part of its state).
Only plain values are kept: numbers, strings, booleans, None, and lists / dicts of them;
functions and classes are kept by their qualified name; `nnx.Rngs`, submodules, arrays and
other objects are dropped. A class attribute `hparams_ignore = ("secret",)` excludes names.
"""

from __future__ import annotations

import enum
import functools
import inspect
import weakref
from typing import Any

_BY_MODULE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# A module built by a factory under `nnx.eval_shape` is not the object the engine keeps (that
# one is merged from the state without calling `__init__`), so the last arguments per class
# stand in for it.
_LAST_BY_CLASS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DROP = object()


def plain(value: Any) -> Any:
    """`value` as a loggable plain value, or `_DROP` when it is not one."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, list | tuple):
        items = [plain(v) for v in value]
        return _DROP if any(v is _DROP for v in items) else items
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return _DROP
        items = {k: plain(v) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not _DROP}
    if callable(value) and hasattr(value, "__qualname__"):  # functions, classes, jax wrappers
        return f"{getattr(value, '__module__', None) or ''}.{value.__qualname__}".lstrip(".")
    return _DROP


def bound_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict | None:
    """{name: plain value} of one constructor call (self excluded, defaults applied)."""
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:
        return None  # the call itself is wrong: let `__init__` raise its own error
    bound.apply_defaults()
    out: dict[str, Any] = {}
    params = list(signature.parameters.values())
    for param in params[1:]:
        value = bound.arguments.get(param.name)
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            candidates = dict(value or {})
        else:
            candidates = {param.name: list(value) if param.kind is param.VAR_POSITIONAL else value}
        for name, v in candidates.items():
            v = plain(v)
            if v is not _DROP:
                out[name] = v
    return out


def record_init_arguments(cls: type) -> None:
    """Wrap `cls.__init__` (if `cls` defines one) so the outermost call records its arguments."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_meshfit_records_hparams", False):
        return
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        outermost = self not in _BY_MODULE
        if outermost:
            _BY_MODULE[self] = {}  # marks the call in progress for nested super().__init__
        init(self, *args, **kwargs)
        if outermost:
            found = bound_arguments(signature, args, kwargs) or {}
            ignore = set(getattr(type(self), "hparams_ignore", ()))
            found = {k: v for k, v in found.items() if k not in ignore}
            _BY_MODULE[self] = found
            _LAST_BY_CLASS[type(self)] = found

    __init__._meshfit_records_hparams = True
    cls.__init__ = __init__


def module_hparams(module: Any) -> dict[str, Any]:
    """The recorded constructor arguments of `module` (or of the last module of its class)."""
    if module is None:
        return {}
    try:
        found = _BY_MODULE.get(module)
    except TypeError:  # not weak-referenceable
        found = None
    if found is None:
        found = _LAST_BY_CLASS.get(type(module), {})
    return dict(found)


def merge_hparams(config: dict[str, Any], module: Any) -> dict[str, Any]:
    """The engine's `config` plus the module's constructor arguments; a module argument whose
    name is already a config key is kept as `module.<name>`."""
    out = dict(config)
    for name, value in module_hparams(module).items():
        out[f"module.{name}" if name in config else name] = value
    return out

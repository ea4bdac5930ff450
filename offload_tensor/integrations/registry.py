"""What offload_tensor must know about the libraries whose models it wraps, behind one protocol.

This module is the protocol and its registry; each library has a module of its own beside it
that registers an `Integration` (the package imports them all). The core (payloads, planner,
wrap) asks the registry and names no library. A library module imports only torch, its library
and this registry, never the core above it: what an install needs from the layers above (a wrap-
level operation) is handed in (`WrapOps`). An integration never imports its library: it acts
only when the library is already imported (it is in `sys.modules`), since a model of that library
cannot exist otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from torch import nn

Undo = Callable[[], None]


def _nothing(*args) -> None:
    return None


class RemoveAttributes:
    """An undo that removes instance attributes an integration set (a value, not a closure, so a
    wrapped model still pickles and deep-copies)."""

    def __init__(self, modules: list, names: tuple[str, ...]) -> None:
        self.modules, self.names = modules, names

    def __call__(self) -> None:
        for module in self.modules:
            for name in self.names:
                module.__dict__.pop(name, None)


class WrapOps(Protocol):
    """What an integration's install may ask of the layers above it."""

    def dequantize_payloads(self, model: nn.Module) -> None:
        """Replace every quantized payload of a wrapped model by its dequantized value, where it
        lives; checked before anything changes."""

    def update_weights(self, model: nn.Module, before: set[int]) -> None:
        """Offload the parameters a library added to a wrapped model since `before` (ids of its
        parameters then), and let go of the weights it removed."""


@dataclass(frozen=True)
class Integration:
    """One library's part in wrapping.

    check(model): raise, naming the problem and the fix, when the model cannot be wrapped as it
        is (called before anything changes).
    install(model, ops): adapt a model whose weights were just replaced; return what undoes it
        (unwrap_model calls it), or None. `ops`: the wrap-level operations it may use (`WrapOps`).
    carries(cls): whether a weight of this tensor-subclass type is a quantized payload the
        library's kernels run (offloaded as its inner tensors).
    opaque(cls): whether such a payload cannot be rebuilt inside a compiled graph (see [Note:
        opaque linear] in ops.py).
    blocks(model): class names of the model's repeated blocks (grouped into one copy each).
    components(obj): the models of a pipeline by name, when `obj` is one of the library's
        pipelines; None otherwise.
    before_load(model): bring a model about to be loaded from a checkpoint to the state the
        library's own loading gives it (transformers ties weights).
    keep_in_fp32(model, dtype): names of modules whose weights the library's own loading keeps
        in float32 when the model is loaded in `dtype` (`_keep_in_fp32_modules`).
    """

    name: str
    module: str  # the top-level package; the integration acts only when it is imported
    check: Callable[[nn.Module], None] = _nothing
    install: Callable[[nn.Module, WrapOps], Undo | None] = _nothing
    carries: Callable[[type], bool] = lambda cls: False
    opaque: Callable[[type], bool] = lambda cls: False
    blocks: Callable[[nn.Module], Iterable[str]] = lambda model: ()
    components: Callable[[object], dict[str, nn.Module] | None] = lambda obj: None
    before_load: Callable[[nn.Module], None] = _nothing
    keep_in_fp32: Callable[[nn.Module, object], Iterable[str]] = lambda model, dtype: ()

    @property
    def active(self) -> bool:
        return self.module in sys.modules


def from_library(obj: object, package: str) -> bool:
    """Whether `obj`'s class, or a class it derives from, is defined in `package`."""
    return any(c.__module__.split(".", 1)[0] == package for c in type(obj).__mro__)


_registered: list[Integration] = []


def register(integration: Integration) -> Integration:
    _registered.append(integration)
    return integration


def active() -> list[Integration]:
    return [i for i in _registered if i.active]


def check(model: nn.Module) -> None:
    for integration in active():
        integration.check(model)


def before_load(model: nn.Module) -> None:
    for integration in active():
        integration.before_load(model)


def keep_in_fp32(model: nn.Module, dtype) -> set[str]:
    return {name for integration in active() for name in integration.keep_in_fp32(model, dtype)}


def install(model: nn.Module, ops: WrapOps) -> list[Undo]:
    return [undo for integration in active() if (undo := integration.install(model, ops)) is not None]


def carrier(cls: type) -> Integration | None:
    """The integration whose library's kernels run a quantized payload of type `cls`, if any."""
    return next((i for i in active() if i.carries(cls)), None)


def opaque(cls: type) -> bool:
    return any(i.opaque(cls) for i in active())


def block_names(model: nn.Module) -> set[str]:
    return {name for integration in active() for name in integration.blocks(model)}


def components(obj: object) -> dict[str, nn.Module] | None:
    """The models of a pipeline (by component name), or None when `obj` is not a pipeline."""
    for integration in active():
        found = integration.components(obj)
        if found is not None:
            return found
    return None

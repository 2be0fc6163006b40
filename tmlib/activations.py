"""Observe the outputs of named layers of any ``nn.Module`` without editing it.

A *layer* is one call of a module in a forward pass, named by the module's path as
``model.named_modules()`` gives it. A module called k times in one forward (torchvision's
``BasicBlock`` calls its ReLU twice) gives the layers ``path``, ``path#2`` … ``path#k``.

By default every leaf module (one without children) is observed; the root itself only when it has
no children. Hooks live only inside the ``with`` block and are removed on exit, even after an
exception.

Outputs are handed to a callback *during* the forward, as soon as each module returns: statistics
computed there see the values before any later in-place op (``ReLU(inplace=True)``) can overwrite
them, and nothing has to be kept in memory. :func:`record` clones instead, for inspection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .checks import check_module

__all__ = ["leaf_modules", "LayerObserver", "observe", "record", "split_call_name"]

Callback = Callable[[str, torch.Tensor], None]


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Leaf modules by path, in registration order; the root only if it has no children."""
    leaves = {name: m for name, m in model.named_modules() if len(list(m.children())) == 0}
    if "" in leaves:  # a root without children is observed under its class name
        leaves = {type(model).__name__: leaves.pop("")}
    return leaves


def split_call_name(layer: str) -> tuple[str, int]:
    """``'block.relu#2'`` → ``('block.relu', 2)``; ``'conv'`` → ``('conv', 1)``."""
    path, sep, k = layer.rpartition("#")
    if sep and k.isdigit():
        return path, int(k)
    return layer, 1


class LayerObserver:
    """Registers forward hooks on the leaf modules of ``model`` and reports each call's output.

    Args:
        model: any module.
        layers: names to report (module paths, optionally with ``#k`` call suffixes); None = all
            leaves. Names are validated against the model's modules up front; a ``#k`` name that is
            never reached in a forward is reported by :meth:`check_seen`.
        callback: called as ``callback(layer_name, output)`` for every observed call, in order.
        detach: hand over ``output.detach()`` (default). ``False`` hands over the output as is, so
            that under ``torch.func.jvp``/``vmap`` the dual tensor and its tangent survive.
        skip_non_tensors: when observing the default leaves (``layers=None``), skip a leaf whose
            output is not a tensor (``nn.LSTM`` returns a tuple) and note it in ``skipped``
            ({name: reason}) instead of raising; a layer named in ``layers`` always raises.

    After each forward, ``order`` lists the observed layer names in the order of their first call.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None, callback: Callback, detach: bool = True,
                 skip_non_tensors: bool = False):
        check_module(model)
        self.model = model
        self.callback = callback
        self.detach = detach
        modules = dict(model.named_modules())
        leaves = leaf_modules(model)
        self.selected: set[str] | None = None
        if layers is None:
            self.watch = leaves
        else:
            if isinstance(layers, str):
                raise TypeError("layers must be a list of layer names, not a single string")
            self.selected = set(layers)
            self.watch = {}
            for layer in layers:
                path, _ = split_call_name(layer)
                root_alias = path == type(model).__name__ and path in leaves
                if path not in modules and not root_alias:
                    raise ValueError(
                        f"layers: unknown layer name {layer!r}; names are module paths such as "
                        f"{list(leaves)[:6]}"
                    )
                self.watch[path] = leaves[path] if root_alias else modules[path]
        self.order: list[str] = []
        self.skip_non_tensors = skip_non_tensors
        self.skipped: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        self._handles: list = []

    def __enter__(self) -> LayerObserver:
        try:
            # Counters restart at every forward of the root so that `path#2` means the 2nd call.
            self._handles.append(self.model.register_forward_pre_hook(self._reset))
            for path, module in self.watch.items():
                self._handles.append(module.register_forward_hook(self._make_hook(path)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _reset(self, module, args) -> None:
        self._counts.clear()

    def _make_hook(self, path: str):
        def hook(module, args, output):
            k = self._counts.get(path, 0) + 1
            self._counts[path] = k
            name = path if k == 1 else f"{path}#{k}"
            if self.selected is not None and name not in self.selected:
                return
            if not isinstance(output, torch.Tensor):
                if self.skip_non_tensors and self.selected is None:
                    self.skipped[name] = f"returned {type(output).__name__}, not a tensor"
                    return
                raise TypeError(
                    f"layer {name!r} returned {type(output).__name__}; only modules returning a "
                    "single tensor can be observed"
                )
            if name not in self.order:
                self.order.append(name)
            self.callback(name, output.detach() if self.detach else output)

        return hook

    def check_seen(self) -> None:
        """Raise if a requested layer was never called in the forwards seen so far."""
        if self.selected is not None:
            missing = [name for name in self.selected if name not in self.order]
            if missing:
                raise ValueError(f"layers: {missing} were never called in the model's forward")


@contextlib.contextmanager
def observe(model: nn.Module, callback: Callback, layers: Sequence[str] | None = None) -> Iterator[LayerObserver]:
    """Context manager: call ``callback(name, output)`` for each observed layer in every forward."""
    with LayerObserver(model, layers, callback) as observer:
        yield observer


@torch.no_grad()
def record(model: nn.Module, x: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """One forward of ``x``; returns a clone of every observed layer's output, in forward order."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str, out: torch.Tensor) -> None:
        outputs[name] = out.clone()

    with observe(model, keep, layers) as observer:
        model(x)
        observer.check_seen()
    return outputs

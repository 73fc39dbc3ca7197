"""Fake passes that take the intact pass's outputs of the modules run before the probed layer, instead of recomputing them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["PrefixReuse", "shared_tensors"]


@dataclass
class _Call:
    """One call of a module's ``forward`` in the intact pass: its place in call order and what it returned."""

    module: nn.Module
    end: int  #: the index after the calls made inside this one (pre-order: they are ``index + 1 .. end - 1``)
    output: Any = None
    versions: tuple[int, ...] | None = None  #: the output tensors' version counters; None: not servable


class PrefixReuse:
    """Records every submodule's output during the intact forward; serves them to the fake passes that cannot change them.

    A fake pass of layer ℓ substitutes only ℓ's own tensors, so every module
    call that ends before the first call that can read them computes exactly
    what it computed in the intact pass: :meth:`serving` returns the recorded
    output (and skips the calls inside it) instead of running it again. On
    LeNet-300-100 the probes of ``fc2`` and ``fc3`` skip ``fc1``'s matrix
    product (90% of the forward); on a ResNet or a transformer the probe of a
    layer in block k skips blocks 1 .. k-1. The values are the same bits as
    recomputing them (the same kernels on the same inputs). The outputs of one
    forward are held during the step (what training holds for its backward).

    The first call that can read ℓ's tensors is taken to be the first call of
    the innermost module holding ℓ that the forward calls: ℓ itself, or, for a
    layer whose weight its parent reads directly (``nn.MultiheadAttention``'s
    ``out_proj``; ``nn.TransformerEncoderLayer``'s fused eval path, which
    calls none of its layers), that parent. Sound when (1) ℓ's tensors belong
    to ℓ alone (a tied weight, shared with another module, turns the reuse off
    for that probe: :meth:`serving` is given ``shared``), (2) a recorded
    output was not changed in place after it was recorded (its tensors'
    version counters are compared; a changed one is computed again), and (3)
    no other code reads ℓ's tensors before that call. (3) cannot be seen from
    outside, so the search compares, on its first step with fake passes, every
    probe with and without the reuse and turns the reuse off where they differ
    (:func:`bingo.estimators.fake_pass.measure`). Outputs that are tensors or
    tuples / lists of them (an attention layer's ``(output, weights)``) are
    served; others are computed.
    """

    def __init__(self, model: nn.Module) -> None:
        # every submodule but the model itself, whose call is the whole pass
        named = [(name, module) for name, module in model.named_modules() if module is not model]
        self.modules = [module for _, module in named]
        self._names = {id(module): name for name, module in named}
        self.calls: list[_Call] = []
        self.first_call: dict[int, int] = {}  # id(module) -> the index of its first call in ``calls``

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Within the block (the intact forward), each module call's ``forward`` return value is recorded, in call order.

        The ``forward``'s own return value, before any forward hook: serving
        it later lets the hooks run on it exactly as they did.
        """
        self.calls.clear()
        self.first_call.clear()

        def record(module: nn.Module, compute: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                index = len(self.calls)
                self.first_call.setdefault(id(module), index)
                call = _Call(module, end=-1)
                self.calls.append(call)
                output = compute(*args, **kwargs)
                call.output, call.versions, call.end = output, _versions(output), len(self.calls)
                return output
            return forward

        with self._forwards(record):
            yield

    def limit(self, probed: nn.Module) -> int:
        """The index of the first recorded call that can read ``probed``'s tensors (-1: none was recorded)."""
        name = self._names.get(id(probed))
        if name is None:
            return -1
        holders = [self.first_call[id(m)] for m in self.modules
                   if id(m) in self.first_call and (name == self._names[id(m)] or name.startswith(self._names[id(m)] + "."))]
        return max(holders, default=-1)  # the innermost holder's first call starts last

    @contextlib.contextmanager
    def serving(self, probed: nn.Module, shared: bool = False) -> Iterator[None]:
        """Within the block (the fake pass of layer ``probed``), calls that end before :meth:`limit` return their records.

        ``shared``: the probe's tensors are shared with another module, so
        nothing is served (the block runs the model as it is).
        """
        limit = -1 if shared else self.limit(probed)
        if limit <= 0:
            yield
            return
        state = {"next": 0, "limit": limit}

        def serve(module: nn.Module, compute: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                index = state["next"]
                state["next"] += 1
                if index < state["limit"]:
                    call = self.calls[index]
                    if call.module is not module:
                        state["limit"] = -1  # the calls no longer follow the record: compute everything from here
                    elif 0 <= call.end <= state["limit"] and call.versions is not None and _versions(call.output) == call.versions:
                        state["next"] = call.end  # the calls inside it are not made
                        return call.output
                return compute(*args, **kwargs)
            return forward

        with self._forwards(serve):
            yield

    @contextlib.contextmanager
    def _forwards(self, wrap: Any) -> Iterator[None]:
        """Within the block, each module's ``forward`` is ``wrap(module, its forward)``; afterwards exactly as before."""
        saved: dict[int, Any] = {}
        installed = []
        try:
            for module in self.modules:
                if "forward" in module.__dict__:  # a forward set on the instance: put it back afterwards
                    saved[id(module)] = module.__dict__["forward"]
                try:
                    module.forward = wrap(module, module.forward)
                except (AttributeError, TypeError, RuntimeError):  # e.g. a scripted module: it runs as it is
                    continue
                installed.append(module)
            yield
        finally:
            for module in installed:
                if id(module) in saved:
                    module.forward = saved[id(module)]
                else:
                    del module.__dict__["forward"]


def _versions(output: Any) -> tuple[int, ...] | None:
    """The version counters of the tensors in ``output`` (a tensor, or tuples / lists of them and None), else None.

    None marks an output that is not served: of another kind, or holding no tensor.
    """
    if isinstance(output, torch.Tensor):
        return (output._version,)
    if isinstance(output, (tuple, list)):
        versions: list[int] = []
        for item in output:
            if item is None:
                continue
            inner = _versions(item)
            if inner is None:
                return None
            versions += inner
        return tuple(versions) or None
    return None


def shared_tensors(model: nn.Module) -> set[int]:
    """``id``s of the parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        seen[id(parameter)] = seen.get(id(parameter), 0) + 1
    return {key for key, count in seen.items() if count > 1}

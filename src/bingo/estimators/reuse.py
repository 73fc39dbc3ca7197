"""Fake passes that take the intact pass's outputs of the layers called before the probed one, instead of recomputing them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["PrefixReuse", "shared_tensors"]


class PrefixReuse:
    """Records the scored layers' outputs during the intact forward; serves them to the fake passes that cannot change them.

    A fake pass of layer ℓ substitutes only ℓ's own tensors, so every layer
    called before ℓ's first call computes exactly what it computed in the
    intact pass: :meth:`serving` returns the recorded output instead of
    running the layer again. On LeNet-300-100 the probes of ``fc2`` and
    ``fc3`` skip ``fc1``'s matrix product (90% of the forward): a due step's
    four forwards cost about 2.1 instead of 4. The values are the same bits
    as recomputing them (the same kernel on the same inputs).

    Sound when (1) ℓ's tensors belong to ℓ alone (a tied weight, shared with
    another module, turns the reuse off for that probe: :meth:`serving` is
    given ``shared``), (2) a recorded output was not changed in place after it
    was recorded (its version counter is compared; a changed one is computed
    again, and so is every call after it), and (3) the model reads ℓ's tensors
    only through ℓ's call. (3) cannot be seen from outside, so the search
    compares, on its first step with fake passes, every probe with and
    without the reuse, and turns the reuse off where they differ
    (:func:`bingo.estimators.fake_pass.measure`).
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list(dict.fromkeys(modules))  # unique, in the search's order
        self.calls: list[tuple[nn.Module, torch.Tensor, int]] = []  # (layer, its output, the output's version)
        self.first_call: dict[int, int] = {}  # id(layer) -> the index of its first call in ``calls``

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Within the block (the intact forward), what each call of a scored layer's ``forward`` returns is recorded in order.

        The ``forward``'s own return value, before any forward hook: serving
        it later lets the hooks run on it exactly as they did.
        """
        self.calls.clear()
        self.first_call.clear()

        def record(module: nn.Module, compute: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                output = compute(*args, **kwargs)
                self.first_call.setdefault(id(module), len(self.calls))
                tensor = output if isinstance(output, torch.Tensor) else None
                self.calls.append((module, tensor, -1 if tensor is None else tensor._version))
                return output
            return forward

        with self._forwards(record):
            yield

    @contextlib.contextmanager
    def serving(self, probed: nn.Module, shared: bool = False) -> Iterator[None]:
        """Within the block (the fake pass of layer ``probed``), calls before ``probed``'s first call return their records.

        ``shared``: the probe's tensors are shared with another module, so
        nothing is served (the block runs the model as it is).
        """
        limit = -1 if shared else self.first_call.get(id(probed), -1)
        if limit <= 0:
            yield
            return
        state = {"next": 0, "limit": limit}

        def serve(module: nn.Module, compute: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                index = state["next"]
                state["next"] += 1
                if index < state["limit"]:
                    recorded, output, version = self.calls[index]
                    if recorded is module and output is not None and output._version == version:
                        return output
                    state["limit"] = -1  # the calls no longer follow the record: compute everything from here
                return compute(*args, **kwargs)
            return forward

        with self._forwards(serve):
            yield

    @contextlib.contextmanager
    def _forwards(self, wrap: Any) -> Iterator[None]:
        """Within the block, each layer's ``forward`` is ``wrap(layer, its forward)``; afterwards exactly as before."""
        saved: dict[int, Any] = {}
        installed = []
        try:
            for module in self.modules:
                if "forward" in module.__dict__:  # a forward set on the instance: put it back afterwards
                    saved[id(module)] = module.__dict__["forward"]
                module.forward = wrap(module, module.forward)
                installed.append(module)
            yield
        finally:
            for module in installed:
                if id(module) in saved:
                    module.forward = saved[id(module)]
                else:
                    del module.__dict__["forward"]


def shared_tensors(model: nn.Module) -> set[int]:
    """``id``s of the parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        seen[id(parameter)] = seen.get(id(parameter), 0) + 1
    return {key for key, count in seen.items() if count > 1}

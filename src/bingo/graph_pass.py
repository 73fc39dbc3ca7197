"""A model run node by node over many batches at once, so that work can be done between its layers.

Compensation re-fits layer after layer, each on the inputs the layers before
it (already re-fitted) produce. Re-running the whole model for every layer
costs ``O(L²)`` layer evaluations; SparseGPT instead runs a transformer
block by block on cached hidden states. :class:`LayerByLayer` does that for
any model :mod:`torch.fx` can trace: the traced graph is evaluated one node
at a time for every calibration batch, keeping each batch's live values
(freed after their last use), and stops at chosen modules so the caller can
run that module alone, as often as it needs (with forward hooks capturing
its inputs), before the pass goes on. Forward work is then one evaluation
of every node per batch, plus what the caller re-runs at its stops.

Two sides run in lockstep: the pruned model and its dense reference (a
separate model with the same graph, or the same model with every mask
lifted while a node runs: the reference's weights are then read before
the caller overwrites them, as each stop comes before any later node).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import fx, nn

from .layer_types import layer_type_of
from .masks import masked_names

__all__ = ["LayerByLayer", "NotTraceable", "Stop"]


def _first_samples(batch: object, count: int) -> object:
    """The first ``count`` samples of a batch (a tensor, or tuples and dicts of tensors)."""
    if isinstance(batch, torch.Tensor):
        return batch[:count]
    if isinstance(batch, tuple):
        return tuple(_first_samples(v, count) for v in batch)
    if isinstance(batch, Mapping):
        return {k: _first_samples(v, count) for k, v in batch.items()}
    return batch


class NotTraceable(Exception):
    """The model cannot be run node by node (why is the message); callers fall back to whole forwards."""


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping every module a layer type handles, and given ones, as one call."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return _is_leaf(self, module, qualified_name)


def _is_leaf(tracer: fx.Tracer, module: nn.Module, qualified_name: str) -> bool:
    """A layer a layer type handles, a module asked for (``tracer.leaves``), or what torch.fx keeps whole."""
    return (qualified_name in tracer.leaves or layer_type_of(module) is not None
            or fx.Tracer.is_leaf_module(tracer, module, qualified_name))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _bound(model: nn.Module, batch: object) -> dict[str, object]:
    """``{forward's parameter name: value}`` for one batch as the model takes it."""
    if isinstance(batch, Mapping):
        args, kwargs = (), dict(batch)
    else:
        args, kwargs = (batch if isinstance(batch, tuple) else (batch,)), {}
    return dict(inspect.signature(model.forward).bind(*args, **kwargs).arguments)


def _trace(model: nn.Module, leaves: set[str], example: object) -> fx.GraphModule:
    """``model`` as a graph whose call_module nodes are its layers (the real modules, hooks and all).

    Plain symbolic tracing first; where control flow reads a shape (``if
    x.dim() == 3``), again on meta tensors shaped like ``example`` (one
    sample), which resolves it (:mod:`torch.fx.experimental.meta_tracer`).
    """
    try:
        return fx.GraphModule(model, _Tracer(leaves).trace(model))
    except Exception as exc:  # control flow on values, unsupported calls, anything inside forward
        plain = _first_line(exc)
    from torch.fx.experimental.meta_tracer import MetaTracer

    class _MetaLayerTracer(MetaTracer):
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return _is_leaf(self, module, qualified_name)

    tracer = _MetaLayerTracer()
    tracer.leaves = leaves
    try:
        meta = copy.deepcopy(model).to("meta")
        meta_args = {k: v.to("meta") for k, v in _bound(model, example).items() if isinstance(v, torch.Tensor)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace(meta, meta_args)
        return fx.GraphModule(model, graph)
    except Exception:
        raise NotTraceable(f"torch.fx cannot trace {type(model).__name__}: {plain}") from None


def _same_outputs(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_outputs(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_outputs(a[k], b[k]) for k in a)
    return type(a) is type(b)


@contextlib.contextmanager
def lifted_masks(module: nn.Module) -> Iterator[None]:
    """Every ``torch.nn.utils.prune`` mask in ``module``'s subtree set to ones while inside (the dense weights)."""
    saved = []
    for sub in module.modules():
        for name in masked_names(sub):
            mask = sub._buffers[f"{name}_mask"]
            saved.append((sub, name, mask))
            sub._buffers[f"{name}_mask"] = torch.ones_like(mask)
    try:
        yield
    finally:
        for sub, name, mask in saved:
            sub._buffers[f"{name}_mask"] = mask
            # the pruned weight again, as prune's hook would compute it on the next call
            setattr(sub, name, getattr(sub, f"{name}_orig") * mask)


class LayerByLayer:
    """Evaluate ``model`` (and its dense ``reference``) node by node over ``batches``, stopping at ``stops``.

    Args:
        model: the network to run; its modules are the traced graph's (hooks on them fire).
        reference: the dense network with the same graph, or None: ``model`` itself with its masks
            lifted while each node runs on the dense side.
        batches: the inputs, each called as the model takes it: a tensor, a tuple (positional) or a
            dict (by argument name).
        stops: names of modules to stop at; each must be called exactly once by ``model.forward``.

    Raises :class:`NotTraceable` (with the reason) when the model cannot be
    run this way: torch.fx cannot trace it, a stop is called other than
    once, a masked module's weight is read outside its own call, or the
    reference's graph differs.
    """

    def __init__(self, model: nn.Module, reference: nn.Module | None, batches: list, stops: list[str]) -> None:
        self.model, self.reference, self.batches = model, reference, batches
        self.stops = list(stops)
        self.graph = _trace(model, set(stops), _first_samples(batches[0], 1))
        self.nodes = list(self.graph.graph.nodes)
        calls = [n.target for n in self.nodes if n.op == "call_module"]
        for name in self.stops:
            if calls.count(name) != 1:
                raise NotTraceable(f"{name!r} is called {calls.count(name)} times in the traced forward, not once")
        self._check_masked_reads(calls)
        self.dense_graph = self.graph
        # a graph traced on meta tensors holds what the trace resolved (a shape's branch): check it on two samples
        with torch.no_grad(), torch.random.fork_rng():
            check = _first_samples(batches[0], 2)
            if not _same_outputs(self._call(self.graph, check), self._call(model, check)):
                raise NotTraceable(f"the traced graph of {type(model).__name__} computes other outputs than its forward")
        if reference is not None:
            self.dense_graph = _trace(reference, set(stops), _first_samples(batches[0], 1))
            mine = [(n.op, str(n.target)) for n in self.nodes]
            theirs = [(n.op, str(n.target)) for n in self.dense_graph.graph.nodes]
            if mine != theirs:
                raise NotTraceable("the reference's traced graph differs from the model's")
        self.forwards = 0  #: node evaluations so far, in whole-graph units (one per side per batch)
        self.layer_runs = 0  #: extra calls of a stop module by the caller, over all batches

    @staticmethod
    def _call(net: nn.Module, batch: object) -> object:
        if isinstance(batch, Mapping):
            return net(**batch)
        return net(*batch) if isinstance(batch, tuple) else net(batch)

    def _check_masked_reads(self, calls: list[str]) -> None:
        called = set(calls)
        for name, module in self.model.named_modules():
            if not masked_names(module):
                continue
            parts = name.split(".")
            if not any(".".join(parts[:i]) in called for i in range(1, len(parts) + 1)):
                raise NotTraceable(f"masked module {name!r} is not called as one module in the traced forward")
        for node in self.nodes:
            if node.op == "get_attr":
                owner = str(node.target).rpartition(".")[0]
                module = self.model.get_submodule(owner) if owner else self.model
                if masked_names(module):
                    raise NotTraceable(f"the traced forward reads {node.target!r} of a masked module directly")

    def _placeholders(self, batch: object) -> dict[fx.Node, object]:
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if isinstance(batch, Mapping):
            values = {}
            for n in placeholders:
                if n.target in batch:
                    values[n] = batch[n.target]
                elif n.args:
                    values[n] = n.args[0]
                else:
                    raise NotTraceable(f"the calibration inputs have no {n.target!r}")
            return values
        args = batch if isinstance(batch, tuple) else (batch,)
        if len(args) > len(placeholders):
            raise NotTraceable("more calibration inputs than the traced forward takes")
        values = {n: (args[i] if i < len(args) else (n.args[0] if n.args else None)) for i, n in enumerate(placeholders)}
        return values

    def run(self, at_stop: Callable[[str, "Stop"], None]) -> None:
        """One pass; at each stop, ``at_stop(name, stop)`` (a :class:`Stop`: the module's inputs on each side
        and batch, and a way to call it alone). The dense side's own call of the module comes before
        ``at_stop``, the pruned side's after it, with the weights ``at_stop`` wrote. With the reference the
        model itself (masks lifted), ``at_stop`` must take all it needs from the dense side before it
        writes any weight."""
        interpreters = {"pruned": fx.Interpreter(self.graph), "dense": fx.Interpreter(self.dense_graph)}
        for interpreter in interpreters.values():
            interpreter.garbage_collect_values = False
        dense_nodes = dict(zip(self.nodes, self.dense_graph.graph.nodes))
        envs = {"pruned": [self._placeholders(b) for b in self.batches]}
        envs["dense"] = [{dense_nodes[n]: v for n, v in self._placeholders(b).items()} for b in self.batches]
        last_use: dict[fx.Node, int] = {}
        for index, node in enumerate(self.nodes):
            for used in node.all_input_nodes:
                last_use[used] = index
        lift = self.reference is None

        def evaluate(side: str, node: fx.Node, b: int) -> object:
            interpreter = interpreters[side]
            here = node if side == "pruned" else dense_nodes[node]
            interpreter.env = envs[side][b]
            if side == "dense" and lift and node.op == "call_module":
                with lifted_masks(self.model.get_submodule(str(node.target))):
                    return interpreter.run_node(here)
            return interpreter.run_node(here)

        def inputs(side: str, node: fx.Node, b: int) -> tuple[tuple, dict]:
            interpreter = interpreters[side]
            interpreter.env = envs[side][b]
            return interpreter.fetch_args_kwargs_from_env(node if side == "pruned" else dense_nodes[node])

        with torch.no_grad():
            for index, node in enumerate(self.nodes):
                if node.op in ("placeholder", "output"):
                    continue
                # the dense side first: at a stop, the caller overwrites weights the dense side reads (masks lifted)
                for b in range(len(self.batches)):
                    envs["dense"][b][dense_nodes[node]] = evaluate("dense", node, b)
                if node.op == "call_module" and node.target in self.stops:
                    at_stop(str(node.target), Stop(self, node, evaluate, inputs))
                for b in range(len(self.batches)):
                    envs["pruned"][b][node] = evaluate("pruned", node, b)
                for used in node.all_input_nodes:
                    if last_use.get(used) == index:
                        for side in ("pruned", "dense"):
                            key = used if side == "pruned" else dense_nodes[used]
                            for env in envs[side]:
                                env.pop(key, None)
        self.forwards += 2 * len(self.batches)


class Stop:
    """One stop of a :class:`LayerByLayer` pass: a module's inputs per side and batch, and its call alone."""

    def __init__(self, runner: LayerByLayer, node: fx.Node, evaluate: Callable, inputs: Callable) -> None:
        self.runner, self.node, self._evaluate, self._inputs = runner, node, evaluate, inputs
        self.batches = len(runner.batches)

    def module(self, side: str) -> nn.Module:
        """The module this stop is at, in ``side``'s network."""
        net = self.runner.model if side == "pruned" or self.runner.reference is None else self.runner.reference
        return net.get_submodule(str(self.node.target))

    def inputs(self, side: str, b: int) -> tuple[tuple, dict]:
        """``(args, kwargs)`` the module is called with on batch ``b`` of ``side``."""
        return self._inputs(side, self.node, b)

    def run(self, side: str) -> Iterator[int]:
        """Call the module on every batch of ``side`` in turn (its hooks fire), yielding each batch's index."""
        for b in range(self.batches):
            self._evaluate(side, self.node, b)
            self.runner.layer_runs += 1
            yield b

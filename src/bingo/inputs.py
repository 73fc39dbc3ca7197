"""Example inputs for the functions that trace a model (:func:`bingo.shrink`, :func:`bingo.channel_groups`).

Two conventions are accepted, told apart by type:

- **one sample's shape**, without the batch dimension: a tuple of ints such
  as ``(1, 28, 28)`` (bingo's ``input_shape``, as in ``Dataset.input_shape``);
  the model is run on a batch of two zeros of that shape;
- **example inputs as the model takes them**, with the batch dimension:
  a tensor (``model(x)``, e.g. ``torch.randn(1, 1, 28, 28)``), a tuple of
  tensors (``model(*x)``) or a dict of tensors (``model(**x)``), which is
  Torch-Pruning's ``example_inputs`` convention.

:func:`example_inputs` turns either into one :class:`ExampleInputs` and runs
the model on it once, before anything is traced: a shape that does not fit
(a batched shape ``(1, 1, 28, 28)`` given as one sample's) is a one-line
:class:`~bingo.errors.ConfigError` that says which convention is expected
and what the model's first layer takes, not a tracing error further on.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .distributed import unwrap
from .errors import ConfigError
from .layer_types import layer_type_of

__all__ = ["ExampleInputs", "as_shape", "check_runs", "example_inputs"]

#: Batch size of the zeros a shape is run on: 2, since a batch of one can be
#: squeezed or specialised by a trace, and BatchNorm in training mode refuses it.
SHAPE_BATCH = 2


@dataclass(frozen=True)
class ExampleInputs:
    """Inputs a model is called with, ``model(*args, **kwargs)``, each tensor with a batch dimension."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: one sample's shape when the inputs were given as one (``args`` is then a batch of zeros), else None
    sample_shape: tuple[int, ...] | None = None

    def __call__(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    def random(self, batch: int = 4, seed: int = 0) -> ExampleInputs:
        """For a shape, seeded standard-normal samples of it (zeros can hide a constant output); given inputs as they are."""
        if self.sample_shape is None:
            return self
        zeros = self.args[0]
        generator = torch.Generator().manual_seed(seed)
        values = torch.randn((batch, *self.sample_shape), generator=generator).to(device=zeros.device, dtype=zeros.dtype)
        return ExampleInputs((values,), {}, self.sample_shape)

    def named(self, model: nn.Module) -> dict[str, Any]:
        """``{parameter name of model.forward: value}``, the binding of these inputs (for meta tracing)."""
        try:
            bound = inspect.signature(model.forward).bind(*self.args, **self.kwargs)
        except TypeError as exc:
            raise ConfigError(f"the example inputs do not fit {type(model).__name__}.forward: {exc}") from None
        return dict(bound.arguments)

    def describe(self) -> str:
        """``input_shape (1, 28, 28)``, ``a tensor of shape (1, 1, 28, 28)``, ...: what was given, for messages."""
        if self.sample_shape is not None:
            return f"input_shape {self.sample_shape}"
        shapes = [_shape_text(v) for v in self.args] + [f"{k}={_shape_text(v)}" for k, v in self.kwargs.items()]
        if len(self.args) == 1 and not self.kwargs:
            return f"a tensor of shape {shapes[0]}" if isinstance(self.args[0], torch.Tensor) else shapes[0]
        return f"inputs {', '.join(shapes)}"


def _shape_text(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _integer(value: Any) -> bool:
    """True for an int-like dimension (``int``, ``numpy.int64``), not a bool or a float."""
    return not isinstance(value, bool) and hasattr(type(value), "__index__")


def as_shape(value: tuple | list | torch.Size, what: str) -> tuple[int, ...]:
    """``value`` (one sample's shape) as a tuple of ints >= 1, else a one-line :class:`ConfigError` naming ``what``."""
    if not all(_integer(d) for d in value):
        kinds = sorted({type(d).__name__ for d in value if not _integer(d)})
        raise ConfigError(
            f"{what}: input_shape must be one sample's shape as a tuple of ints, e.g. (1, 28, 28), or example inputs "
            f"(a tensor, or a tuple / dict of tensors); got {tuple(value)!r} (holding {', '.join(kinds)})"
        )
    if any(d < 1 for d in value):
        raise ConfigError(f"{what}: input_shape {tuple(value)} has a dimension below 1; give one sample's shape, e.g. (1, 28, 28)")
    return tuple(operator.index(d) for d in value)


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first layer in registration order: what the model takes when its forward never reached one."""
    return next(((name, m) for name, m in model.named_modules() if layer_type_of(m) is not None), None)


def _takes(module: nn.Module) -> str:
    """What ``module`` takes as input, e.g. ``(N, 1, H, W)``, as its layer type says."""
    layer_type = layer_type_of(module)
    return (layer_type.takes(module) if layer_type is not None else None) or "what its forward takes"


def _hint(module: nn.Module | None, shape: tuple[int, ...]) -> tuple[str, str]:
    """(one sample's shape, an example tensor) to suggest for a shape given with its batch dimension."""
    layer_type = layer_type_of(module) if module is not None else None
    layout = layer_type.sample_layout(module) if layer_type is not None else None
    if layout is None:
        return "", ""
    channels, dims = layout
    if len(shape) == dims + 1 and shape[1] == channels:
        return f", here {shape[1:]}", f", here torch.randn{shape}"
    if len(shape) >= dims - 1:
        guess = (channels, *shape[len(shape) - dims + 1:])
        return ("", "") if guess == shape else (f", e.g. {guess}", "")
    return "", ""


def check_runs(model: nn.Module, example: ExampleInputs, what: str) -> None:
    """Run ``model`` on ``example`` once (eval mode, no grad); a failure is a one-line :class:`ConfigError` saying what ``what`` expects."""
    model = unwrap(model)
    called: list[tuple[str, nn.Module]] = []
    names = {m: n for n, m in model.named_modules()}

    def first(module: nn.Module, args: tuple) -> None:
        if not called:
            called.append((names.get(module, "?"), module))

    hooks = [m.register_forward_pre_hook(first) for m in model.modules() if layer_type_of(m) is not None]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            example(model)
        return
    except Exception as exc:  # noqa: BLE001 - the user's forward on the user's inputs: say what failed, in one line
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes:
            module.training = training
    layer = called[0] if called else _first_layer(model)
    if example.sample_shape is not None:
        shape = example.sample_shape
        one, tensor = _hint(layer[1] if layer else None, shape)
        given = f"input_shape {shape} taken as one sample (a batch of shape {(SHAPE_BATCH, *shape)})"
        fix = (f"pass one sample's shape without the batch dimension{one}, "
               f"or an example input tensor with a batch dimension{tensor}")
    else:
        given = f"the example inputs ({example.describe()})"
        fix = "pass example inputs with a batch dimension, as the model takes them, or one sample's shape without it"
    takes = f"; its first layer {layer[0]!r} ({type(layer[1]).__name__}) takes {_takes(layer[1])}" if layer else ""
    raise ConfigError(f"{what}: {type(model).__name__} cannot run on {given}: {reason}; {fix}{takes}")


def example_inputs(model: nn.Module, value: Any, what: str, *, check: bool = True) -> ExampleInputs:
    """``value`` (one sample's shape, or inputs as the model takes them) as :class:`ExampleInputs`, checked on ``model``.

    See the module docstring for the two conventions. The model is run once
    on the inputs (eval mode, no gradients, train/eval flags restored); if
    that fails, :class:`ConfigError` in one line: what was given, why it
    failed, the convention expected, and what the first layer takes.
    ``what`` names the caller in messages. An :class:`ExampleInputs` is
    returned as it is (already checked). ``check=False`` only converts: for
    a caller whose own trace runs the model anyway and that calls
    :func:`check_runs` when that trace fails, so a good input costs no
    extra forward and a bad one still gets this message.
    """
    if isinstance(value, ExampleInputs):
        return value
    if isinstance(value, torch.Tensor):
        example = ExampleInputs((value,))
    elif isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
        example = ExampleInputs((), dict(value))
    elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        example = ExampleInputs(tuple(value))
    elif isinstance(value, (tuple, list, torch.Size)) and not any(isinstance(v, torch.Tensor) for v in value):
        shape = as_shape(value, what)
        parameter = next(iter(unwrap(model).parameters()), None)
        factory = {} if parameter is None else {"device": parameter.device, "dtype": parameter.dtype}
        example = ExampleInputs((torch.zeros((SHAPE_BATCH, *shape), **factory),), {}, shape)
    else:
        raise ConfigError(
            f"{what}: give one sample's shape as a tuple of ints, e.g. (1, 28, 28), or example inputs with a batch "
            f"dimension as the model takes them (a tensor, a tuple of tensors or a dict of them); got {type(value).__name__}"
            f"{'' if not isinstance(value, (tuple, list)) else ' mixing tensors and other values' if value else ' (empty)'}"
        )
    if check:
        check_runs(model, example, what)
    return example

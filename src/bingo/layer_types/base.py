"""The contract of a layer type, and the registry every part of bingo asks.

A *layer type* says, for one kind of module that holds a prunable weight,
everything scoring, selection, masking, compensation and shrinking need to
know, so none of them asks "is this a Linear?":

- which of the module's weights are scored by default (:meth:`LayerType.weights`);
- which axis of a weight holds its *units* (a unit is what neuron
  granularity scores and removes: a row of a Linear weight, a filter of a
  conv, a column of GPT-2's ``Conv1D`` weight, a row of an embedding), and
  the name of the bias whose entries go with the units;
- how to re-fit it by least squares (:meth:`LayerType.refits`): each
  :class:`Refit` names the rows of the weight's unit matrix it fits, and a
  forward hook that turns what the layer is fed into the design matrix
  ``X`` (``rows × fan-in``) whose product with those rows is the layer's
  output; or a sentence saying why it cannot be re-fitted;
- whether it can be a model's output layer;
- whether its forward is an ``nn.Linear`` in disguise (:meth:`LayerType.linear_form`),
  which is what :func:`bingo.to_sparse` stores as a sparse matrix.

Adding a layer type is one file with a subclass and one
:func:`register_layer_type` line (see the README's recipe). The types
registered last are asked first, so a user's type overrides a built-in one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError

__all__ = [
    "LAYER_TYPES",
    "DesignHook",
    "LayerType",
    "Refit",
    "expand_units",
    "from_unit_matrix",
    "layer_type_of",
    "register_layer_type",
    "unit_matrix",
]

#: ``(module, args, kwargs, output) -> X``: the design rows a layer's call contributes,
#: ``(rows, fan-in)`` with columns in the order of the weight's unit matrix (output is
#: None for a pre-hook).
DesignHook = Callable[[nn.Module, tuple, dict, Any], torch.Tensor]


@dataclass(frozen=True)
class Refit:
    """One least-squares problem of a layer: ``Y = X W[rows]ᵀ + b[bias_rows]``.

    ``rows`` selects rows of the weight's unit matrix (:func:`unit_matrix`),
    ``bias_rows`` the entries of its bias (the same as ``rows`` unless the
    bias is shared by several weights, as an attention's ``in_proj_bias``).
    ``design`` is called by a forward hook on the module ``hook_on`` names
    (``"self"``, or ``"parent"`` for a weight its parent applies without
    calling it, as ``nn.MultiheadAttention`` does with ``out_proj``),
    before (``when="pre"``) or after (``"post"``) the call.
    """

    rows: slice
    design: DesignHook
    bias_rows: slice | None = None
    hook_on: str = "self"
    when: str = "pre"

    def __post_init__(self) -> None:
        if self.bias_rows is None:
            object.__setattr__(self, "bias_rows", self.rows)


class LayerType:
    """One kind of layer. Subclass it, set ``module_type``, override what differs from an ``nn.Linear``."""

    #: what the type is called in messages
    name: ClassVar[str] = "layer"
    #: the module class(es) this type handles (``isinstance``); override :meth:`matches` for anything else
    module_type: ClassVar[type | tuple[type, ...]] = ()
    #: scored when the user gives no ``include``
    scored_by_default: ClassVar[bool] = True
    #: may be a model's output layer (its units are then the model's outputs)
    maps_to_outputs: ClassVar[bool] = True
    #: :func:`bingo.shrink` may rebuild it smaller (:meth:`resized`)
    shrinkable: ClassVar[bool] = False
    #: its input is indices looked up, not values it computes with (an embedding): no dtype or width to check
    takes_indices: ClassVar[bool] = False

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is of this type (by default ``isinstance(module, module_type)``)."""
        return isinstance(module, self.module_type)

    def weights(self, module: nn.Module) -> tuple[str, ...]:
        """Names of the module's own weights this type scores."""
        return ("weight",)

    def input_width(self, module: nn.Module, x: torch.Tensor) -> tuple[int, int, str] | None:
        """``(width x gives the layer, width it takes, what the width is called)``; None where not known.

        Lets :func:`bingo.compensate` name a calibration input of the wrong
        width before torch's shape error would. The default knows none.
        """
        return None

    def takes(self, module: nn.Module) -> str | None:
        """What ``module`` takes as input, for error messages, e.g. ``"(N, ..., 784)"``; None where not known."""
        return None

    def sample_layout(self, module: nn.Module) -> tuple[int, int] | None:
        """``(channels, dimensions of one sample)`` for a channels-first layer (a Conv2d: ``(C, 3)``), else None.

        Lets an input-shape error guess one sample's shape from a shape given with its batch dimension.
        """
        return None

    def unit_axis(self, module: nn.Module, name: str) -> int:
        """The axis of weight ``name`` that indexes units (output features)."""
        return 0

    def has_units(self, module: nn.Module, name: str) -> bool:
        """Whether neuron granularity may score ``name``'s units (False for packed q/k/v rows)."""
        return True

    def bias_name(self, module: nn.Module, name: str) -> str | None:
        """The bias whose entries belong to ``name``'s units, or None when there is none."""
        return "bias" if getattr(module, "bias", None) is not None else None

    def refits(self, module: nn.Module, name: str) -> list[Refit] | str:
        """The least-squares problems that re-fit weight ``name``, or why it cannot be re-fitted."""
        return f"no re-fit is defined for {type(module).__name__} ({self.name})"

    def linear_form(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None] | str:
        """``module``'s call as ``y = x Wᵀ + b`` on the last axis of its one input: ``(W (out × in), b)``, or why it is not.

        ``weight`` and ``bias`` are the values the forward uses (masks
        applied). :func:`bingo.to_sparse` replaces a module that has this form
        by a :class:`bingo.SparseLinear` of ``W``; a sentence instead says why
        it cannot (a conv's sliding window, a weight read by another module).
        """
        return f"no sparse form is defined for {type(module).__name__} ({self.name}): it is not y = x Wᵀ + b"

    def resized(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """A new module like ``module`` computing with ``weight`` (units first: ``(out, in, …)``) and ``bias``.

        What :func:`bingo.shrink` puts in place of a layer that lost units or
        inputs; only asked of types with ``shrinkable = True``.
        """
        raise NotImplementedError(f"{self.name} layers cannot be shrunk")


#: every registered layer type, in registration order (later ones are asked first)
LAYER_TYPES: list[LayerType] = []


def register_layer_type(layer_type: LayerType | type[LayerType]) -> LayerType:
    """Register a layer type (an instance, or a class, which is instantiated); usable as a class decorator."""
    if isinstance(layer_type, type) and not issubclass(layer_type, LayerType):
        raise ConfigError(f"register_layer_type takes a LayerType subclass or instance, got the class {layer_type.__name__}")
    instance = layer_type() if isinstance(layer_type, type) else layer_type
    if not isinstance(instance, LayerType):
        raise ConfigError(f"register_layer_type takes a LayerType subclass or instance, got {type(instance).__name__}")
    LAYER_TYPES.append(instance)
    return layer_type


def layer_type_of(module: nn.Module) -> LayerType | None:
    """The layer type of ``module`` (the last registered that matches), or None for a module no type handles."""
    for layer_type in reversed(LAYER_TYPES):
        if layer_type.matches(module):
            return layer_type
    return None


def unit_matrix(tensor: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """``tensor`` as ``(units, fan-in)``: units (``axis``) first, everything else flattened in order."""
    moved = tensor.movedim(axis, 0)
    return moved.reshape(moved.shape[0], -1)


def from_unit_matrix(matrix: torch.Tensor, like: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Inverse of :func:`unit_matrix`: a ``(units, fan-in)`` matrix back in ``like``'s shape."""
    moved_shape = like.movedim(axis, 0).shape
    return matrix.reshape(moved_shape).movedim(0, axis)


def expand_units(unit_values: torch.Tensor, like: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """A per-unit vector ``(units,)`` broadcast to ``like``'s shape along ``axis`` (contiguous)."""
    shape = [-1 if d == axis else 1 for d in range(like.dim())]
    return unit_values.reshape(shape).expand_as(like).contiguous()

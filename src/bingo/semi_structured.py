"""2:4-pruned ``nn.Linear`` weights as PyTorch's semi-structured sparse tensors, for the GPUs' sparse kernels.

A mask alone makes a model sparse, not fast. NVIDIA's sparse tensor cores
(Ampere and later) multiply a weight that keeps at most 2 of every 4
consecutive inputs of a row at up to twice the dense speed;
``torch.sparse.to_sparse_semi_structured`` stores such a weight compressed
(the kept values and 2-bit indices) and ``nn.Linear`` then calls those
kernels (cuSPARSELt, or CUTLASS). :func:`to_semi_structured` does that for
every ``nn.Linear`` :func:`bingo.prune` left in the 2:4 pattern
(``sparsity="2:4"``). It needs a CUDA GPU and the dtypes and shapes those
kernels take (float16 or bfloat16, both dimensions multiples of 16 to 64
depending on the backend); PyTorch's own message says which when one does not fit.
"""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_model
from .distributed import unwrap
from .errors import ConfigError
from .layer_types import LinearLayer, layer_type_of
from .layers import tied_weights
from .masks import make_permanent, masked_value
from .selection import is_n_m

__all__ = ["semi_structured_weight", "to_semi_structured"]


def _pruned_linears(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: module}`` of every ``nn.Linear`` (by its layer type) that carries a weight mask."""
    return {
        name: module for name, module in model.named_modules()
        if isinstance(layer_type_of(module), LinearLayer) and isinstance(getattr(module, "weight_mask", None), torch.Tensor)
    }


def semi_structured_weight(name: str, weight: torch.Tensor) -> torch.Tensor:
    """A 2:4 ``weight`` (a dense CUDA tensor) as ``torch.sparse.to_sparse_semi_structured`` stores it.

    :class:`ConfigError` naming the layer ``name`` and PyTorch's reason when
    PyTorch refuses it (its dtype, shape or device).
    """
    from torch.sparse import to_sparse_semi_structured

    weight = weight.detach().contiguous()
    try:
        return to_sparse_semi_structured(weight)
    except (RuntimeError, ValueError, TypeError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ConfigError(f"cannot convert {name!r} (nn.Linear, {weight.dtype}, {tuple(weight.shape)}) to a "
                          f"semi-structured sparse weight: {first}") from None


def to_semi_structured(model: nn.Module) -> tuple[str, ...]:
    """Convert every pruned ``nn.Linear`` of ``model`` to a 2:4 semi-structured sparse weight, in place.

    Each such layer's mask must keep at most 2 of every 4 consecutive
    inputs of every row (``bingo.prune(model, scores, sparsity="2:4")``);
    its mask is made permanent (:func:`bingo.make_permanent` of that
    layer: ``weight`` a plain parameter again, its bias mask baked in too)
    and its weight replaced by
    ``torch.sparse.to_sparse_semi_structured(weight)``. For inference: the
    model then runs on the sparse kernels. Other pruned layers (convs,
    GPT-2's ``Conv1D``, attention projections) keep their masks.

    The device is the model's (its first parameter's). Nothing is changed
    unless every layer converts: each of these is a one-line
    :class:`ConfigError` first:

    - no ``nn.Linear`` of the model is pruned;
    - a pruned ``nn.Linear`` is not in the 2:4 pattern (it is named);
    - a pruned ``nn.Linear`` shares its weight with another module (a tied
      ``lm_head``): the other use cannot take a sparse tensor;
    - the model is not on a CUDA device, or CUDA is not available (the
      layers that would have been converted are named);
    - PyTorch refuses a layer's weight (its dtype or shape; the layer and
      PyTorch's reason are named).

    Returns:
        The names of the modules converted, in model order.
    """
    model = unwrap(check_model("to_semi_structured", model))
    linears = _pruned_linears(model)
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no pruned nn.Linear to convert; prune it with "
                          "bingo.prune(model, scores, sparsity='2:4') first")
    tied = {alias: key for key, aliases in tied_weights(model).items() for alias in (key, *aliases)}
    for name, module in linears.items():
        key = f"{name}.weight" if name else "weight"
        if key in tied:
            others = sorted(k for k, v in tied.items() if v == tied[key] and k != key)
            raise ConfigError(f"{name!r} shares its weight with {', '.join(others)}; a semi-structured weight can "
                              "serve only a Linear, so a tied weight cannot be converted")
        mask = module.weight_mask
        if not is_n_m(mask, 2, 4):
            fan_in = mask.shape[1]
            why = (f"its fan-in {fan_in} is not a multiple of 4" if fan_in % 4 else
                   "some group of 4 consecutive inputs of a row keeps more than 2")
            raise ConfigError(f"{name!r} (nn.Linear {tuple(mask.shape)}) is not pruned 2:4: {why}; "
                              "prune it with sparsity='2:4' or leave it out of the scores")
    parameter = next(model.parameters())
    if parameter.device.type != "cuda" or not torch.cuda.is_available():
        where = f"the model is on {parameter.device}" + ("" if torch.cuda.is_available() else " and CUDA is not available")
        raise ConfigError(f"semi-structured sparse kernels need a CUDA GPU; {where}; would have converted "
                          f"{len(linears)} nn.Linear: {', '.join(linears)}")
    converted = {}
    for name, module in linears.items():
        with torch.no_grad():
            converted[name] = semi_structured_weight(name, masked_value(module, "weight"))
    for name, module in linears.items():
        make_permanent(module)
        requires_grad = module.weight.requires_grad
        module.weight = nn.Parameter(converted[name], requires_grad=requires_grad)
    return tuple(linears)


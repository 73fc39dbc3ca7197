"""SNIP: prune at initialization by connection sensitivity, then train the sparse network.

Lee, Ajanthan & Torr, "SNIP: Single-shot Network Pruning based on Connection
Sensitivity" (ICLR 2019), eq. (6): with masks ``c`` on the weights,
``g_j = ∂L(c ⊙ w; D) / ∂c_j`` at ``c = 1`` is ``w_j · ∂L/∂w_j``, and the
connections with the smallest ``|g_j|`` are removed before any training.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...checks import check_field_types
from ...devices import model_device, to_device
from ...errors import ConfigError
from ...layers import find_layers, weight_of
from ...pruning import prune
from .base import Experiment, ForwardCounter, Outcome, Strategy, register

__all__ = ["SnipConfig", "SnipStrategy", "snip_scores"]


def snip_scores(
    model: nn.Module, x_batches: Iterable[torch.Tensor], y_batches: Iterable[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Connection sensitivity ``|w ⊙ ∂L/∂w|`` per weight (Lee et al. 2019, eq. 6, unnormalised).

    ``L`` is the sum over the batches of each batch's mean cross-entropy, so
    several batches act as one larger ``D`` (gradients are summed before the
    absolute value). Dividing by ``Σ|g|``, as the paper does, would not change
    the ranking and is left out.

    Returns ``{weight key: scores}`` for the layers of :func:`bingo.find_layers`,
    shaped like the weights, higher = more significant; on a pruned module
    the weight is ``weight_orig`` and masked entries score 0. The forward
    runs in training mode, as the first training step would see the network
    (batch statistics in BatchNorm, dropout on), but leaves nothing behind:
    the train/eval flag, every buffer (running statistics), the CPU RNG (and the model's CUDA device's) and
    the parameters' ``.grad`` are as they were.
    """
    layers = find_layers(model)
    weights = [weight_of(module, key) for key, module in layers.items()]
    sums = [torch.zeros_like(weight) for weight in weights]
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    was_training = model.training
    device = model_device(model)
    # dropout draws from the model's device's generator: fork that one (the CPU's always)
    forked = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=forked), torch.enable_grad():
            model.train()
            for x, y in zip(x_batches, y_batches, strict=True):
                loss = F.cross_entropy(model(to_device(x, device)), to_device(y, device))
                for total, grad in zip(sums, torch.autograd.grad(loss, weights)):
                    total += grad
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
    return {key: (weight.detach() * total).abs().cpu() for key, weight, total in zip(layers, weights, sums)}


@dataclass(frozen=True)
class SnipConfig:
    """SNIP (Lee, Ajanthan & Torr 2019)."""

    batches: int = field(default=3, metadata={"help": "training batches the connection sensitivity is computed on"})

    def __post_init__(self) -> None:
        check_field_types(self)
        if int(self.batches) != self.batches or self.batches < 1:
            raise ConfigError(f"SNIP batches must be a whole number >= 1, got {self.batches!r}")


@register
class SnipStrategy(Strategy):
    """SNIP: score θ0 once, prune globally to each sparsity, train the sparse network from θ0.

    The scoring batches are the first ``batches`` batches of the experiment's
    first training epoch (same seeded permutation, same batch size). The
    scores are computed once and shared by every target, so each outcome is
    charged the scoring (its time and forward passes) plus its own prune and
    full training run.
    """

    name = "snip"
    default_config = SnipConfig()

    def run(self, experiment: Experiment, sparsities: list[float]) -> Iterator[Outcome]:
        data, recipe = experiment.data, experiment.train_config
        order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(recipe.seed))
        batches = [order[i * recipe.batch_size : (i + 1) * recipe.batch_size] for i in range(self.config.batches)]
        batches = [index for index in batches if len(index)]
        start = time.perf_counter()
        model = experiment.new_model()
        with ForwardCounter(model) as counter:
            scores = snip_scores(model, (data.x_train[i] for i in batches), (data.y_train[i] for i in batches))
        score_seconds = time.perf_counter() - start
        for sparsity in sparsities:
            model = experiment.new_model()
            start = time.perf_counter()
            masks = prune(model, scores, sparsity, "global", seed=experiment.seed)
            seconds = score_seconds + time.perf_counter() - start
            trained = experiment.train(model, description=f"snip to {sparsity:g}")
            yield Outcome(
                self.name,
                experiment.seed,
                sparsity,
                experiment.evaluate(model),
                seconds + trained.seconds,
                trained.steps,
                counter.count + trained.forward_passes,
                masks,
                model=model,
            )

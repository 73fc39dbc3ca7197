"""Shrinking a channel-pruned ResNet-18: bingo's ``shrink`` against Torch-Pruning doing the same removal (issue 19).

    python benchmarks/shrink_speed.py      # writes benchmarks/results/shrink_speed.md; about 40 seconds

The model is torchvision's ResNet-18 (ImageNet layout: 7×7 stem, max-pool,
four stages of two basic blocks, 1000 classes; 11.7 M parameters), defined
here so torchvision is not needed, on one 3 × 224 × 224 example. Half of the
channels of every coupled group go, through the public API:
``bingo.channel_groups``, ``bingo.prune_coupled`` with magnitude neuron
scores, ``scope="layer"``. Then the same physical removal three ways:

- bingo, groups reused: ``bingo.shrink(model, example, groups=groups)`` on the
  masked model (the groups the caller's ``channel_groups`` returned);
- bingo, no groups: ``bingo.shrink(model, example)`` (for information);
- Torch-Pruning itself: on the plain model (masks baked in, which is what a
  Torch-Pruning user holds), ``copy.deepcopy``, ``DependencyGraph().build_dependency``
  and one ``get_pruning_group(root, prune_conv_out_channels, idxs).prune()``
  per group, with the channel indices known beforehand: copy + graph + removal.

The three are timed interleaved in one process (each round runs all three,
in a rotating order), and each bingo form is reported as the median over
rounds of its time ÷ Torch-Pruning's time in the same round, with the range.
The results are checked identical (every tensor of the state dicts equal,
same parameter count, same outputs). A cProfile of bingo's shrink (groups
reused) says where its time goes. Target: ≤ 2× Torch-Pruning's time.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import os
import platform
import pstats
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import bingo
from bingo.io import atomic_write
from bingo.masks import permanent_copy

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks/results/shrink_speed.md"
SPARSITY, ROUNDS, SIDE = 0.5, 31, 224


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3×3 conv + BatchNorm, added to the (downsampled) input, then ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18()`` (He et al. 2016), module for module: 11,689,512 parameters."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _trained_like(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters away from their defaults, as after training."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
    return model


def setup(side: int = SIDE):
    """The masked model, its groups, the example, and Torch-Pruning's inputs (the plain model, the indices per group root)."""
    torch.manual_seed(0)
    model = _trained_like(ResNet18()).eval()
    example = torch.randn(1, 3, side, side)
    groups = bingo.channel_groups(model, example)
    keep = bingo.prune_coupled(model, bingo.magnitude_scores(model, "neuron"), groups, SPARSITY)
    plain = permanent_copy(model)
    plan = [(group.key.rpartition(".")[0], (~keep[group.key]).nonzero().flatten().tolist()) for group in groups if group.key in keep]
    return model, groups, example, plain, plan


def torch_pruning_shrink(plain: nn.Module, example: torch.Tensor, plan: list) -> nn.Module:
    """What a Torch-Pruning user does to remove known channels from a copy: deepcopy, graph, one group per root."""
    import torch_pruning as tp

    net = copy.deepcopy(plain)
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=example, verbose=False)
    for name, idxs in plan:
        if idxs:
            root = net.get_submodule(name)
            fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
            graph.get_pruning_group(root, fn, idxs).prune()
    return net


def _identical(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[bool, float]:
    sa, sb = a.state_dict(), b.state_dict()
    same = list(sa) == list(sb) and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        gap = float((a.eval()(x) - b.eval()(x)).abs().max())
    return same, gap


def _profile(model: nn.Module, example: torch.Tensor, groups: list, calls: int = 5) -> list[tuple[str, float]]:
    """Seconds per call (cProfile's cumulative, so inflated alike) of the parts of ``shrink(..., groups=groups)``."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        bingo.shrink(model, example, groups=groups)
    profiler.disable()
    stats = pstats.Stats(profiler).stats

    def cumulative(file: str, function: str) -> float:
        return sum(v[3] for (f, _, name), v in stats.items() if f.endswith(file) and name == function) / calls

    zero, check = cumulative("coupled.py", "_zero_channels"), cumulative("coupled.py", "_check_same_outputs")
    return [
        ("whole `shrink`", cumulative("shrink.py", "shrink")),
        ("one copy, masks baked in (`permanent_copy`)", cumulative("masks.py", "permanent_copy")),
        ("dependency graph (Torch-Pruning's `build_dependency`: one forward with autograd)", cumulative("graph.py", "build_dependency")),
        ("finding the groups in it (`get_all_groups`)", cumulative("graph.py", "get_all_groups")),
        ("which channels are zero (`_zero_channels`)", zero),
        ("removal (`get_pruning_group` + `prune` per group)", cumulative("coupled.py", "_remove_zero_channels") - zero - check),
        ("output check (one forward of the shrunk model)", check),
    ]


def measure(rounds: int = ROUNDS, side: int = SIDE) -> dict:
    torch.set_num_threads(1)
    model, groups, example, plain, plan = setup(side)
    forms = {
        "Torch-Pruning": lambda: torch_pruning_shrink(plain, example, plan),
        "bingo, groups reused": lambda: bingo.shrink(model, example, groups=groups),
        "bingo, no groups": lambda: bingo.shrink(model, example),
    }
    results = {name: fn() for name, fn in forms.items()}  # warm-up, and the results to compare
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(2))
    checks = {name: _identical(results["Torch-Pruning"], small, x) for name, small in results.items() if name != "Torch-Pruning"}
    with torch.no_grad():
        masked_gap = float((results["bingo, groups reused"](x) - model(x)).abs().max())
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    names = list(forms)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order: no form always first
            start = time.perf_counter()
            forms[name]()
            seconds[name].append(time.perf_counter() - start)
    ratios = {name: [s / t for s, t in zip(seconds[name], seconds["Torch-Pruning"])] for name in names[1:]}
    return {
        "rounds": rounds, "side": side, "groups": len(groups),
        "parameters": (bingo.count_parameters(model), bingo.count_parameters(results["Torch-Pruning"])),
        "seconds": {name: statistics.median(v) for name, v in seconds.items()},
        "ratios": ratios, "checks": checks, "masked_gap": masked_gap,
        "profile": _profile(model, example, groups, calls=max(1, min(5, rounds))),
    }


def report(result: dict) -> str:
    dense, shrunk = result["parameters"]
    lines = ["| form | median seconds | time ÷ Torch-Pruning's (median, range) | identical to Torch-Pruning's result |",
             "|---|---:|---:|---|"]
    lines.append(f"| Torch-Pruning (deepcopy + graph + removal) | {result['seconds']['Torch-Pruning']:.3f} | 1 | – |")
    for name, ratios in result["ratios"].items():
        same, gap = result["checks"][name]
        lines.append(f"| {name} | {result['seconds'][name]:.3f} | {statistics.median(ratios):.2f}× "
                     f"({min(ratios):.2f}–{max(ratios):.2f}) | {'yes' if same else 'NO'}: every tensor equal, outputs differ by {gap:.1e} |")
    profile = ["| part | seconds per call (cProfile) |", "|---|---:|"]
    profile += [f"| {label} | {seconds:.3f} |" for label, seconds in result["profile"]]
    return f"""# Shrink speed: a channel-pruned ResNet-18, bingo against Torch-Pruning

`python benchmarks/shrink_speed.py`: {platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__},
1 thread, {result['rounds']} interleaved rounds (rotating order). torchvision's ResNet-18 on one 3 × {result['side']} × {result['side']}
example, {SPARSITY:.0%} of the channels of each of its {result['groups']} coupled groups pruned by `bingo.prune_coupled`:
{dense:,} parameters → {shrunk:,} after removal. Target (issue 19): ≤ 2× Torch-Pruning's time.

{chr(10).join(lines)}

The shrunk model's outputs equal the masked model's to {result['masked_gap']:.1e}. Torch-Pruning is timed on the plain
model (masks baked in beforehand) with the channel indices given; bingo on the masked model, finding the zero
channels itself and checking the result with one forward of the shrunk model.

Where the time of `bingo.shrink(model, example, groups=groups)` goes (cProfile, its overhead included):

{chr(10).join(profile)}
"""


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds")
    parser.add_argument("--side", type=int, default=SIDE, help="image height and width of the example")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the results file alone")
    args = parser.parse_args(argv)
    text = report(measure(args.rounds, args.side))
    if not args.no_write:
        atomic_write(REPORT, lambda tmp: Path(tmp).write_text(text))
    return text


if __name__ == "__main__":
    print(main())

"""One short check of bingo on a CUDA GPU: the search's overhead and host syncs, compensation at 4096², pruned speed.

    python benchmarks/gpu_check.py                 # on the first CUDA GPU; writes benchmarks/results/gpu_check.md
    python benchmarks/gpu_check.py --device cpu --quick   # the same code on the CPU, small sizes (the test does this)

Without a CUDA GPU and without ``--device cpu`` it says so and exits (code 0):
nothing to measure. Every time is taken after ``torch.cuda.synchronize()``
(the device's work, not its launch), and ratios are interleaved in one
process. What it measures, on the device named in the report:

1. **Search**: the default search (``bingo.BINGO_SEARCH``) on an MLP trained
   by SGD: host syncs during a step without fake passes and during one with
   them (``torch.cuda.set_sync_debug_mode("warn")`` counts them on CUDA;
   on the CPU, read-backs of tensors are counted as ``tests/test_host_syncs.py``
   does), and the time of training with the search ÷ without (median, range).
2. **Compensation** of one 4096 × 4096 Linear pruned to 50%: seconds,
   solver chosen and the relative output error before and after.
3. **Pruned speed** of a 90%-pruned 4096² Linear at batch 1 and 64: bingo's
   masked forward, ``bingo.to_sparse`` (CSR or what measures faster) and,
   where the GPU has the kernels, 2:4 semi-structured
   (``bingo.to_semi_structured``, float16) against dense.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import bingo  # noqa: E402
from bingo.io import atomic_write  # noqa: E402

REPORT = ROOT / "benchmarks/results/gpu_check.md"
READ_BACKS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(device: torch.device, work, repeats: int) -> float:
    _wait(device)
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    _wait(device)
    return (time.perf_counter() - start) / repeats


@contextlib.contextmanager
def _counting_syncs(device: torch.device):
    """``calls``: synchronising CUDA calls (sync debug mode) on a GPU, read-backs of tensors on the CPU."""
    calls: list[str] = []
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield calls
            finally:
                torch.cuda.set_sync_debug_mode("default")
        calls.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))
        return
    originals = {name: getattr(torch.Tensor, name) for name in READ_BACKS}

    def wrapped(name):
        def call(self, *args, **kwargs):
            calls.append(name)
            return originals[name](self, *args, **kwargs)
        return call

    for name in READ_BACKS:
        setattr(torch.Tensor, name, wrapped(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def check_search(device: torch.device, quick: bool) -> dict:
    torch.manual_seed(0)
    width, batch = (256, 64) if quick else (2048, 256)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    search = bingo.TicketSearch(model, config=bingo.BINGO_SEARCH, seed=0)
    x, y = torch.randn(batch, width, device=device), torch.randint(0, 10, (batch,), device=device)

    def train_step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def with_search():
        train_step()
        search.step(x, y)

    with_search()  # step 1: fake passes, warm-up
    syncs = {}
    for label in ("step without fake passes", "step with fake passes"):
        while ((search.steps) % search.every == 0) != (label == "step with fake passes"):
            with_search()  # advance to the next step of the wanted kind
        train_step()
        _wait(device)
        with _counting_syncs(device) as calls:
            search.step(x, y)
        syncs[label] = len(calls)
    steps = search.every * (1 if quick else 3)
    ratios = []
    for _ in range(1 if quick else 5):
        plain = _seconds(device, train_step, steps)
        searched = _seconds(device, with_search, steps)
        ratios.append(searched / plain)
    return {"syncs": syncs, "ratios": ratios, "every": search.every, "width": width, "batch": batch}


def check_compensation(device: torch.device, quick: bool) -> dict:
    torch.manual_seed(0)
    width = 256 if quick else 4096
    model = nn.Sequential(nn.Linear(width, width)).to(device)
    calibration = torch.randn(2 * width if quick else 8192, width, device=device)
    with torch.no_grad():
        dense_out = model(calibration)
    bingo.prune(model, bingo.magnitude_scores(model, include=["*"]), 0.5)
    with torch.no_grad():
        before = float((model(calibration) - dense_out).norm() / dense_out.norm())
    _wait(device)
    start = time.perf_counter()
    result = bingo.compensate(model, None, calibration, reference=None, validation=0.0)
    _wait(device)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        after = float((model(calibration) - dense_out).norm() / dense_out.norm())
    return {"width": width, "seconds": seconds, "solvers": dict(result.solvers), "before": before, "after": after}


def check_speed(device: torch.device, quick: bool) -> list[dict]:
    torch.manual_seed(0)
    width = 512 if quick else 4096
    dense = nn.Linear(width, width).to(device).eval()
    keep = torch.rand(width, width, device=device) >= 0.9
    masked = copy.deepcopy(dense)
    bingo.apply_masks(masked, {"weight": keep})
    sparse = copy.deepcopy(masked)
    converted = bingo.to_sparse(sparse, choose="always").converted
    forms = {"bingo masked": masked, "bingo.to_sparse": sparse}
    if device.type == "cuda":  # 2:4 kernels: float16 on GPUs that have them
        two_four = nn.Linear(width, width).to(device).half().eval()
        bingo.prune(two_four, bingo.magnitude_scores(two_four, include=["*"]), "2:4")
        try:
            bingo.to_semi_structured(two_four)
            forms["2:4 semi-structured (fp16, vs fp16 dense)"] = two_four
        except bingo.BingoError as exc:
            print(f"2:4 not measured: {exc}")
    rows = []
    with torch.no_grad(), bingo.cached_masks():  # the masked form at its best: the product multiplied out once
        for batch in (1, 64):
            x = torch.randn(batch, width, device=device)
            torch.testing.assert_close(sparse(x), masked(x), rtol=1e-4, atol=1e-4)
            for label, module in forms.items():
                base_module, inputs = (dense, x) if "fp16" not in label else (dense.half(), x.half())
                ratios = []
                for _ in range(3 if quick else 10):
                    base = _seconds(device, lambda: base_module(inputs), 5 if quick else 50)
                    ratios.append(base / _seconds(device, lambda: module(inputs), 5 if quick else 50))
                if "fp16" in label:
                    dense.float()
                rows.append({"batch": batch, "form": label, "ratios": ratios})
    return rows, list(converted)


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, torch {torch.__version__}"
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (to check the plumbing); default cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes, one round (seconds)")
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured. "
              "`--device cpu --quick` runs the same code on the CPU.")
        return None
    device = bingo.devices.resolve_device(args.device)
    search = check_search(device, args.quick)
    compensation = check_compensation(device, args.quick)
    speed, converted = check_speed(device, args.quick)

    def cell(values):
        return f"{statistics.median(values):.2f}× ({min(values):.2f}–{max(values):.2f})"

    syncs = ", ".join(f"{label}: {count}" for label, count in search["syncs"].items())
    lines = [
        f"# GPU check on {_describe(device)}",
        "",
        f"`python benchmarks/gpu_check.py{' --device ' + args.device if args.device != 'cuda' else ''}{' --quick' if args.quick else ''}`.",
        "",
        "## Search (default `bingo.BINGO_SEARCH`)",
        "",
        f"MLP {search['width']}-{search['width']}-{search['width']}-10, batch {search['batch']}, probes every {search['every']} steps.",
        f"Host syncs inside `search.step`: {syncs} (target: 0 and at most 1).",
        f"Training with the search ÷ without: {cell(search['ratios'])} (target ≤ 1.05×).",
        "",
        "## Compensation",
        "",
        f"One {compensation['width']}² Linear at 50% (magnitude): {compensation['seconds']:.2f} s, solver "
        f"{', '.join(sorted(set(compensation['solvers'].values()))) or 'none'}; relative output error "
        f"{compensation['before']:.4f} → {compensation['after']:.4f}.",
        "",
        "## Pruned speed (90%-pruned Linear, speed ÷ dense, median and range)",
        "",
        "| batch | form | speed ÷ dense |",
        "|---:|---|---:|",
        *[f"| {row['batch']} | {row['form']} | {cell(row['ratios'])} |" for row in speed],
        "",
        f"`to_sparse` converted: {', '.join(name or '(the Linear itself)' for name in converted) or 'nothing'}.",
        "",
    ]
    text = "\n".join(lines)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    return text


if __name__ == "__main__":
    report = main()
    if report:
        print(report)

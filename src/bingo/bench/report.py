"""Tables and figures from the ``results.json`` that ``bingo compare`` writes.

The input is the plain dict that ``bingo compare`` saves::

    {"data": ..., "model": ..., "epochs": ...,
     "settings": {"methods": [...], "sparsities": [...], "seeds": [...], ...},
     "dense": [{"seed", "accuracy", "seconds", "train_steps", "forward_passes"}, ...],
     "runs": [{"method", "seed", "sparsity", "accuracy", "seconds", "train_steps", "forward_passes"}, ...],
     "overlap": [{"seed", "sparsity", "<a>_vs_<b>": ..., "random_expectation": ...}, ...],
     "search_overhead": [{"seed", "train_seconds", "train_seconds_with_search", "ratio"}, ...]}

``overlap`` and ``search_overhead`` may be empty or absent; every key of an
``overlap`` row other than ``seed``, ``sparsity`` and ``random_expectation``
is a pair of methods (``bingo_vs_imp``) and gets a column. Method names are
not interpreted: any name in ``runs`` is a method, ordered as in
``settings["methods"]`` (names missing there follow in order of first
appearance). A ``results`` dict missing a required key raises
:class:`~bingo.errors.DataError` naming the key.

Numbers are formatted one way everywhere: accuracies and overlaps with 3
decimals, seconds with 1 (2 significant digits below 0.05 s), ratios to
dense time with 2 and counts (forward passes, train steps) as integers with
thousands separators. Spreads are the sample standard deviation over seeds
(0 with one seed).

Every file goes through :func:`bingo.io.atomic_write`, so a failure leaves
the previous file intact. Matplotlib is imported only inside the plotting
functions, so ``import bingo.bench.report`` (and the CLI) does not pay for it.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import atomic_write

__all__ = ["CSV_FIELDS", "aggregate", "markdown_tables", "plot_accuracy", "plot_cost", "write_csv", "write_report"]

CSV_FIELDS = ("method", "seed", "sparsity", "accuracy", "seconds", "train_steps", "forward_passes")
"""Columns of ``results.csv``, one line per entry of ``results["runs"]``."""

_DENSE_FIELDS = ("seed", "accuracy", "seconds", "train_steps", "forward_passes")
_MISSING = "—"


# --------------------------------------------------------------------------- checking and summarising


def _rows(results: Mapping[str, Any], key: str, fields: Sequence[str], required: bool = True) -> list[Mapping[str, Any]]:
    """``results[key]`` as a list of rows, each checked to have ``fields``."""
    if not isinstance(results, Mapping):
        raise DataError(f"results must be a dict as written by 'bingo compare', got {type(results).__name__}")
    if key not in results:
        if required:
            raise DataError(f"results has no {key!r} list")
        return []
    rows = results[key]
    if rows is None and not required:
        return []
    if not isinstance(rows, list):
        raise DataError(f"results[{key!r}] must be a list, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"results[{key!r}][{i}] must be a dict, got {type(row).__name__}")
        for field in fields:
            if field not in row:
                raise DataError(f"results[{key!r}][{i}] has no {field!r}")
    return rows


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1 in the denominator); 0 for fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _method_order(results: Mapping[str, Any], runs: Iterable[Mapping[str, Any]]) -> list[str]:
    present = list(dict.fromkeys(str(r["method"]) for r in runs))
    declared = [str(m) for m in (results.get("settings") or {}).get("methods", [])]
    return [m for m in declared if m in present] + [m for m in present if m not in declared]


def _dense(results: Mapping[str, Any]) -> dict[str, float]:
    """Means (and accuracy std) over the dense rows; NaN where there are none."""
    rows = _rows(results, "dense", _DENSE_FIELDS)
    accuracy = [float(r["accuracy"]) for r in rows]
    return {
        "n": len(rows),
        "accuracy_mean": _mean(accuracy),
        "accuracy_std": _std(accuracy),
        "seconds_mean": _mean([float(r["seconds"]) for r in rows]),
        "train_steps_mean": _mean([float(r["train_steps"]) for r in rows]),
        "forward_passes_mean": _mean([float(r["forward_passes"]) for r in rows]),
    }


def _seeds(results: Mapping[str, Any]) -> list:
    seeds = {r["seed"] for key in ("dense", "runs") for r in (results.get(key) or []) if "seed" in r}
    if not seeds:
        seeds = set((results.get("settings") or {}).get("seeds", []))
    return sorted(seeds, key=str)


def aggregate(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One summary row per (method, sparsity) present in ``results["runs"]``.

    Each row has ``method``, ``sparsity``, ``n`` (number of runs, i.e. seeds),
    ``accuracy_mean``, ``accuracy_std`` (sample std over runs, 0 when
    ``n == 1``), ``seconds_mean``, ``forward_passes_mean``,
    ``train_steps_mean`` and ``cost_vs_dense`` = ``seconds_mean`` / mean
    seconds of the dense runs (``None`` when there is no dense time to divide
    by). Rows are ordered by method as in ``settings["methods"]``, then by
    ascending sparsity.
    """
    runs = _rows(results, "runs", CSV_FIELDS)
    dense_seconds = _dense(results)["seconds_mean"]
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((str(run["method"]), float(run["sparsity"])), []).append(run)
    order = {m: i for i, m in enumerate(_method_order(results, runs))}
    rows = []
    for method, sparsity in sorted(groups, key=lambda k: (order[k[0]], k[1])):
        group = groups[(method, sparsity)]
        accuracy = [float(r["accuracy"]) for r in group]
        seconds = _mean([float(r["seconds"]) for r in group])
        rows.append(
            {
                "method": method,
                "sparsity": sparsity,
                "n": len(group),
                "accuracy_mean": _mean(accuracy),
                "accuracy_std": _std(accuracy),
                "seconds_mean": seconds,
                "forward_passes_mean": _mean([float(r["forward_passes"]) for r in group]),
                "train_steps_mean": _mean([float(r["train_steps"]) for r in group]),
                "cost_vs_dense": seconds / dense_seconds if dense_seconds > 0 else None,
            }
        )
    return rows


# --------------------------------------------------------------------------- CSV


def write_csv(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``results["runs"]`` as CSV with header :data:`CSV_FIELDS`, atomically.

    One line per run, in the order of ``runs``; keys other than
    :data:`CSV_FIELDS` are left out. Returns the path written.
    """
    runs = _rows(results, "runs", CSV_FIELDS)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(runs)

    return atomic_write(path, write)


# --------------------------------------------------------------------------- figures


def _figure(width: float = 7.0, height: float = 4.5):
    """A matplotlib Figure that never touches a display.

    The Figure API keeps no global state, so it needs no backend; ``Agg`` is
    selected only when pyplot has not been imported yet, because switching
    the backend under a running pyplot (a notebook) closes the user's figures.
    """
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save_png(fig, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _remaining_axis(ax, sparsities: Sequence[float]) -> None:
    """Log x axis of remaining weights (%), inverted so sparsity grows to the right (Frankle & Carbin, 2019)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    remaining = sorted({100.0 * (1.0 - s) for s in sparsities}, reverse=True)
    ax.set_xscale("log")
    if remaining:
        ax.set_xticks(remaining, [f"{r:.3g}" for r in remaining])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        # a little room so markers at the ends are not cut
        ax.set_xlim(max(remaining) * 1.15, min(remaining) / 1.15)
    else:
        ax.invert_xaxis()
    ax.set_xlabel("remaining weights (%), log scale; sparsity grows →")


def _plot_sparsities(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    sparsities = sorted({r["sparsity"] for r in rows})
    bad = [s for s in sparsities if not 0.0 <= s < 1.0]
    if bad:
        raise DataError(f"cannot plot sparsity {bad[0]!r} on a log axis of remaining weights; sparsities must be in [0, 1)")
    return sparsities


def _plural(n: Any, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _title(results: Mapping[str, Any]) -> str:
    return (
        f"{results.get('data', '?')} / {results.get('model', '?')}, "
        f"{_plural(results.get('epochs', '?'), 'epoch')}, {_plural(len(_seeds(results)), 'seed')}"
    )


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    """The same colour for a method in every figure."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def plot_accuracy(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Save a PNG of test accuracy against remaining weights, atomically.

    One line per method: mean over seeds with a ±1 sample-std band and error
    bars. The x axis is remaining weights (%) = 100·(1 − sparsity) on a log
    scale, inverted so sparsity grows to the right as in the Lottery Ticket
    paper; the dense mean accuracy is a dashed horizontal line. Raises
    :class:`~bingo.errors.DataError` for a sparsity outside [0, 1).
    """
    rows = aggregate(results)
    dense = _dense(results)
    sparsities = _plot_sparsities(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = _colors(methods)

    fig = _figure()
    ax = fig.add_subplot()
    for method in methods:
        points = [r for r in rows if r["method"] == method]
        x = [100.0 * (1.0 - r["sparsity"]) for r in points]
        mean = [r["accuracy_mean"] for r in points]
        std = [r["accuracy_std"] for r in points]
        ax.errorbar(x, mean, yerr=std, color=colors[method], marker="o", markersize=4, capsize=3, label=method)
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=colors[method], alpha=0.15, linewidth=0)
    if dense["n"]:
        ax.axhline(dense["accuracy_mean"], color="black", linestyle="--", linewidth=1, label=f"dense ({dense['accuracy_mean']:.3f})")
    _remaining_axis(ax, sparsities)
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title(_title(results))
    ax.grid(True, which="major", alpha=0.3)
    if methods or dense["n"]:
        ax.legend(loc="best", fontsize="small")
    return _save_png(fig, path)


def _plain_log_labels(axis, span: float) -> None:
    """Label a log axis "0.02", "20", "60" rather than "2e-02" or "2×10¹".

    Within about a decade the 2, 3 and 5 minor ticks are labelled too, or the
    axis would show one number or none; over wider spans only the decades.
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if span < 30:
        def minor(v: float, _: object) -> str:
            mantissa = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
            return f"{v:g}" if mantissa in (2, 3, 5) else ""

        axis.set_minor_formatter(FuncFormatter(minor))
    else:
        axis.set_minor_formatter(NullFormatter())


#: below this many seconds a wall-clock time is mostly timer, start-up and scheduling noise on a shared machine
NOISY_SECONDS = 1.0


def _cost_axis(ax, values: Sequence[float]) -> None:
    """Log y axis with plain labels over more than a decade; a linear one (several ticks, never one) within it."""
    from matplotlib.ticker import MaxNLocator

    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) >= 10:
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis, max(positive) / min(positive))
    else:
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6))


def plot_cost(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Save a PNG of what each method cost against sparsity, atomically.

    Two panels with the x axis of :func:`plot_accuracy` (remaining weights,
    log, inverted, so sparsity grows to the right): left, the counted work,
    training-batch forward passes per run relative to dense training (1× =
    one dense run; repeatable, the number to compare); right, mean
    wall-clock seconds, with a note when the runs are so short that their
    times are mostly noise (below :data:`NOISY_SECONDS`). Dense training is
    the dashed line in both.
    """
    rows = aggregate(results)
    dense = _dense(results)
    sparsities = _plot_sparsities(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = _colors(methods)
    dense_passes = dense["forward_passes_mean"] if dense["n"] and dense["forward_passes_mean"] > 0 else None

    fig = _figure(width=11.0)
    work, wall = fig.subplots(1, 2)
    for method in methods:
        points = [r for r in rows if r["method"] == method]
        x = [100.0 * (1.0 - r["sparsity"]) for r in points]
        passes = [r["forward_passes_mean"] / (dense_passes or 1.0) for r in points]
        work.plot(x, passes, color=colors[method], marker="o", markersize=4, label=method)
        wall.plot(x, [r["seconds_mean"] for r in points], color=colors[method], marker="o", markersize=4, label=method)
    if dense["n"]:
        if dense_passes:
            work.axhline(1.0, color="black", linestyle="--", linewidth=1, label="dense training (1×)")
        wall.axhline(dense["seconds_mean"], color="black", linestyle="--", linewidth=1, label=f"dense training ({_seconds(dense['seconds_mean'], None)})")
    passes_all = [r["forward_passes_mean"] / (dense_passes or 1.0) for r in rows] + ([1.0] if dense_passes else [])
    times = [r["seconds_mean"] for r in rows] + ([dense["seconds_mean"]] if dense["n"] else [])
    _cost_axis(work, passes_all)
    _cost_axis(wall, times)
    for ax in (work, wall):
        _remaining_axis(ax, sparsities)
        ax.grid(True, which="major", alpha=0.3)
    work.set_ylabel("forward passes per run, × dense training" if dense_passes else "forward passes per run")
    work.set_title("counted work (repeatable)")
    wall.set_ylabel("wall-clock seconds per run (mean over seeds)")
    wall.set_title("wall time (noisy on shared machines)")
    if times and max(times) < NOISY_SECONDS:
        wall.text(0.02, 0.02, f"every time is under {NOISY_SECONDS:g} s: differences are mostly noise;\ncompare the counted work",
                  transform=wall.transAxes, fontsize="small", va="bottom", ha="left",
                  bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    if methods or dense["n"]:
        work.legend(loc="best", fontsize="small")
    fig.suptitle("cost: " + _title(results))
    return _save_png(fig, path)


# --------------------------------------------------------------------------- markdown


def _accuracy(mean: float, std: float, n: int = 2) -> str:
    """``0.912 ± 0.004``; ``± n/a`` from a single value, whose spread is unknown (not zero)."""
    return f"{mean:.3f} ± n/a" if n < 2 else f"{mean:.3f} ± {std:.3f}"


def _count(value: float) -> str:
    return _MISSING if math.isnan(value) else f"{value:,.0f}"


def _seconds(seconds: float, ratio: float | None) -> str:
    """``12.3 s (1.52×)``; below 0.05 s two significant digits, so toy runs do not all read ``0.0 s``."""
    if math.isnan(seconds):
        return _MISSING
    text = f"{seconds:.1f}" if seconds >= 0.05 or seconds == 0 else f"{seconds:.2g}"
    return f"{text} s" + (f" ({ratio:.2f}×)" if ratio is not None else "")


def _sparsity(s: float) -> str:
    return f"{s:g}"


def _remaining(s: float) -> str:
    return f"{100.0 * (1.0 - s):.3g}%"


def _table(header: Sequence[str], body: Sequence[Sequence[str]], align: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _accuracy_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], dense: Mapping[str, float]) -> str:
    cells = {(r["method"], r["sparsity"]): r for r in rows}
    body = []
    if dense["n"]:
        # at sparsity 0 every method is the dense network
        body.append(["0 (dense)", "100%"] + [_accuracy(dense["accuracy_mean"], dense["accuracy_std"], dense["n"])] * len(methods))
    for s in sorted({r["sparsity"] for r in rows}):
        present = [m for m in methods if (m, s) in cells]
        # compare what is printed, so equal-looking cells are all bold
        best = max(round(cells[(m, s)]["accuracy_mean"], 3) for m in present)
        line = [_sparsity(s), _remaining(s)]
        for m in methods:
            if (m, s) not in cells:
                line.append(_MISSING)
                continue
            text = _accuracy(cells[(m, s)]["accuracy_mean"], cells[(m, s)]["accuracy_std"], cells[(m, s)]["n"])
            bold = len(present) > 1 and round(cells[(m, s)]["accuracy_mean"], 3) == best
            line.append(f"**{text}**" if bold else text)
        body.append(line)
    return _table(["sparsity", "remaining", *methods], body, "ll" + "r" * len(methods))


def _cost_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], dense: Mapping[str, float]) -> str:
    cells = {(r["method"], r["sparsity"]): r for r in rows}
    sparsities = sorted({r["sparsity"] for r in rows})
    last = sparsities[-1]
    header = ["method", *(f"s = {_sparsity(s)}" for s in sparsities), f"forward passes (s = {_sparsity(last)})", f"train steps (s = {_sparsity(last)})"]
    body = []
    if dense["n"]:
        time = _seconds(dense["seconds_mean"], 1.0 if dense["seconds_mean"] > 0 else None)
        body.append(["dense", *([time] * len(sparsities)), _count(dense["forward_passes_mean"]), _count(dense["train_steps_mean"])])
    for m in methods:
        line = [m]
        for s in sparsities:
            line.append(_seconds(cells[(m, s)]["seconds_mean"], cells[(m, s)]["cost_vs_dense"]) if (m, s) in cells else _MISSING)
        end = cells.get((m, last))
        line += [_count(end["forward_passes_mean"]), _count(end["train_steps_mean"])] if end else [_MISSING, _MISSING]
        body.append(line)
    return _table(header, body, "l" + "r" * (len(header) - 1))


def _overlap_table(overlap: Sequence[Mapping[str, Any]]) -> str:
    pairs = list(dict.fromkeys(k for row in overlap for k in row if k not in ("seed", "sparsity", "random_expectation")))
    groups: dict[float, list[Mapping[str, Any]]] = {}
    for row in overlap:
        groups.setdefault(float(row["sparsity"]), []).append(row)
    body = []
    for s in sorted(groups):
        line = [_sparsity(s)]
        for pair in pairs:
            values = [float(r[pair]) for r in groups[s] if pair in r]
            line.append(_accuracy(_mean(values), _std(values), len(values)) if values else _MISSING)
        expected = [float(r["random_expectation"]) for r in groups[s] if "random_expectation" in r]
        line += [f"{_mean(expected):.3f}" if expected else _MISSING, str(len(groups[s]))]
        body.append(line)
    header = ["sparsity", *(p.replace("_vs_", " vs ") for p in pairs), "random masks", "seeds"]
    return _table(header, body, "l" + "r" * (len(header) - 1))


#: how far below dense accuracy a pruned model may be and still count as holding (1 point)
HOLD_DROP = 0.01
#: methods that prune during training (one run per target): where one-shot stops holding, these go further
_DURING_TRAINING = ("bingo-gradual", "gmp", "imp")


def _holds_text(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], dense: Mapping[str, float]) -> str:
    """Per method, the highest sparsity up to which its mean accuracy stays within :data:`HOLD_DROP` of dense.

    Counted from the lowest sparsity up, stopping at the first that falls
    short. Then, for the one-shot methods, which method that prunes during
    training goes further. Empty without a dense accuracy.
    """
    base = dense.get("accuracy_mean", math.nan)
    if not math.isfinite(base) or not rows:
        return ""
    reach: dict[str, float | None] = {}
    for method in methods:
        highest = None
        for row in sorted((r for r in rows if r["method"] == method), key=lambda r: r["sparsity"]):
            if not row["accuracy_mean"] >= base - HOLD_DROP:
                break
            highest = row["sparsity"]
        reach[method] = highest
    body = [[m, "—" if reach[m] is None else f"{reach[m]:g}"] for m in methods]
    text = (f"The highest sparsity up to which each method's mean test accuracy stays within {HOLD_DROP * 100:g} point of "
            f"dense ({base:.3f}; counted from the lowest sparsity up):\n\n" + _table(["method", "holds up to"], body, "lr"))
    during = {m: reach[m] for m in methods if m in _DURING_TRAINING and reach[m] is not None}
    one_shot = [m for m in methods if m not in _DURING_TRAINING and m != "snip"]
    if during and one_shot:
        best = max(during, key=during.get)
        behind = [m for m in one_shot if reach[m] is None or reach[m] < during[best]]
        if behind:
            text += (f"\n\nPast where one-shot stops holding ({', '.join(f'{m} {reach[m]:g}' if reach[m] is not None else f'{m} never' for m in behind)}), "
                     f"pruning during training goes further: {best} holds up to {during[best]:g} (one training run per target; "
                     "`bingo-gradual` is BINGO's).")
    return text


def _overhead_text(overhead: Sequence[Mapping[str, Any]]) -> str:
    """One row per searching method (rows without ``method`` count as ``bingo``)."""
    methods = list(dict.fromkeys(str(r.get("method", "bingo")) for r in overhead))
    body, noisy = [], []
    for method in methods:
        rows = [r for r in overhead if str(r.get("method", "bingo")) == method]
        ratios = [float(r["ratio"]) for r in rows if r["ratio"] is not None]  # None: no training to compare with (0 epochs)
        # Counted work: forwards with the search / without (training steps and fake passes), free of timing noise.
        counted = [float(r["forward_passes_with_search"]) / float(r["forward_passes"]) for r in rows
                   if r.get("forward_passes") and r.get("forward_passes_with_search") is not None]
        if ratios and min(ratios) < 1.0:
            noisy.append(method)
        body.append(
            [
                method,
                str(len(rows)),
                _seconds(_mean([float(r["train_seconds"]) for r in rows]), None),
                _seconds(_mean([float(r["train_seconds_with_search"]) for r in rows]), None),
                f"{_mean(ratios):.2f}×" if ratios else _MISSING,
                f"{min(ratios):.2f}–{max(ratios):.2f}×" if ratios else _MISSING,
                f"{_mean(counted):.3f}×" if counted else _MISSING,
            ]
        )
    table = _table(["method", "seeds", "training", "training + search", "time ratio (mean)", "time ratio (range)", "forwards ratio"],
                   body, "lrrrrrr")
    summary = "; ".join(f"{row[0]} {row[4]}" for row in body)
    text = f"Training time with the ticket search divided by plain training time (mean over seeds): {summary}.\n\n{table}"
    if noisy:
        text += (f"\n\n**Timing noise dominates** for {', '.join(noisy)}: a ratio below 1× cannot be the search, which only adds "
                 "work; the two trainings were timed at different moments on a shared machine. The forwards ratio (counted "
                 "work) is the reliable cost; `benchmarks/search_overhead.py` measures the time ratio interleaved in one process.")
    identical = [r["identical_to_plain_training"] for r in overhead if "identical_to_plain_training" in r]
    if identical:
        # the search must not perturb training; say so either way
        if all(identical):
            text += f"\n\nWith and without the search, training ended bit-identical ({len(identical)} of {len(identical)} runs)."
        else:
            text += f"\n\n**Warning:** training with the search ended differently from plain training in {identical.count(False)} of {len(identical)} runs."
    return text


def _machines_text(results: Mapping[str, Any]) -> str:
    """`` Measured on <cpu>, <threads> threads, torch <version>.`` for each recorded machine (nothing if none)."""
    machines = [m for m in results.get("machines") or [] if isinstance(m, Mapping)]
    if not machines:
        return ""
    described = "; ".join(f"{m.get('cpu', '?')}, {m.get('threads', '?')} threads, torch {m.get('torch', '?')}" for m in machines)
    return (f" Measured on {described}; the last digits of accuracies vary across machines and thread counts, "
            "and timings with everything else running there.")


def markdown_tables(results: Mapping[str, Any]) -> str:
    """A markdown section summarising ``results``; ends with a newline.

    Contents, in order: (a) test accuracy, rows = sparsity (a dense row on
    top), columns = methods, cells ``mean ± std`` with the best method of each
    row in bold (all methods that tie at 3 decimals; nothing is bold when a
    row has one method); (b) cost, rows = dense and methods, one column per
    sparsity with ``seconds (× dense)`` and the forward passes and train steps
    at the largest sparsity; (c) mask overlap per sparsity, only if
    ``results["overlap"]`` is non-empty; (d) search overhead, only if
    ``results["search_overhead"]`` is non-empty: mean ratio and its range,
    and whether training stayed bit-identical when the rows record it;
    (e) where each method holds: the highest sparsity within 1 point of dense
    (:func:`_holds_text`). Missing cells show ``—``.
    """
    rows = aggregate(results)
    dense = _dense(results)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    overlap = _rows(results, "overlap", ("sparsity",), required=False)
    overhead = _rows(results, "search_overhead", ("train_seconds", "train_seconds_with_search", "ratio"), required=False)
    n = len(_seeds(results))

    parts = [f"## {_title(results)}"]
    parts.append(f"Mean ± sample standard deviation over {_plural(n, 'seed')}." + _machines_text(results))
    parts.append("### Test accuracy")
    if rows or dense["n"]:
        parts.append(_accuracy_table(rows, methods, dense) if rows else f"Dense: {_accuracy(dense['accuracy_mean'], dense['accuracy_std'], dense['n'])}; no pruned runs.")
    else:
        parts.append("No runs.")
    if rows:
        parts.append("### Cost")
        parts.append("Wall-clock seconds per run and, in brackets, as a multiple of dense training time.")
        parts.append(_cost_table(rows, methods, dense))
        holds = _holds_text(rows, methods, dense)
        if holds:
            parts.append("### Where each method holds")
            parts.append(holds)
    if overlap:
        parts.append("### Mask overlap")
        parts.append(
            "Overlap of two methods' masks as `bingo compare` measures it (the fraction of the weights one pruned "
            "that the other pruned too); *random masks* is what two independent random prunings would give."
        )
        parts.append(_overlap_table(overlap))
    if overhead:
        parts.append("### Search overhead")
        parts.append(_overhead_text(overhead))
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- everything


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.csv``, ``accuracy.png``, ``cost.png`` and ``summary.md`` into ``out_dir``.

    Creates ``out_dir`` if needed; each file is written atomically. Returns
    ``{"csv": ..., "accuracy": ..., "cost": ..., "summary": ...}`` paths.
    """
    out = Path(out_dir)
    # check ``results`` fully before anything is written
    text = markdown_tables(results)
    _plot_sparsities(aggregate(results))

    def write_text(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return {
        "csv": write_csv(results, out / "results.csv"),
        "accuracy": plot_accuracy(results, out / "accuracy.png"),
        "cost": plot_cost(results, out / "cost.png"),
        "summary": atomic_write(out / "summary.md", write_text),
    }

"""Report: hand-checked aggregates, CSV round trip, PNGs, markdown cells, atomic failure, file permissions."""

from __future__ import annotations

import copy
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bingo.bench import report
from bingo.errors import DataError
from bingo.bench.report import CSV_FIELDS, aggregate, markdown_tables, plot_accuracy, plot_cost, write_csv, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# accuracy[method][sparsity] = (seed 0, seed 1); chosen so the best method differs by row
ACCURACY = {
    "bingo": {0.5: (0.90, 0.86), 0.8: (0.85, 0.83), 0.9: (0.80, 0.70)},
    "magnitude": {0.5: (0.91, 0.89), 0.8: (0.80, 0.78), 0.9: (0.60, 0.50)},
}
SECONDS = {"bingo": (12.0, 14.0), "magnitude": (11.0, 11.0)}
FORWARD_PASSES = {"bingo": 400, "magnitude": 100}


def make_results() -> dict:
    """2 methods x 2 seeds x 3 sparsities; runs deliberately out of order."""
    runs = []
    for method in ("bingo", "magnitude"):
        for sparsity in (0.9, 0.5, 0.8):
            for seed in (1, 0):
                runs.append(
                    {
                        "method": method,
                        "seed": seed,
                        "sparsity": sparsity,
                        "accuracy": ACCURACY[method][sparsity][seed],
                        "seconds": SECONDS[method][seed],
                        "train_steps": 100,
                        "forward_passes": FORWARD_PASSES[method],
                    }
                )
    return {
        "data": "fashion-mnist",
        "model": "lenet300",
        "epochs": 3,
        "settings": {"methods": ["magnitude", "bingo"], "sparsities": [0.5, 0.8, 0.9], "seeds": [0, 1]},
        "dense": [
            {"seed": 0, "accuracy": 0.92, "seconds": 10.0, "train_steps": 100, "forward_passes": 100},
            {"seed": 1, "accuracy": 0.90, "seconds": 10.0, "train_steps": 100, "forward_passes": 100},
        ],
        "runs": runs,
        "overlap": [
            {"seed": 0, "sparsity": 0.8, "bingo_vs_imp": 0.90, "random_expectation": 0.8},
            {"seed": 1, "sparsity": 0.8, "bingo_vs_imp": 0.94, "random_expectation": 0.8},
        ],
        "search_overhead": [
            {"seed": 0, "train_seconds": 2.0, "train_seconds_with_search": 5.0, "ratio": 2.5, "identical_to_plain_training": True},
            {"seed": 1, "train_seconds": 2.0, "train_seconds_with_search": 7.0, "ratio": 3.5, "identical_to_plain_training": True},
        ],
    }


def table_row(markdown: str, first_cell: str) -> list[str]:
    """Cells of the first markdown table row whose first cell is ``first_cell``."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{markdown}")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# --------------------------------------------------------------------------- aggregate


def test_aggregate_by_hand():
    rows = aggregate(make_results())
    # methods in settings order (magnitude first although bingo's runs come first), sparsities ascending
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        ("magnitude", 0.5), ("magnitude", 0.8), ("magnitude", 0.9), ("bingo", 0.5), ("bingo", 0.8), ("bingo", 0.9),
    ]
    bingo_half = rows[3]
    assert bingo_half["n"] == 2
    assert bingo_half["accuracy_mean"] == pytest.approx(0.88)
    # sample std of (0.90, 0.86): |0.04| / sqrt(2)
    assert bingo_half["accuracy_std"] == pytest.approx(0.04 / math.sqrt(2))
    assert bingo_half["seconds_mean"] == pytest.approx(13.0)
    assert bingo_half["cost_vs_dense"] == pytest.approx(1.3)
    assert bingo_half["forward_passes_mean"] == 400 and bingo_half["train_steps_mean"] == 100
    magnitude_sparse = rows[2]
    assert magnitude_sparse["accuracy_mean"] == pytest.approx(0.55)
    assert magnitude_sparse["accuracy_std"] == pytest.approx(0.1 / math.sqrt(2))
    assert magnitude_sparse["cost_vs_dense"] == pytest.approx(1.1)


def test_single_seed_has_zero_std():
    results = make_results()
    results["runs"] = [r for r in results["runs"] if r["seed"] == 0]
    results["dense"] = results["dense"][:1]
    rows = aggregate(results)
    assert all(r["n"] == 1 and r["accuracy_std"] == 0.0 for r in rows)
    text = markdown_tables(results)
    assert text.startswith("## fashion-mnist / lenet300, 3 epochs, 1 seed\n") and table_row(text, "0.5")[2:] == ["**0.910 ± n/a**", "0.900 ± n/a"]


def test_methods_missing_from_settings_follow_in_order_of_appearance():
    results = make_results()
    results["settings"]["methods"] = ["bingo"]
    assert list(dict.fromkeys(r["method"] for r in aggregate(results))) == ["bingo", "magnitude"]


def test_no_dense_time_gives_no_ratio():
    results = make_results()
    results["dense"] = []
    assert all(r["cost_vs_dense"] is None for r in aggregate(results))
    assert table_row(markdown_tables(results), "bingo")[1] == "13.0 s"


def test_missing_field_names_it():
    results = make_results()
    del results["runs"][3]["forward_passes"]
    with pytest.raises(DataError, match=r"results\['runs'\]\[3\] has no 'forward_passes'"):
        aggregate(results)
    with pytest.raises(DataError, match="results has no 'dense' list"):
        aggregate({"runs": []})


# --------------------------------------------------------------------------- CSV


def test_csv_round_trip(tmp_path):
    results = make_results()
    results["runs"][0]["extra"] = "ignored"
    path = write_csv(results, tmp_path / "sub" / "results.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_FIELDS
        rows = list(reader)
    assert len(rows) == len(results["runs"])
    for row, run in zip(rows, results["runs"]):
        assert row["method"] == run["method"]
        assert int(row["seed"]) == run["seed"]
        for key in ("sparsity", "accuracy", "seconds"):
            assert float(row[key]) == run[key]  # exact: floats are written with repr
        assert int(row["train_steps"]) == run["train_steps"] and int(row["forward_passes"]) == run["forward_passes"]


# --------------------------------------------------------------------------- figures


@pytest.mark.parametrize("plot", [plot_accuracy, plot_cost])
def test_plots_are_png(tmp_path, plot):
    path = plot(make_results(), tmp_path / "figure.png")
    assert path == tmp_path / "figure.png"
    assert path.stat().st_size > 10_000  # a real figure, not an empty canvas
    width, height = png_size(path)
    assert width > 400 and height > 300
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]  # no temporary left behind


def test_plots_reject_full_sparsity(tmp_path):
    results = make_results()
    results["runs"][0]["sparsity"] = 1.0
    with pytest.raises(DataError, match=r"sparsities must be in \[0, 1\)"):
        plot_accuracy(results, tmp_path / "a.png")


def test_import_does_not_load_matplotlib():
    code = "import sys, bingo.bench.report; assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- markdown


def test_markdown_accuracy_cells_and_bold_best():
    text = markdown_tables(make_results())
    assert text.startswith("## fashion-mnist / lenet300, 3 epochs, 2 seeds")
    assert table_row(text, "sparsity") == ["sparsity", "remaining", "magnitude", "bingo"]
    assert table_row(text, "0 (dense)") == ["0 (dense)", "100%", "0.910 ± 0.014", "0.910 ± 0.014"]
    assert table_row(text, "0.5") == ["0.5", "50%", "**0.900 ± 0.014**", "0.880 ± 0.028"]
    assert table_row(text, "0.8") == ["0.8", "20%", "0.790 ± 0.014", "**0.840 ± 0.014**"]
    assert table_row(text, "0.9") == ["0.9", "10%", "0.550 ± 0.071", "**0.750 ± 0.071**"]


def test_markdown_cost_table():
    text = markdown_tables(make_results())
    assert table_row(text, "method") == [
        "method", "s = 0.5", "s = 0.8", "s = 0.9", "forward passes (s = 0.9)", "train steps (s = 0.9)",
    ]
    assert table_row(text, "dense") == ["dense"] + ["10.0 s (1.00×)"] * 3 + ["100", "100"]
    assert table_row(text, "bingo") == ["bingo"] + ["13.0 s (1.30×)"] * 3 + ["400", "100"]
    assert table_row(text, "magnitude") == ["magnitude"] + ["11.0 s (1.10×)"] * 3 + ["100", "100"]


def test_markdown_overlap_and_overhead():
    text = markdown_tables(make_results())
    assert table_row(text, "0.8")[0] == "0.8"
    overlap = text[text.index("### Mask overlap"):]
    assert table_row(overlap, "sparsity") == ["sparsity", "bingo vs imp", "random masks", "seeds"]
    assert table_row(overlap, "0.8") == ["0.8", f"0.920 ± {0.04 / math.sqrt(2):.3f}", "0.800", "2"]
    overhead = text[text.index("### Search overhead"):]
    assert "(mean over seeds): bingo 3.00×." in overhead
    assert table_row(overhead, "bingo") == ["bingo", "2", "2.0 s", "6.0 s", "3.00×", "2.50–3.50×", "—"]
    assert "bit-identical (2 of 2 runs)" in overhead and "noise" not in overhead


def test_overhead_below_one_is_flagged_as_timing_noise_beside_the_counted_work():
    results = make_results()
    for row, (ratio, forwards) in zip(results["search_overhead"], ((0.48, 1050), (1.3, 1050))):
        row.update(ratio=ratio, forward_passes=1000, forward_passes_with_search=forwards)
    overhead = markdown_tables(results)[markdown_tables(results).index("### Search overhead"):]
    assert table_row(overhead, "bingo")[4:] == ["0.89×", "0.48–1.30×", "1.050×"]
    assert "**Timing noise dominates** for bingo: a ratio below 1× cannot be the search" in overhead


def test_markdown_overhead_per_method():
    results = make_results()
    results["search_overhead"].append(dict(results["search_overhead"][0], method="bingo-paper", ratio=5.0))
    overhead = markdown_tables(results)[markdown_tables(results).index("### Search overhead"):]
    assert "bingo 3.00×; bingo-paper 5.00×" in overhead
    assert table_row(overhead, "bingo-paper")[1:2] == ["1"]


def test_markdown_warns_when_search_changed_training():
    results = make_results()
    results["search_overhead"][1]["identical_to_plain_training"] = False
    assert "**Warning:**" in markdown_tables(results)


@pytest.mark.parametrize("empty", [[], None, "absent"])
def test_markdown_without_overlap_or_overhead(empty):
    results = make_results()
    for key in ("overlap", "search_overhead"):
        if empty == "absent":
            del results[key]
        else:
            results[key] = empty
    text = markdown_tables(results)
    assert "Mask overlap" not in text and "Search overhead" not in text
    assert "### Test accuracy" in text and "### Cost" in text


def test_markdown_ties_and_missing_cells():
    results = make_results()
    # magnitude not run at 0.9: the cell is a dash and bingo, alone, is not bold
    results["runs"] = [r for r in results["runs"] if not (r["method"] == "magnitude" and r["sparsity"] == 0.9)]
    # a tie at 0.8: both bold
    for r in results["runs"]:
        if r["sparsity"] == 0.8:
            r["accuracy"] = 0.8
    text = markdown_tables(results)
    assert table_row(text, "0.9")[2:] == ["—", "0.750 ± 0.071"]
    assert table_row(text, "0.8")[2:] == ["**0.800 ± 0.000**", "**0.800 ± 0.000**"]
    assert table_row(text, "magnitude")[-2:] == ["—", "—"]


# --------------------------------------------------------------------------- everything, and failures


def test_write_report(tmp_path):
    results = make_results()
    paths = write_report(results, tmp_path / "report")
    assert {k: p.name for k, p in paths.items()} == {
        "csv": "results.csv", "accuracy": "accuracy.png", "cost": "cost.png", "summary": "summary.md",
    }
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["accuracy.png", "cost.png", "results.csv", "summary.md"]
    assert paths["summary"].read_text(encoding="utf-8") == markdown_tables(results)
    png_size(paths["accuracy"]), png_size(paths["cost"])


def test_failing_csv_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    path.write_text("old results\n")

    def half_then_fail(self, rows):
        self.writerow(rows[0])
        raise OSError("disk full")

    monkeypatch.setattr(report.csv.DictWriter, "writerows", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_csv(make_results(), path)
    assert path.read_text() == "old results\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_failing_plot_write_keeps_old_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = plot_accuracy(make_results(), tmp_path / "accuracy.png")
    before = path.read_bytes()

    def junk_then_fail(self, fname, **kwargs):
        Path(fname).write_bytes(b"junk")
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(Figure, "savefig", junk_then_fail)
    results = copy.deepcopy(make_results())
    results["data"] = "other"
    with pytest.raises(RuntimeError, match="renderer crashed"):
        plot_accuracy(results, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["accuracy.png"]


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_every_file_gets_the_umask_permissions(tmp_path, umask):
    """Like open(): 0o666 less the umask, whichever library wrote the temporary file."""
    import torch

    from bingo import export_model, magnitude_scores, prune, save_compact
    from bingo.io import save_checkpoint, save_scores, write_json
    from bingo.bench.models import build_model

    model = build_model("mlp", (16,), 3)
    prune(model, magnitude_scores(model), 0.5)
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"a": 1})
        save_scores({"w": torch.ones(3)}, tmp_path / "scores.safetensors")
        save_checkpoint({"w": torch.ones(3)}, tmp_path / "ckpt.pt")
        save_compact(model, tmp_path / "compact.safetensors")
        write_csv(make_results(), tmp_path / "results.csv")
        export_model(model, (0.0, 1.0), (16,), tmp_path / "export")
    finally:
        os.umask(old)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 8
    assert {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files} == {
        p.relative_to(tmp_path).as_posix(): oct(0o666 & ~umask) for p in files
    }


def test_bad_results_write_nothing(tmp_path):
    results = make_results()
    del results["runs"][0]["accuracy"]
    with pytest.raises(DataError, match="has no 'accuracy'"):
        write_report(results, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_toy_run_times_stay_readable():
    results = make_results()
    results["epochs"] = 1
    for row in results["dense"]:
        row["seconds"] = 0.02
    for row in results["runs"]:
        row["seconds"] = 0.031 if row["method"] == "bingo" else 0.25
    text = markdown_tables(results)
    assert text.startswith("## fashion-mnist / lenet300, 1 epoch, 2 seeds\n")
    assert table_row(text, "dense")[1] == "0.02 s (1.00×)"
    assert table_row(text, "bingo")[1] == "0.031 s (1.55×)"
    assert table_row(text, "magnitude")[1] == "0.2 s (12.50×)"  # 0.25 rounds half to even


def test_unplottable_results_write_nothing(tmp_path):
    results = make_results()
    results["runs"][0]["sparsity"] = 1.0
    with pytest.raises(DataError, match="sparsities must be in"):
        write_report(results, tmp_path)
    assert list(tmp_path.iterdir()) == []


def _drawn_figure(monkeypatch, plot, results, path):
    """The matplotlib Figure ``plot`` saves (captured at ``Figure.savefig``), drawn so tick labels exist."""
    from matplotlib.figure import Figure

    captured = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        captured.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    plot(results, path)
    [figure] = captured
    figure.canvas.draw()
    return figure


def test_cost_plot_shows_counted_work_and_readable_ticks(tmp_path, monkeypatch):
    results = make_results()
    figure = _drawn_figure(monkeypatch, plot_cost, results, tmp_path / "cost.png")
    work, wall = figure.axes[:2]
    assert "counted work" in work.get_title() and "forward passes" in work.get_ylabel()
    for ax in (work, wall):
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text() and t.get_visible()]
        lo, hi = ax.get_ylim()
        shown = [t for t, v in zip(ax.get_yticklabels(), ax.get_yticks()) if t.get_text() and lo <= v <= hi]
        assert len(shown) >= 2, (ax.get_title(), labels)  # never a single labelled tick
    # the left panel is in units of dense training: the dense line sits at 1
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in work.get_lines())


def test_cost_plot_says_when_timings_are_noise(tmp_path, monkeypatch):
    results = make_results()
    for row in results["runs"] + results["dense"]:
        row["seconds"] = row["seconds"] / 100  # sub-second toy runs
    figure = _drawn_figure(monkeypatch, plot_cost, results, tmp_path / "cost.png")
    texts = [t.get_text() for ax in figure.axes for t in ax.texts]
    assert any("differences are mostly noise" in t for t in texts)
    results = make_results()
    for row in results["runs"] + results["dense"]:
        row["seconds"] = row["seconds"] * 10
    figure = _drawn_figure(monkeypatch, plot_cost, results, tmp_path / "cost2.png")
    assert not any("noise" in t.get_text() for ax in figure.axes for t in ax.texts)


def test_summary_names_the_machines_it_was_measured_on():
    results = make_results()
    assert "Measured on" not in markdown_tables(results)
    results["machines"] = [{"cpu": "Test CPU 9000", "threads": 3, "torch": "2.13.0+cpu"}]
    assert "Measured on Test CPU 9000, 3 threads, torch 2.13.0+cpu; the last digits" in markdown_tables(results)


def test_where_each_method_holds_and_what_goes_further():
    results = make_results()  # dense 0.91; bingo 0.88 / 0.84 / 0.75, magnitude 0.90 / 0.79 / 0.55
    text = markdown_tables(results)
    holds = text[text.index("### Where each method holds"):]
    assert table_row(holds, "bingo") == ["bingo", "—"] and table_row(holds, "magnitude") == ["magnitude", "0.5"]
    assert "pruning during training" not in holds  # no such method was run
    for sparsity, accuracy in ((0.5, 0.91), (0.8, 0.905), (0.9, 0.85)):
        for seed in (0, 1):
            results["runs"].append({"method": "bingo-gradual", "seed": seed, "sparsity": sparsity, "accuracy": accuracy,
                                    "seconds": 10.0, "train_steps": 100, "forward_passes": 100})
    holds = markdown_tables(results)[markdown_tables(results).index("### Where each method holds"):]
    assert table_row(holds, "bingo-gradual") == ["bingo-gradual", "0.8"]
    assert "(magnitude 0.5, bingo never), pruning during training goes further: bingo-gradual holds up to 0.8" in holds

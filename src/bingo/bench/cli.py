"""The ``bingo`` command line: ``bingo demo`` and ``bingo run``.

Bad input never shows a traceback: every :class:`~bingo.errors.BingoError`
(and every argument error) becomes one line ``bingo: error: ...`` on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import __version__, distributed
from .data import DATASETS, dataset_files, load_dataset, training_subset
from ..blend import choose_magnitude_weight
from ..compensation import compensate
from .configs import add_config_flags, apply_flags, config_record, given_flags
from .environment import machine
from ..devices import resolve_device
from ..errors import BingoError, ConfigError
from ..io import refuse_special, special_file, write_json
from .models import MODELS, build_model
from ..layers import coverage
from ..masks import pruned_parameters
from ..pruning import prune
from ..scoring import magnitude_scores, random_scores
from ..search import TicketSearch
from ..selection import check_sparsity, parse_n_m
from .strategies import BINGO, BINGO_PAPER, STRATEGIES, Experiment, OneShotStrategy, get_strategy
from .training import TrainConfig, evaluate, train, warn_if_few_steps

__all__ = ["main"]

class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"bingo: error: {message}\n")


def _train_flags(parser: argparse.ArgumentParser, defaults: TrainConfig = TrainConfig()) -> None:
    """The training recipe's flags, from :class:`TrainConfig`'s fields."""
    add_config_flags(parser, {"training": defaults}, dest="train")


def _items(text: str, flag: str) -> list[str]:
    """The comma-separated items of ``text``, stripped; an empty item among others is refused.

    ``"0.9,,0.95"`` or ``"0.5,"`` is a value lost to a typo, not a shorter list.
    An all-empty ``text`` gives ``[]`` (the caller says it needs a value).
    """
    parts = [part.strip() for part in text.split(",")]
    if any(parts) and not all(parts):
        raise argparse.ArgumentTypeError(f"{flag} has an empty item in {text!r}; separate the values by single commas")
    return [part for part in parts if part]


def _sparsities(text: str) -> list[float | str]:
    """``--sparsity``: fractions and N:M patterns (``"2:4"``, kept as text ``"N:M"``), comma-separated."""
    values: list[float | str] = []
    for part in _items(text, "--sparsity"):
        if ":" in part:
            try:
                n, m = parse_n_m(part)
            except ConfigError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
            values.append(f"{n}:{m}")
            continue
        try:
            values.append(float(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--sparsity expects fractions in [0, 1) or N:M patterns such as 2:4, separated by commas, got {text!r}"
            ) from None
    if not values:
        raise argparse.ArgumentTypeError("--sparsity needs at least one value")
    return values


def _seed(text: str) -> int:
    """``--seed``: a whole number torch's generators take (:data:`~bingo.bench.training.SEED_RANGE`)."""
    from .training import SEED_RANGE, check_seed

    try:
        return check_seed(int(text))
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(f"must be a whole number in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {text!r}") from None


def _seeds(text: str) -> int:
    """``--seeds``: how many seeds, 1 to :data:`~bingo.bench.compare.MAX_SEEDS`."""
    from .compare import MAX_SEEDS

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 1 <= value <= MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"must be a whole number in [1, {MAX_SEEDS}], got {text!r}")
    return value


def _compare_sparsities(text: str) -> list[float]:
    if ":" in text:
        raise argparse.ArgumentTypeError(
            f"bingo compare takes fractions in [0, 1) only, got {text!r}; an N:M pattern runs with 'bingo run --sparsity 2:4'"
        )
    return _comma_list(float, "--sparsities")(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bingo", description="Prune PyTorch networks with BINGO (arXiv 2505.09864).")
    parser.add_argument("--version", action="version", version=f"bingo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo", help="train on scikit-learn's digits with ticket search; compare BINGO, magnitude and random pruning")
    demo.add_argument("--epochs", type=int, default=30, help="training epochs; default 30")
    demo.add_argument("--seed", type=_seed, default=0, help="seed for weights, data order and search; default 0")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--device", default="auto", help="where to train and prune: auto (the first CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N; default auto")

    run = commands.add_parser("run", help="train and prune one network with any method (default bingo); write results as JSON")
    run.add_argument("--data", required=True, help=f"{', '.join(DATASETS)}, or PATH.npz with x_train, y_train, x_test, y_test")
    run.add_argument("--data-dir", default=None, help="folder of the IDX files (fashion-mnist, mnist)")
    run.add_argument("--model", required=True, help=f"one of {', '.join(MODELS)}")
    target = run.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--sparsity", type=_sparsities,
        help="fraction(s) to prune, in [0, 1), or N:M patterns (2:4: at most 2 of every 4 consecutive inputs of a unit kept; "
        "one-shot methods, weight granularity), comma-separated",
    )
    target.add_argument("--min-accuracy", type=float, help="prune as far as validation accuracy stays >= this")
    target.add_argument("--max-accuracy-drop", type=float, help="prune as far as validation accuracy stays >= dense - this")
    run.add_argument("--out", required=True, help="results JSON, written atomically")
    run.add_argument(
        "--method", default="bingo", choices=tuple(STRATEGIES),
        help="bingo is the best variant measured (hybrid Taylor + calibrating fake passes, blended with magnitude), "
        "bingo-paper the faithful reproduction; the method settings below override its preset; default bingo",
    )
    _train_flags(run.add_argument_group("training"))
    add_config_flags(
        run.add_argument_group("method settings (each method's preset in brackets)"),
        {name: cls.default_config for name, cls in STRATEGIES.items()}, dest="method",
    )
    run.add_argument("--seed", type=_seed, default=0, help="seed for weights, data order and search; default 0")
    run.add_argument("--save", default=None, help="save the pruned model (state dict with masks) to this .pt file")
    run.add_argument("--scores", default=None, help="save the significance scores to this .safetensors file")
    run.add_argument("--checkpoint", default=None, help="training checkpoint written after every epoch; an existing one is resumed")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--device", default="auto", help="where to train and prune: auto (the first CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N; default auto")
    run.add_argument(
        "--train-samples", type=int, default=None, metavar="N",
        help="train on a seeded random subset of N training examples (validation and test splits unchanged); default all",
    )
    run.add_argument("--export", default=None, metavar="DIR", help="export the pruned model (the last sparsity) to DIR: model.pt2 with preprocessing, weights.safetensors, model.json; shrunk first with --granularity neuron")
    run.add_argument("--onnx", action="store_true", help="with --export: also write model.onnx if the onnx package is installed")
    _add_compare_parser(commands)
    _add_export_parser(commands)
    return parser


def _add_export_parser(commands) -> None:
    export = commands.add_parser("export", help="export a model saved by 'bingo run --save' to a self-contained folder (model.pt2, weights.safetensors, model.json)")
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="the MODEL.pt file written by 'bingo run --save'")
    export.add_argument("dir", metavar="DIR", help="output folder")
    export.add_argument("--onnx", action="store_true", help="also write model.onnx if the onnx package is installed")


#: The files ``export_model`` writes into its folder, and those ``bingo compare`` writes into OUT.
_EXPORT_FILES = ("model.pt2", "weights.safetensors", "model.json", "model.onnx")
_COMPARE_FILES = ("results.json", "results.csv", "accuracy.png", "cost.png", "summary.md")


def _print_warnings(caught: list) -> None:
    """Library warnings (classes absent from training, ONNX skipped, units kept by shrink) as one line each."""
    for warning in caught:
        print(f"bingo: warning: {' '.join(str(warning.message).split())}", file=sys.stderr)


@contextlib.contextmanager
def _one_line_warnings():
    """bingo's own UserWarnings raised inside the block become ``bingo: warning:`` lines; others show as usual."""
    package = str(Path(__file__).resolve().parents[1]) + os.sep  # all of bingo, the core too
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("default", category=UserWarning, module=r"bingo(\.|$)")  # once per message
            yield
    finally:
        # Shown after the block, with the caller's warning machinery back in place:
        # inside it, showwarning is the recorder, and showing a foreign warning there
        # appended to the very list being iterated (a loop without end).
        for w in caught:
            if issubclass(w.category, UserWarning) and str(Path(w.filename).resolve()).startswith(package):
                _print_warnings([w])
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, line=w.line)


def cmd_export(args: argparse.Namespace) -> int:
    from .model_file import export_checkpoint

    if not str(args.dir).strip():  # Path("") is the current folder: the files would land among the user's own
        raise ConfigError("the export folder is empty; give a folder name")
    if Path(args.dir).exists() and not Path(args.dir).is_dir():
        kind = special_file(args.dir) or "a file"
        raise ConfigError(f"export folder {args.dir} is {kind}; give a folder")
    for name in _EXPORT_FILES:
        refuse_special(Path(args.dir) / name)
        if _same_file(Path(args.dir) / name, Path(args.checkpoint)):
            raise ConfigError(f"exporting into {args.dir} would write over {args.checkpoint}, the model file it exports; "
                              "give another folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_checkpoint(args.checkpoint, args.dir, onnx=args.onnx)
    _print_warnings(caught)
    files = ", ".join(p.name for p in (result.program, result.weights, result.metadata, result.onnx) if p is not None)
    print(f"exported the {'shrunk' if result.shrunk else 'pruned'} model to {result.directory}: {files}")
    return 0


def _comma_list(kind: type, flag: str):
    def convert(text: str) -> list:
        parts = _items(text, flag)
        try:
            values = [kind(part) for part in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects a comma-separated list, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{flag} needs at least one value")
        return values

    return convert


def _add_compare_parser(commands) -> None:
    from .strategies import STRATEGIES

    compare = commands.add_parser(
        "compare", help="run BINGO and the baselines side by side; write results.json, results.csv, plots"
    )
    compare.add_argument("--data", required=True, help=f"{', '.join(DATASETS)}, or PATH.npz")
    compare.add_argument("--data-dir", default=None, help="folder of the IDX files (fashion-mnist, mnist)")
    compare.add_argument("--model", required=True, help=f"one of {', '.join(MODELS)}")
    compare.add_argument(
        "--methods", type=_comma_list(str, "--methods"), default=list(STRATEGIES),
        help=f"comma-separated, from {', '.join(STRATEGIES)}; default all",
    )
    compare.add_argument(
        "--sparsities", type=_compare_sparsities, default=[0.5, 0.8, 0.9, 0.95],
        help="comma-separated fractions in [0, 1); default 0.5,0.8,0.9,0.95",
    )
    compare.add_argument("--seeds", type=_seeds, default=1, help="number of seeds (0..K-1); default 1")
    compare.add_argument(
        "--train-samples", type=int, default=None, metavar="N",
        help="train on a random subset of N training examples (the same subset for every method and seed; validation and test splits unchanged); default all",
    )
    _train_flags(compare)
    compare.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune epochs after pruning, charged to the method (every method with a finetune_epochs setting; gmp: extra epochs at its final masks); default 0")
    compare.add_argument("--out", required=True, help="output folder")
    compare.add_argument("--resume", action="store_true", help="continue the comparison in OUT: skip runs already in OUT/results.json")
    compare.add_argument("--rerun-changed", action="store_true", help="with --resume: a method recorded in OUT with other settings runs again (its rows are replaced) instead of being refused")
    compare.add_argument(
        "--overwrite", action="store_true",
        help="start afresh in an OUT that holds an earlier comparison, moving its files into OUT/previous-<UTC time>/ (nothing is deleted)",
    )
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")
    compare.add_argument("--device", default="auto", help="where to train and prune: auto (the first CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N; default auto")
    compare.add_argument("--help-methods", action=_MethodHelp, nargs=0,
                         help="list every method's settings (--<method>-<setting> flags, each preset in brackets) and exit")
    # Every method's settings are flags, but listed only by --help-methods: one screen of --help, not four hundred lines.
    verbose = _MethodHelp.showing
    group = compare.add_argument_group(
        "method settings (each method's preset in brackets)" if verbose else "method settings",
        None if verbose else "every method's settings are flags --<method>-<setting>, e.g. --bingo-fraction 0.05, "
        "--gmp-frequency 50, --imp-rewind-step 0; `bingo compare --help-methods` lists them with each preset",
    )
    for name, cls in STRATEGIES.items():
        add_config_flags(group, {name: cls.default_config}, prefix=name, dest=f"method_{name}", skip=("finetune_epochs",),
                         hidden=not verbose)
    group.add_argument("--rewind-step", dest="method_imp__rewind_step", type=int, default=None, metavar="STEP",
                       help="the same as --imp-rewind-step" if verbose else argparse.SUPPRESS)


class _MethodHelp(argparse.Action):
    """``bingo compare --help-methods``: the compare help with every method's settings listed, then exit."""

    showing = False

    def __call__(self, parser, namespace, values, option_string=None):
        _MethodHelp.showing = True
        try:
            full = build_parser()
        finally:
            _MethodHelp.showing = False
        full.parse_args(["compare", "--help"])


def _method_configs(args: argparse.Namespace, methods: list[str]) -> dict:
    """Each named method's preset with its ``--<method>-<setting>`` flags and ``--finetune-epochs`` applied."""
    for name in STRATEGIES:  # a method's settings with the method not compared would be ignored without a word
        flags = given_flags(args, prefix=name, dest=f"method_{name}") if name not in methods else []
        if flags:
            raise ConfigError(f"{flags[0]} sets method {name!r}, which --methods does not include ({','.join(methods)}); "
                              f"add {name} to --methods, or drop {flags[0]}")
    configs = {}
    for name in methods:
        if name not in STRATEGIES:
            continue  # CompareConfig reports it with the valid choices
        config = apply_flags(args, STRATEGIES[name].default_config, prefix=name, dest=f"method_{name}", method=name)
        if any(f.name == "finetune_epochs" for f in dataclasses.fields(config)):
            config = dataclasses.replace(config, finetune_epochs=args.finetune_epochs)
        configs[name] = config
    return configs


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, compare_lock, run_compare
    from .report import markdown_tables, write_report

    _check_file_path("out", args.out, folder=True)
    _check_data_dir(args.data, args.data_dir)
    if not args.overwrite:  # (with --overwrite they are moved aside, whatever they are)
        for name in _COMPARE_FILES:
            refuse_special(Path(args.out) / name, "--out")
    training = apply_flags(args, TrainConfig(), dest="train")
    config = CompareConfig(
        data=args.data,
        model=args.model,
        epochs=training.epochs,
        methods=tuple(args.methods),
        sparsities=tuple(args.sparsities),
        seeds=args.seeds,
        batch_size=training.batch_size,
        lr=training.lr,
        optimizer=training.optimizer,
        finetune_epochs=args.finetune_epochs,
        data_dir=args.data_dir,
        method_configs=_method_configs(args, args.methods),
        train_samples=args.train_samples,
        device=args.device,
    )
    earlier = set(Path(args.out).glob("previous-*"))
    with compare_lock(args.out):  # the report too: no other comparison may write OUT before it is complete
        with _one_line_warnings():
            results = run_compare(config, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                                  rerun_changed=args.rerun_changed)
        paths = write_report(results, args.out)
    print(markdown_tables(results))
    for aside in sorted(set(Path(args.out).glob("previous-*")) - earlier):
        print(f"moved the earlier results to {aside}")
    print("wrote " + ", ".join(str(p) for p in [Path(args.out) / "results.json", *paths.values()]))
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _accuracy_after_pruning(model, scores, sparsity, scope, data, seed, calibration=None) -> float:
    """Test accuracy of ``model`` pruned by ``scores``; with ``calibration`` inputs, compensated first."""
    pruned = copy.deepcopy(model)
    prune(pruned, scores, sparsity, scope, seed=seed)
    if calibration is not None:
        compensate(pruned, None, calibration, reference=model)
    return evaluate(pruned, data.x_test, data.y_test)


def cmd_demo(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    data = load_dataset("digits", seed=args.seed)
    model = build_model("mlp", data.input_shape, data.num_classes, seed=args.seed).to(device)
    # Searches never perturb training, so both variants can watch the same run.
    improved = TicketSearch(model, config=BINGO.search, seed=args.seed)
    faithful = TicketSearch(model, config=BINGO_PAPER.search, fraction=0.05, seed=args.seed)
    config = TrainConfig(epochs=args.epochs, batch_size=64, lr=3e-3, seed=args.seed)
    print(
        f"BINGO demo: scikit-learn digits ({len(data.x_train)} train / {len(data.x_test)} test, 8x8), "
        f"mlp {data.input_shape} -> 64 -> 32 -> {data.num_classes}, {config.epochs} epochs.\n"
        "bingo: Taylor estimate of each weight's loss change, layers calibrated by fake passes, "
        "ranked together with weight magnitude (the blend chosen on validation digits), survivors re-fitted to the dense layer outputs on "
        f"{min(len(data.x_train), BINGO.compensation.calibration_samples)} training digits (compensation); "
        "bingo-paper: 5% reset-to-init probes every step, scored by accuracy change"
    )
    result = train(model, data, config, search=[improved, faithful], progress=not args.no_progress)
    dense = evaluate(model, data.x_test, data.y_test)
    calibration = data.x_train[: BINGO.compensation.calibration_samples]
    bingo_scores, magnitude = BINGO.final_scores(improved, model), magnitude_scores(model)
    methods = {  # column -> (scores, calibration inputs if compensated)
        "bingo": (bingo_scores, calibration),
        "bingo-uncompensated": (bingo_scores, None),
        "bingo-paper": (faithful.significance(), None),
        "magnitude": (magnitude, None),
        "magnitude+compensation": (magnitude, calibration),
        "random": (random_scores(model, seed=args.seed), None),
    }
    rows, chosen = [], []
    significance = improved.significance()

    def judge(candidate):  # bingo's blend weight, chosen per sparsity as the bingo method chooses it
        compensate(candidate, None, calibration, reference=model)
        return evaluate(candidate, data.x_val, data.y_val)

    for sparsity in (0.0, 0.5, 0.7, 0.8, 0.9, 0.95):
        row = [f"{sparsity:.2f}"]
        for name, (scores, inputs) in methods.items():
            inputs = inputs if sparsity > 0 else None
            if name == "bingo" and inputs is not None and len(data.x_val):
                choice = choose_magnitude_weight(model, significance, sparsity, judge, seed=args.seed)
                chosen.append(f"{choice.magnitude_weight:g} at {sparsity:g}")
                row.append(f"{evaluate(choice.model, data.x_test, data.y_test):.3f}")
                continue
            row.append(f"{_accuracy_after_pruning(model, scores, sparsity, 'global', data, args.seed, inputs):.3f}")
        rows.append(row)
    plain = result.train_seconds - result.search_seconds
    print(
        f"dense test accuracy {dense:.3f}; training {plain:.1f} s, ticket search bingo {improved.seconds:.1f} s, "
        f"bingo-paper {faithful.seconds:.1f} s"
    )
    print("test accuracy after one-shot global pruning, no fine-tune (no retraining):")
    print(_table(rows, ["sparsity", *methods]))
    if chosen:
        print(f"bingo's magnitude weight, chosen on the {len(data.x_val)} validation digits: {', '.join(chosen)} "
              "(bingo-uncompensated ranks by the equal blend 0.5)")
    return 0


def _same_file(a: Path, b: Path) -> bool:
    """Whether paths ``a`` and ``b`` name one file: the same path once resolved, or (existing) one inode, a hard link."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, ValueError, RuntimeError):
        return False


#: the datasets read from a folder of IDX files, the only ones ``--data-dir`` applies to
IDX_DATASETS = ("fashion-mnist", "mnist")


def _check_data_dir(data: str, data_dir: str | None) -> None:
    """Refuse ``--data-dir`` where nothing reads it (it would be ignored without a word)."""
    if data_dir is not None and data not in IDX_DATASETS:
        raise ConfigError(f"--data-dir applies to {' and '.join(IDX_DATASETS)} (the folder of their IDX files), "
                          f"not to --data {data}; drop --data-dir")


def _check_file_path(flag: str, path: str, *, folder: bool = False) -> None:
    """Refuse, before training, an output path that can never be written.

    That is a folder where a file goes (or a file where a folder goes), a
    path under a file, or one whose nearest existing folder does not take
    new files. Paths are named as the user wrote them.
    """
    from ..io import folder_is_writable

    if not str(path).strip():
        raise ConfigError(f"--{flag} is empty; give a {'folder' if folder else 'file path'}")
    target = Path(path)
    kind = special_file(target)
    if folder and kind is not None:
        raise ConfigError(f"--{flag} {path} is {kind}, not a folder; give a folder")
    refuse_special(target, f"--{flag}")  # a FIFO or device would be replaced by a regular file
    if folder and target.exists() and not target.is_dir():
        raise ConfigError(f"--{flag} {path} is a file; give a folder")
    if not folder and target.is_dir():
        raise ConfigError(f"--{flag} {path} is a folder; give a file path")
    ancestor = target if folder else target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"--{flag} {path} cannot be created: {ancestor} is a file, not a folder")
    if not folder_is_writable(ancestor):
        where = "the current folder" if ancestor == Path(".") else f"the folder {ancestor}"
        raise ConfigError(f"--{flag} {path} cannot be written: {where} is not writable")


def _run_config(args: argparse.Namespace) -> object:
    """The ``--method`` preset with the method-setting flags given applied."""
    preset = STRATEGIES[args.method].default_config
    config = apply_flags(args, preset, dest="method", method=args.method)
    if getattr(config, "granularity", None) == "neuron" and getattr(args, "method__scope", None) is None and hasattr(config, "scope"):
        # A global ranking of units across layers of different widths can empty
        # a layer; the same fraction per layer is the safe default for neurons.
        config = dataclasses.replace(config, scope="layer")
    return config


def _check_pattern_fits(strategy: object, model: torch.nn.Module, pattern: str) -> None:
    """Prune a fresh ``model``'s scored weights to ``pattern`` by magnitude: a fan-in that does not fit is a :class:`ConfigError` now."""
    search = getattr(strategy.config, "search", None)
    include, exclude = (search.include, search.exclude) if search is not None else (None, ())
    prune(model, magnitude_scores(model, "weight", include=include, exclude=exclude), pattern)


def _sparsity_text(row: dict) -> str:
    """A results row's sparsity for the table: ``0.9000``, or ``2:4 (0.5000)`` with the fraction the pattern pruned."""
    if isinstance(row["sparsity"], str):
        return f"{row['sparsity']} ({row['measured_sparsity']:.4f})"
    return f"{row['sparsity']:.4f}"


def cmd_run(args: argparse.Namespace) -> int:
    # Validate everything cheap before loading data or training.
    if args.sparsity is not None:  # fractions ascending, then the N:M patterns as given (each prunes the dense model)
        patterns = list(dict.fromkeys(s for s in args.sparsity if isinstance(s, str)))
        sparsities = sorted({check_sparsity(s) for s in args.sparsity if not isinstance(s, str)}) + patterns
    else:
        patterns = []
    if args.min_accuracy is not None and not 0.0 <= args.min_accuracy <= 1.0:
        raise ConfigError(f"--min-accuracy must be in [0, 1], got {args.min_accuracy}")
    if args.max_accuracy_drop is not None and not 0.0 <= args.max_accuracy_drop <= 1.0:
        raise ConfigError(f"--max-accuracy-drop must be in [0, 1], got {args.max_accuracy_drop}")
    strategy = get_strategy(args.method, _run_config(args))
    one_shot = isinstance(strategy, OneShotStrategy)
    needs_one_shot = [flag for flag, value in (("--min-accuracy", args.min_accuracy), ("--max-accuracy-drop", args.max_accuracy_drop),
                                               ("--scores", args.scores), ("--checkpoint", args.checkpoint)) if value is not None]
    if needs_one_shot and not one_shot:
        valid = ", ".join(name for name, cls in STRATEGIES.items() if issubclass(cls, OneShotStrategy))
        raise ConfigError(f"{needs_one_shot[0]} needs a method that prunes once after training ({valid}); {args.method!r} does not")
    if patterns and not one_shot:
        valid = ", ".join(name for name, cls in STRATEGIES.items() if issubclass(cls, OneShotStrategy))
        raise ConfigError(f"--sparsity {patterns[0]} (an N:M pattern) needs a method that prunes once after training ({valid}); "
                          f"{args.method!r} does not")
    if patterns and getattr(strategy.config, "granularity", "weight") != "weight":
        raise ConfigError(f"--sparsity {patterns[0]} (an N:M pattern) prunes single weights; it needs --granularity weight")
    if args.model not in MODELS:
        raise ConfigError(f"unknown model {args.model!r}; valid choices: {', '.join(MODELS)}")
    if args.train_samples is not None and args.train_samples < 1:
        raise ConfigError(f"--train-samples must be a whole number >= 1, got {args.train_samples}")
    if args.onnx and args.export is None:
        raise ConfigError("--onnx writes model.onnx into the --export folder; add --export DIR, or drop --onnx")
    _check_data_dir(args.data, args.data_dir)
    outputs = [(flag, getattr(args, flag)) for flag in ("out", "save", "scores", "checkpoint", "export") if getattr(args, flag) is not None]
    for flag, path in outputs:
        _check_file_path(flag, path, folder=flag == "export")
    # Two outputs on one path would overwrite each other (the report replacing the
    # scores, or the checkpoint that the next run would try to resume).
    claimed: dict[Path, str] = {}
    for flag, path in outputs:
        resolved = Path(path).resolve()
        files = [resolved]
        if flag == "export":  # and the files export_model writes into it
            files += [resolved / name for name in _EXPORT_FILES]
            for name in _EXPORT_FILES:
                refuse_special(Path(path) / name, "--export")
        for file in files:
            if file in claimed:
                same = f"are the same {'path' if flag == 'export' else 'file'} ({file})" if file == resolved else f"both write {file}"
                raise ConfigError(f"--{claimed[file]} and --{flag} {same}; give each output its own path")
            claimed[file] = flag
    # ... and an output on an input would destroy it (--out data.npz replaced the dataset).
    for data_file in dataset_files(args.data, args.data_dir):
        for flag, path in outputs:
            written = [Path(path) / name for name in _EXPORT_FILES] if flag == "export" else [Path(path)]
            if any(_same_file(file, data_file) for file in written):
                raise ConfigError(f"--{flag} {path} would write over the data file {data_file} (--data); give --{flag} another path")
    train_config = apply_flags(args, TrainConfig(seed=args.seed), dest="train")
    granularity = getattr(strategy.config, "granularity", "weight")
    # Before anything is trained: a device that is not there is a one-line error. Under torchrun, cuda is this rank's GPU.
    device = distributed.rank_device(resolve_device(args.device))

    with _one_line_warnings():  # e.g. classes absent from training, caveats about the scores
        data = load_dataset(args.data, args.data_dir, seed=args.seed)
        if args.train_samples is not None:
            data = training_subset(data, args.train_samples, seed=args.seed)
        warn_if_few_steps(train_config, len(data.x_train))
        experiment = Experiment(data, args.model, train_config, args.seed, progress=not args.no_progress, checkpoint=args.checkpoint,
                                device=device)
        for pattern in patterns:  # a fan-in that is not a multiple of M is refused before training
            _check_pattern_fits(strategy, experiment.new_model(), pattern)
        if args.sparsity is not None:
            outcomes, floor = list(strategy.run(experiment, sparsities)), None
        else:
            outcome, floor = strategy.prune_to_floor(experiment, min_accuracy=args.min_accuracy, max_drop=args.max_accuracy_drop)
            outcomes = [outcome]
        if one_shot:  # the dense run every sparsity started from (cached: not trained again)
            dense, scores = strategy.trained(experiment)
    if floor is None:
        results = [{"sparsity": o.sparsity, "accuracy": o.accuracy} for o in outcomes]
        for row, outcome in zip(results, outcomes):
            if isinstance(outcome.sparsity, str):  # an N:M pattern: the fraction it pruned of the scored weights
                row["measured_sparsity"] = sum(int((~m.bool()).sum()) for m in outcome.masks.values()) / sum(m.numel() for m in outcome.masks.values())
    else:
        results = [{
            "sparsity": floor.sparsity,
            "accuracy": outcome.accuracy,
            "validation_accuracy": floor.accuracy,
            "validation_floor": floor.floor,
            "evaluations": floor.evaluations,
        }]
        if floor.accuracy < floor.floor:
            print(
                f"bingo: warning: validation accuracy {floor.accuracy:.4f} of the dense model is already below "
                f"the floor {floor.floor:.4f}; nothing was pruned",
                file=sys.stderr,
            )
        elif one_shot and args.method != "bingo-gradual":  # where one-shot stops holding, and what goes further
            print(f"one-shot {args.method} holds the floor up to sparsity {floor.sparsity:.4f} (validation accuracy "
                  f"{floor.accuracy:.4f} >= {floor.floor:.4f}); beyond it, prune during training: "
                  "--method bingo-gradual --sparsity S (one training run per target)"
                  # multi-step re-fits went further than one jump on every benchmark measured (BENCHMARKS.md)
                  + (", or without training reach --sparsity S in prune-and-refit steps: --compensation-steps 4"
                     if getattr(getattr(strategy.config, "compensation", None), "compensate", False) else ""))
    for row, outcome in zip(results, outcomes):  # the prune's own time (compensation included), beside train/search seconds
        row["prune_seconds"] = outcome.prune_seconds
        if outcome.magnitude_weight is not None:  # chosen for this sparsity on the validation split
            row["magnitude_weight"] = outcome.magnitude_weight
    pruned_model = outcomes[-1].model
    scored = coverage(pruned_model if pruned_model is not None else experiment.new_model(), outcomes[-1].masks)
    for row, outcome in zip(results, outcomes):  # the sparsity asked for is over the scored weights; this is over everything
        # (IMP's outcomes carry masks only: weight masks, so the pruned entries are theirs)
        pruned = pruned_parameters(outcome.model) if outcome.model is not None else sum(int((~m.bool()).sum()) for m in outcome.masks.values())
        row["sparsity_all_parameters"] = pruned / scored.total if scored.total else 0.0
    if one_shot:
        dense_accuracy = experiment.evaluate(dense.model)
        train_seconds, search_seconds, train_steps = dense.cost.seconds, dense.search_seconds, dense.cost.steps
    else:
        dense_accuracy, scores = None, None
        train_seconds, search_seconds, train_steps = outcomes[-1].seconds, 0.0, outcomes[-1].train_steps
    config = config_record(strategy.config)
    report = {
        "method": args.method,
        "data": args.data,
        "model": args.model,
        "granularity": granularity,
        "scope": getattr(strategy.config, "scope", None),
        "finetune_epochs": getattr(strategy.config, "finetune_epochs", 0),
        "seed": args.seed,
        "config": config,
        "search": config.get("search") if isinstance(config, dict) else None,
        "training": dataclasses.asdict(train_config),
        "train_examples": len(data.x_train),
        "processes": distributed.world_size(),
        "validation_examples": len(data.x_val),
        "test_examples": len(data.x_test),
        "dense_accuracy": dense_accuracy,
        "coverage": dataclasses.asdict(scored),
        "results": results,
        "train_seconds": train_seconds,
        "search_seconds": search_seconds,
        # layers the hybrid's fake passes could not calibrate (ranked by their Taylor estimate alone)
        "uncalibrated_layers": _uncalibrated(dense) if one_shot else None,
        "train_steps": train_steps,
        "version": __version__,
        "machine": machine(),
        "device": str(device),
    }
    if not distributed.is_main_process():  # under torchrun: one set of outputs, written by rank 0
        return 0
    if args.scores:
        from ..io import save_scores

        save_scores(scores, args.scores)
        report["scores_file"] = args.scores
    if args.save:
        from .model_file import save_model_file

        save_model_file(
            args.save, pruned_model, architecture=args.model, data=data, granularity=granularity,
            sparsity=results[-1]["sparsity"], accuracy=results[-1]["accuracy"],
        )
        report["model_file"] = args.save
    if args.export:
        from ..export import export_model

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_model(
                pruned_model, (data.offset, data.scale), data.input_shape, args.export,
                metadata={"architecture": args.model, "data": args.data, "granularity": granularity,
                          "num_classes": data.num_classes, "sparsity": results[-1]["sparsity"], "accuracy": results[-1]["accuracy"]},
                raw_shape=data.raw_shape, shrink_units=granularity == "neuron", onnx=args.onnx,
            )
        _print_warnings(caught)
        report["export_dir"] = args.export
    write_json(args.out, report)
    print(scored)
    chosen = any("magnitude_weight" in r for r in results)
    print(_table(
        [[_sparsity_text(r), f"{r['sparsity_all_parameters']:.4f}", f"{r['accuracy']:.4f}",
          *([f"{r['magnitude_weight']:g}" if "magnitude_weight" in r else "-"] if chosen else [])] for r in results],
        ["sparsity", "of all parameters", "accuracy", *(["magnitude weight (chosen on validation)"] if chosen else [])],
    ))
    dense_text = "" if dense_accuracy is None else f"dense accuracy {dense_accuracy:.4f}; "
    print(f"{dense_text}train {train_seconds:.1f} s (search {search_seconds:.1f} s); results in {args.out}")
    return 0


def _uncalibrated(dense) -> list[str] | None:
    """The scored layers whose hybrid calibration did not engage, for the results (None: not a hybrid search)."""
    estimator = getattr(getattr(dense, "search", None), "estimator", None)
    return estimator.uncalibrated() if hasattr(estimator, "uncalibrated") else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    joined = False
    try:
        if args.command == "run":  # under torchrun: join the job's process group (nccl on GPUs, gloo on the CPU)
            joined = distributed.init_from_environment(distributed.backend_for(resolve_device(args.device)))
        elif os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):  # every process would write the same files
            raise ConfigError(f"'bingo {args.command}' runs in one process; under torchrun only 'bingo run' is distributed")
        return {"demo": cmd_demo, "run": cmd_run, "compare": cmd_compare, "export": cmd_export}[args.command](args)
    except BingoError as exc:
        print(f"bingo: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable --out/--save/--scores/--checkpoint, a full disk, ...
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        message = f"{exc.strerror}: {where}" if exc.strerror and where else str(exc)
        print(f"bingo: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bingo: interrupted; files already written are complete (written atomically)", file=sys.stderr)
        return 130
    except torch.distributed.DistError as exc:  # a process of the torchrun job died or hung up
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        print(f"bingo: error: rank {distributed.rank()} lost contact with the other processes of the job ({first}); "
              "files already written are complete (written atomically)", file=sys.stderr)
        return 1
    finally:
        if joined and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

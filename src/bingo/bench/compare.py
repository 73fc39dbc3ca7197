"""``bingo compare``: every method on the same data, initial weights and data order.

For each seed, an :class:`~bingo.bench.strategies.Experiment` fixes θ0 and the data
order; each method delivers one pruned network per sparsity and is charged
the whole wall time it needed (dense training and fine-tune included).
Results go to ``DIR/results.json`` after every finished network (atomically),
masks to ``DIR/masks/``, so a run killed halfway loses at most the network in
progress and ``resume=True`` skips everything already recorded. A folder that
holds an earlier comparison is never written over: it is continued
(``resume=True``) or moved aside first (``overwrite=True``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import load_dataset, training_subset
from ..devices import resolve_device
from ..errors import CheckpointError, ConfigError
from ..io import load_scores, save_scores, special_file, write_json
from .models import MODELS
from ..selection import check_sparsity
from .configs import config_record
from .environment import machine
from .strategies import STRATEGIES, Experiment, Strategy
from .training import TrainConfig, on_terminal, warn_if_few_steps

__all__ = ["LOCK_FILE", "MAX_SEEDS", "CompareConfig", "compare_lock", "mask_overlap", "run_compare"]


#: The most seeds one comparison takes: each trains every method again, and results.json lists them all.
MAX_SEEDS = 10_000


@dataclass(frozen=True)
class CompareConfig:
    """What to compare: data, model, training recipe, methods, sparsities, seeds."""

    data: str
    model: str
    epochs: int = 3
    methods: tuple[str, ...] = ("bingo", "imp", "gmp", "magnitude", "snip", "random")
    sparsities: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    seeds: int = 1
    batch_size: int = 128
    lr: float = 1.2e-3
    optimizer: str = "adam"
    finetune_epochs: int = 0
    data_dir: str | None = None
    method_configs: dict = field(default_factory=dict)  #: name -> config dataclass instance
    train_samples: int | None = None  #: train on a seeded random subset of this many training examples (None: all)
    device: str = "auto"  #: where the models train and prune (:func:`bingo.devices.resolve_device`); not a setting a resume must match

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; valid choices: {', '.join(MODELS)}")
        if not self.methods:
            raise ConfigError(f"no methods given; valid choices: {', '.join(STRATEGIES)}")
        for name in self.methods:
            if name not in STRATEGIES:
                raise ConfigError(f"unknown method {name!r}; valid choices: {', '.join(STRATEGIES)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"a method is listed twice: {', '.join(self.methods)}")
        if not self.sparsities:
            raise ConfigError("no sparsities given")
        object.__setattr__(self, "sparsities", tuple(sorted({check_sparsity(s) for s in self.sparsities})))
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or not 1 <= self.seeds <= MAX_SEEDS:
            raise ConfigError(f"seeds must be a whole number in [1, {MAX_SEEDS}], got {self.seeds!r}")
        self.train_config()  # validates epochs, batch size, lr, optimizer
        if self.train_samples is not None and (isinstance(self.train_samples, bool) or int(self.train_samples) != self.train_samples or self.train_samples < 1):
            raise ConfigError(f"training samples must be a whole number >= 1, got {self.train_samples!r}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer)

    def settings(self) -> dict:
        """The JSON record of these settings (what a resumed run must match)."""
        return {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "optimizer": self.optimizer,
            "methods": list(self.methods),
            "sparsities": list(self.sparsities),
            "seeds": list(range(self.seeds)),
            "finetune_epochs": self.finetune_epochs,
            "method_configs": {
                name: config_record(config) for name, config in sorted(self.method_configs.items()) if name in self.methods
            },
            # recorded only when set, so results from before the option resume unchanged
            **({"train_samples": self.train_samples} if self.train_samples is not None else {}),
        }


def mask_overlap(pruned_by_a: dict[str, torch.Tensor], pruned_by_b: dict[str, torch.Tensor]) -> float:
    """Fraction of the weights B pruned that A pruned too: ``|P_a ∩ P_b| / |P_b|``.

    Arguments are keep-masks (True = kept). At equal sparsity the measure is
    symmetric; two independent random prunings at sparsity ``s`` overlap by ``s``
    in expectation.
    """
    both = pruned = 0
    for key, keep_b in pruned_by_b.items():
        cut_b = ~keep_b.bool()
        both += int((cut_b & ~pruned_by_a[key].bool()).sum())
        pruned += int(cut_b.sum())
    return both / pruned if pruned else math.nan


def _mask_path(out_dir: Path, method: str, seed: int, sparsity: float) -> Path:
    return out_dir / "masks" / f"{method}-seed{seed}-sparsity{sparsity:g}.safetensors"


#: What a comparison writes into its folder (``write_report`` adds all but the first and last).
_OUTPUTS = ("results.json", "results.csv", "accuracy.png", "cost.png", "summary.md", "masks")


def _check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write over an earlier comparison in ``out_dir`` unless told to continue it or move it aside."""
    if resume and overwrite:
        raise ConfigError(
            f"--resume and --overwrite exclude each other: --resume continues the comparison in {out_dir}, "
            "--overwrite moves it aside and starts afresh"
        )
    found = [name for name in _OUTPUTS if (out_dir / name).exists()]
    if found and not resume and not overwrite:
        raise ConfigError(
            f"{out_dir} holds the results of an earlier comparison ({', '.join(found)}); "
            f"pass --resume to continue it or --overwrite to move it into {out_dir}/previous-<UTC time>/ and start afresh"
        )


def _set_aside(out_dir: Path) -> Path | None:
    """Move an earlier comparison's outputs into ``out_dir/previous-<UTC time>/`` (never deleted); that folder, or None."""
    found = [out_dir / name for name in _OUTPUTS if (out_dir / name).exists()]
    if not found:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside, n = out_dir / f"previous-{stamp}", 1
    while aside.exists():
        n += 1
        aside = out_dir / f"previous-{stamp}-{n}"
    aside.mkdir()
    for path in found:
        path.rename(aside / path.name)
    return aside


#: The lock file a running comparison holds in its folder: the holder's pid, under an advisory ``flock``.
LOCK_FILE = ".bingo-compare.lock"
_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth (cmd_compare's lock around run_compare's)


@contextlib.contextmanager
def compare_lock(out_dir: str | os.PathLike):
    """Hold ``out_dir``'s comparison lock for the block; :class:`ConfigError` at once if another process holds it.

    Two comparisons writing one folder would lose one's rows (each rewrites
    ``results.json`` from what it read). The lock is an exclusive ``flock``
    on ``out_dir/.bingo-compare.lock``, which holds the holder's pid for the
    message. The kernel drops the lock when its process ends, however it
    ends, so a lock file left by a killed run is simply taken over; a clean
    end removes it. A folder this call created is removed again when the
    block leaves it empty (a comparison refused before writing anything).
    """
    import fcntl

    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    key = path.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    kind = special_file(path)
    if kind is not None:
        raise ConfigError(f"{path} is {kind}, not a regular file; remove it (bingo compare keeps its lock there)")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"bingo compare pid {holder}" if holder.isdigit() else "another bingo compare"
            raise ConfigError(f"{out_dir} is in use by {who}; wait for it to finish or give another --out") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the file may have been removed (by a holder finishing) between our open and our lock: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            path.unlink(missing_ok=True)  # still holding the lock: no one else can be between open and lock on this file
    finally:
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if empty


def _kind(value: object) -> str:
    """What a JSON value is, in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "a list", str: "a string", int: "a whole number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _not_results(previous: object) -> str | None:
    """Why ``previous`` (parsed JSON) is not a ``run_compare`` results dict; None if it is one."""
    if not isinstance(previous, dict):
        return f"top level is {_kind(previous)}, not an object"

    def wrong(value: object, kind: type) -> bool:
        return not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)

    fields = {"data": str, "model": str, "epochs": int, "settings": dict, "dense": list, "runs": list,
              "overlap": list, "search_overhead": list}
    for key, kind in fields.items():
        if key not in previous:
            if key in ("overlap", "search_overhead"):
                continue
            return f"no {key!r}"
        if wrong(previous[key], kind):
            return f"{key!r} is {_kind(previous[key])}, not {_kind(kind())}"
    settings = {"methods": (list, str), "sparsities": (list, (int, float)), "seeds": (list, int), "method_configs": (dict, dict)}
    for key, (kind, item) in settings.items():
        value = previous["settings"].get(key, kind())
        if wrong(value, kind) or any(wrong(v, item) for v in (value.values() if kind is dict else value)):
            return f"settings[{key!r}] is not {_kind(kind())} of the right values"
    rows = {"dense": {"seed": int, "accuracy": (int, float)},
            "runs": {"method": str, "seed": int, "sparsity": (int, float), "accuracy": (int, float)},
            "overlap": {"seed": int, "sparsity": (int, float)}, "search_overhead": {}}
    for section, keys in rows.items():
        for i, row in enumerate(previous.get(section, [])):
            if not isinstance(row, dict):
                return f"{section}[{i}] is {_kind(row)}, not an object"
            for key, kind in keys.items():
                if key not in row:
                    return f"{section}[{i}] has no {key!r}"
                if wrong(row[key], kind):
                    return f"{section}[{i}][{key!r}] is {_kind(row[key])}"
    recorded = previous["settings"]
    seen: dict[tuple, int] = {}
    for i, row in enumerate(previous["runs"]):  # each run once, and only of what the file says it ran
        key = (row["method"], row["seed"], row["sparsity"])
        if key in seen:
            return f"runs[{i}] repeats runs[{seen[key]}] (method {key[0]!r}, seed {key[1]}, sparsity {key[2]:g})"
        seen[key] = i
        for name, value in (("methods", row["method"]), ("seeds", row["seed"]), ("sparsities", row["sparsity"])):
            if name in recorded and value not in recorded[name]:
                return f"runs[{i}] has {name[:-1] if name != 'sparsities' else 'sparsity'} {value!r}, which settings[{name!r}] does not list"
    return None


def _load_previous(path: Path, base: dict, rerun_changed: bool = False) -> dict:
    """The results recorded in ``path``, merged with this run's ``base``; :class:`CheckpointError` if they do not fit."""
    kind = special_file(path)
    if kind is not None:  # reading a FIFO would wait for a writer forever
        raise CheckpointError(f"cannot resume from {path}: it is {kind}, not a regular file; use another --out")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot resume from {path}: {exc.strerror or exc}") from None
    def non_finite(constant: str) -> None:  # bingo writes none: a NaN here would be caught only at the next save
        raise CheckpointError(f"cannot resume from {path}: it holds {constant}, which bingo never writes (JSON has no "
                              "NaN or Infinity); use another --out")

    try:
        previous = json.loads(text, parse_constant=non_finite)
    except CheckpointError:  # (a ValueError too) the non-finite constant's own message
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = f"not JSON: {' '.join(str(exc).split())}" if isinstance(exc, json.JSONDecodeError) else "not JSON"
        raise CheckpointError(f"cannot resume from {path}: not a bingo compare results file ({reason}); use another --out") from None
    reason = _not_results(previous)
    if reason is not None:
        raise CheckpointError(f"cannot resume from {path}: not a bingo compare results file ({reason}); use another --out")
    for key in ("data", "model", "epochs"):
        if previous.get(key) != base[key]:
            raise CheckpointError(
                f"cannot resume: {path} was made with {key}={previous.get(key)!r}, not {base[key]!r}; use another --out"
            )
    old, new = previous["settings"], base["settings"]
    for key in ("batch_size", "lr", "optimizer", "finetune_epochs", "train_samples"):
        if old.get(key) != new.get(key):
            raise CheckpointError(f"cannot resume: {path} was made with {key}={old.get(key)!r}, not {new[key]!r}; use another --out")
    for name, config in new["method_configs"].items():
        if name in old.get("method_configs", {}) and _comparable(old["method_configs"][name]) != _comparable(config):
            if not rerun_changed:
                raise CheckpointError(f"cannot resume: {path} ran {name} with other settings {old['method_configs'][name]}; "
                                      "use another --out, or --rerun-changed to run it again here")
            _forget(previous, name)
            print(f"bingo compare: {name} ran with other settings in {path}; its rows are dropped and it runs again",
                  file=sys.stderr)
    previous["settings"] = {
        **new,
        "methods": list(dict.fromkeys(old.get("methods", []) + new["methods"])),
        "sparsities": sorted(set(old.get("sparsities", [])) | set(new["sparsities"])),
        "seeds": sorted(set(old.get("seeds", [])) | set(new["seeds"])),
        "method_configs": {**old.get("method_configs", {}), **new["method_configs"]},
    }
    for key in ("dense", "runs", "overlap", "search_overhead"):
        previous.setdefault(key, [])
    # The machines that measured the rows: this one joins when it adds a row (_measured_here).
    previous["machines"] = previous.get("machines") if isinstance(previous.get("machines"), list) else []
    return previous


def _drop_runs_without_their_masks(results: dict, out_dir: Path) -> None:
    """Drop (so that they run again) the rows whose mask file is missing or no longer has the recorded digest."""
    kept = []
    for row in results["runs"]:
        path = _mask_path(out_dir, row["method"], row["seed"], row["sparsity"])
        digest = row.get("mask_sha256")  # rows of versions before it cannot be checked
        why = ("is missing" if not path.is_file() else
               "does not match its recorded digest" if digest is not None and _sha256(path) != digest else None)
        if why is None or digest is None and path.is_file():
            kept.append(row)
            continue
        print(f"bingo compare: the mask file {path} {why}; {row['method']} (seed {row['seed']}, sparsity "
              f"{row['sparsity']:g}) runs again", file=sys.stderr)
    results["runs"] = kept


def _forget(results: dict, method: str) -> None:
    """Drop every row ``method`` contributed (its runs, search overhead and overlaps with IMP) from ``results``."""
    results["runs"] = [r for r in results.get("runs", []) if r.get("method") != method]
    results["search_overhead"] = [r for r in results.get("search_overhead", []) if r.get("method") != method]
    if method == "imp":
        results["overlap"] = []
    for row in results.get("overlap", []):
        row.pop(f"{method}_vs_imp", None)


def _measured_here(results: dict, device: torch.device) -> None:
    """Add this machine and device to ``results["machines"]`` (once): rows it measures may differ in their last digits."""
    here = {**machine(), "device": str(device)}
    if here not in results["machines"]:
        results["machines"].append(here)


def _comparable(record: object) -> object:
    """A method's recorded settings in one flat, canonical form, so equal settings compare equal across versions.

    Before nested configs (bingo 0.1.0 up to the estimator refactor) a BINGO
    method's search settings sat beside its own, with ``batched`` (always
    False in recorded runs; removed) and a ``rule`` its gradient estimators
    never read. The nested form records a ``search`` and a ``compensation``
    dict. Both flatten to the same keys here; settings that cannot change a
    result are dropped: the search seed (the experiment's), an empty
    include/exclude, ``batched=False``, compensation when it is off (and
    ``batchnorm="keep"``, recorded since that option exists), ``taylor_every=1``
    (the Taylor average from every step, as before that option), the rule
    of the taylor and hybrid estimators, and a probe rule of None (= mean).
    The search's results under both forms were checked bit-identical.
    """
    if not isinstance(record, dict):
        return record
    flat: dict = {}
    for key, value in record.items():
        if key in ("search", "compensation") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    for key, default in (("seed", None), ("include", None), ("exclude", []), ("batched", False)):
        if key in flat and (default is None and key == "seed" or flat[key] == default):
            del flat[key]
    if flat.get("compensate") is False:
        flat.pop("compensate")
        flat.pop("calibration_samples", None)
        flat.pop("batchnorm", None)
        flat.pop("solver", None)  # no re-fit, no solver (a compensated record without one ran another solver: refused)
    if flat.get("batchnorm") == "keep":  # the default, recorded only since the option exists
        flat.pop("batchnorm")
    if flat.get("taylor_every") == 1:  # every step: what ran before the option existed
        flat.pop("taylor_every")
    if flat.get("estimator") in ("taylor", "hybrid"):
        flat.pop("rule", None)
    elif "estimator" in flat and flat.get("rule") is None:
        flat["rule"] = "mean"
    return flat


def run_compare(
    config: CompareConfig, out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
    rerun_changed: bool = False,
) -> dict:
    """Run the comparison, writing ``results.json`` (and masks) into ``out_dir`` as it goes.

    A folder that already holds a comparison's outputs is refused with a
    :class:`ConfigError` before anything is trained, unless ``resume=True``
    (continue it: runs already recorded are skipped) or ``overwrite=True``
    (move its outputs into ``out_dir/previous-<UTC time>/``, never deleting
    them, then start afresh). A resumed run delivers the same networks at the
    same cost as an uninterrupted one: a strategy with
    :attr:`~bingo.bench.strategies.Strategy.one_trajectory` (IMP) is asked again for
    every sparsity on its way, and only the missing ones are recorded.
    A method recorded with other settings is refused, unless
    ``rerun_changed=True``: then its rows are dropped and it runs again (the
    other methods' rows stay), which is how a benchmark is brought up to date
    after a method changed.

    Returns the results dict (schema in the README: ``data, model, epochs,
    settings, dense, runs, overlap, search_overhead``).
    """
    out_dir = Path(out_dir)
    if rerun_changed and not resume:
        raise ConfigError("--rerun-changed goes with --resume: it reruns, in a resumed folder, the methods whose settings changed")
    _check_out_dir(out_dir, resume, overwrite)
    with compare_lock(out_dir):  # one comparison per folder at a time
        _check_out_dir(out_dir, resume, overwrite)  # again: another one may have finished there meanwhile
        return _run_compare(config, out_dir, resume=resume, overwrite=overwrite, progress=progress, rerun_changed=rerun_changed)


def _run_compare(config: CompareConfig, out_dir: Path, *, resume: bool, overwrite: bool, progress: bool, rerun_changed: bool) -> dict:
    """:func:`run_compare`'s work, with ``out_dir`` checked and locked."""
    results_path = out_dir / "results.json"
    device = resolve_device(config.device)
    base = {
        "data": config.data,
        "model": config.model,
        "epochs": config.epochs,
        "settings": config.settings(),
        "dense": [],
        "runs": [],
        "overlap": [],
        "search_overhead": [],
        "machines": [],
    }
    results = _load_previous(results_path, base, rerun_changed) if resume and results_path.exists() else base
    _drop_runs_without_their_masks(results, out_dir)
    strategies: dict[str, Strategy] = {
        name: STRATEGIES[name](config.method_configs.get(name)) for name in config.methods
    }
    data = load_dataset(config.data, config.data_dir)
    if config.train_samples is not None:
        data = training_subset(data, config.train_samples)
    warn_if_few_steps(config.train_config(), len(data.x_train))
    if overwrite:
        _set_aside(out_dir)

    def done(method: str, seed: int, sparsity: float) -> bool:
        return any(r["method"] == method and r["seed"] == seed and r["sparsity"] == sparsity for r in results["runs"])

    todo = [(seed, name) for seed in range(config.seeds) for name in config.methods]
    if any(not done(name, seed, s) for seed, name in todo for s in config.sparsities):
        _warm_up(Experiment(data, config.model, config.train_config(), 0, progress=False, device=device))
    bar = tqdm(total=len(todo), desc="compare", unit="method", disable=not progress or not on_terminal())  # bars on a terminal only
    try:
        for seed in range(config.seeds):
            experiment = Experiment(data, config.model, config.train_config(), seed, progress=progress, device=device)
            if not any(r["seed"] == seed for r in results["dense"]):
                dense = experiment.dense()
                _measured_here(results, device)
                results["dense"].append(
                    {
                        "seed": seed,
                        "accuracy": experiment.evaluate(dense.model),
                        "seconds": dense.cost.seconds,
                        "train_steps": dense.cost.steps,
                        "forward_passes": dense.cost.forward_passes,
                    }
                )
                write_json(results_path, results)
            for name, strategy in strategies.items():
                bar.set_postfix_str(f"seed {seed} {name}")
                pending = [s for s in config.sparsities if not done(name, seed, s)]
                if pending:
                    for outcome in strategy.run(experiment, _asked(results, strategy, seed, config.sparsities, pending)):
                        if done(name, seed, outcome.sparsity):
                            continue  # on the way to a pending one; recorded earlier
                        path = save_scores(outcome.masks, _mask_path(out_dir, name, seed, outcome.sparsity))
                        row = outcome.record()
                        row["layer_sparsity"] = {
                            key: 1.0 - float(mask.float().mean()) for key, mask in outcome.masks.items()
                        }
                        row["mask_sha256"] = _sha256(path)
                        _measured_here(results, device)
                        results["runs"].append(row)
                        write_json(results_path, results)
                    extras = strategy.extras(experiment)
                    for section, row in extras.items():
                        _replace_row(results, section, row)
                    if extras:
                        write_json(results_path, results)
                bar.update(1)
            if _record_overlaps(results, out_dir, seed, config.sparsities, config.methods):
                write_json(results_path, results)
    finally:
        bar.close()
    results["runs"].sort(key=lambda r: (results["settings"]["methods"].index(r["method"]) if r["method"] in results["settings"]["methods"] else 99, r["seed"], r["sparsity"]))
    write_json(results_path, results)
    return results


def _asked(results: dict, strategy: Strategy, seed: int, sparsities: Sequence[float], pending: list[float]) -> list[float]:
    """The sparsities to ask ``strategy`` for so that it delivers ``pending`` as an uninterrupted run would.

    Usually ``pending`` itself. A strategy on one trajectory (IMP) must pass
    through every target before the last pending one, those it delivered
    earlier for this seed included, or its networks and costs change.
    """
    if not strategy.one_trajectory:
        return pending
    recorded = {r["sparsity"] for r in results["runs"] if r["method"] == strategy.name and r["seed"] == seed}
    return sorted(s for s in set(sparsities) | recorded if s <= max(pending))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _warm_up(experiment: Experiment, steps: int = 20) -> None:
    """A few untimed training steps before anything is timed.

    One-time start-up costs (thread pools, allocator, kernel choice) would
    otherwise be charged to whichever run comes first, the dense training of
    seed 0, and skew the search-overhead ratio and the cost table.
    """
    with torch.random.fork_rng():
        model = experiment.new_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=experiment.train_config.lr)
        size = experiment.train_config.batch_size
        x, y = experiment.data.x_train[:size], experiment.data.y_train[:size]
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        experiment.evaluate(model)


def _replace_row(results: dict, section: str, row: dict) -> None:
    """Put a strategy's extra ``row`` into ``results[section]``, replacing its earlier row for the same method and seed."""
    rows = results.setdefault(section, [])
    rows[:] = [r for r in rows if (r.get("method"), r.get("seed")) != (row.get("method"), row.get("seed"))]
    rows.append(row)


def _recorded_masks(results: dict, out_dir: Path, method: str, seed: int, sparsity: float) -> dict[str, torch.Tensor] | None:
    """The keep-masks the recorded run ``(method, seed, sparsity)`` wrote.

    None if ``results["runs"]`` has no such run, or its mask file is missing
    or is not the file the run wrote (its SHA-256 differs from the run's
    ``mask_sha256``; rows without one, from older versions, cannot be checked).
    """
    row = next((r for r in results["runs"] if (r["method"], r["seed"], r["sparsity"]) == (method, seed, sparsity)), None)
    path = _mask_path(out_dir, method, seed, sparsity)
    if row is None or "mask_sha256" not in row or not path.is_file() or _sha256(path) != row["mask_sha256"]:
        return None
    return load_scores(path)


def _record_overlaps(results: dict, out_dir: Path, seed: int, sparsities: Sequence[float], methods: Sequence[str]) -> bool:
    """Overlap of every other method's pruned weights with IMP's (the lottery ticket), at each sparsity both reached.

    Adds a ``"<method>_vs_imp"`` value to the seed's row per sparsity, for
    each method of this invocation (``methods``) whose masks score the same
    weights as IMP's. Only masks of runs recorded in ``results`` are read,
    each checked against the digest its run recorded: IMP's run may come
    from earlier in a resumed folder, but a file lying in ``masks/`` that no
    recorded run wrote (another comparison's, a replaced one) never counts.
    Values measured earlier stay. True if anything was added.
    """
    added = False
    for sparsity in sparsities:
        row = next((r for r in results["overlap"] if r["seed"] == seed and r["sparsity"] == sparsity), None)
        wanted = [m for m in methods if m != "imp" and (row is None or f"{m}_vs_imp" not in row)]
        imp = _recorded_masks(results, out_dir, "imp", seed, sparsity) if wanted else None
        if imp is None:
            continue
        for method in wanted:
            mine = _recorded_masks(results, out_dir, method, seed, sparsity)
            if mine is None or set(mine) != set(imp) or any(mine[k].shape != imp[k].shape for k in imp):
                continue  # not recorded, or a different granularity: no weight-by-weight overlap
            overlap = mask_overlap(mine, imp)
            if not math.isfinite(overlap):
                continue  # IMP pruned nothing (sparsity 0): no overlap to measure, none recorded
            if row is None:
                row = {"seed": seed, "sparsity": sparsity, "random_expectation": sparsity}
                results["overlap"].append(row)
            row[f"{method}_vs_imp"] = overlap
            added = True
    return added

"""Issue 20, the second hostile round: nothing lost, nothing hangs, one-line errors.

Each test here failed before its fix. Tests that could hang on a regression
(a warning loop, a FIFO that blocks) run their case in a subprocess with a
timeout, so a regression fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import bingo
from conftest import assert_user_error, call

SRC = Path(bingo.__file__).resolve().parents[1]


def run_python(code: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this bingo; fail (not hang) past ``timeout`` seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, env=env, **kwargs)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish within {timeout} s (a hang)")


def run_bingo(*argv, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """``python -m bingo ARGV`` as a real process, with a timeout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    try:
        return subprocess.run([sys.executable, "-m", "bingo", *map(str, argv)], capture_output=True, text=True,
                              timeout=timeout, env=env, **kwargs)
    except subprocess.TimeoutExpired:
        pytest.fail(f"bingo {' '.join(map(str, argv))} did not finish within {timeout} s (a hang)")


# -- a foreign warning inside run / compare ---------------------------------------------


@pytest.mark.parametrize("category", ["UserWarning", "DeprecationWarning", "RuntimeWarning"])
def test_a_foreign_warning_inside_the_cli_block_is_shown_once_and_does_not_hang(category):
    result = run_python(f"""
        import warnings
        from bingo.bench.cli import _one_line_warnings
        warnings.simplefilter("always")
        with _one_line_warnings():
            warnings.warn("from another library", {category})
            warnings.warn("from another library, twice", {category})
        print("done")
    """, timeout=15)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n"
    assert result.stderr.count("from another library") == 2
    assert "bingo: warning" not in result.stderr


def test_a_foreign_warning_raised_with_an_exception_in_the_block_is_shown_and_the_error_kept():
    result = run_python("""
        import warnings
        from bingo.bench.cli import _one_line_warnings
        try:
            with _one_line_warnings():
                warnings.warn("foreign")
                raise KeyError("inner")
        except KeyError as exc:
            print("kept", exc)
    """, timeout=15)
    assert result.returncode == 0, result.stderr
    assert "kept 'inner'" in result.stdout and result.stderr.count("foreign") == 1


@pytest.mark.parametrize("writer", ["pickle", "torch-protocol-4"])
def test_a_foreign_pickle_as_checkpoint_is_one_line_and_returns(tmp_path, writer):
    """Was: torch's UserWarning about the pickle protocol sent the CLI into an endless loop (4.8 GB in 45 s)."""
    import pickle

    checkpoint = tmp_path / "x.pkl"
    if writer == "pickle":
        checkpoint.write_bytes(pickle.dumps({"a": 1}))
    else:
        torch.save({"a": 1}, checkpoint, pickle_protocol=4, _use_new_zipfile_serialization=False)
    result = run_bingo("run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.5", "--method", "magnitude",
                       "--out", tmp_path / "r.json", "--checkpoint", checkpoint, "--no-progress", timeout=60)
    assert_user_error(result.returncode, result.stderr, r"x\.pkl is not a bingo checkpoint \(corrupt or from another program\)")
    assert "UserWarning" not in result.stderr
    assert not (tmp_path / "r.json").exists()


# -- outputs and inputs that are not regular files --------------------------------------

RUN = ["run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.5", "--method", "magnitude", "--no-progress"]


def make_special(path: Path, kind: str) -> Path:
    """A FIFO, a copy of /dev/null (a character device; skipped where mknod is not permitted), or a link to a FIFO."""
    import stat

    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except (PermissionError, OSError) as exc:
            pytest.skip(f"cannot make a character device here: {exc}")
    else:
        os.mkfifo(path.with_name(path.name + ".target"))
        path.symlink_to(path.with_name(path.name + ".target"))
    return path


def assert_untouched(path: Path, kind: str) -> None:
    import stat

    mode = os.stat(path).st_mode
    assert (stat.S_ISCHR(mode) if kind == "chardev" else stat.S_ISFIFO(mode)), f"{path} was replaced"
    if kind == "link":
        assert path.is_symlink()


SPECIAL = ["fifo", "chardev", "link"]
WORDS = {"fifo": "a FIFO \\(named pipe\\)", "chardev": "a character device", "link": "a symbolic link to a FIFO \\(named pipe\\)"}


@pytest.mark.parametrize("kind", SPECIAL)
@pytest.mark.parametrize("flag", ["--out", "--save", "--scores"])
def test_run_refuses_an_output_that_is_not_a_regular_file(capsys, tmp_path, flag, kind):
    special = make_special(tmp_path / "special", kind)
    paths = {"--out": tmp_path / "r.json", flag: special}
    argv = [*RUN, *(a for pair in paths.items() for a in pair)]
    code, _, err = call(capsys, *argv)
    assert_user_error(code, err, f"^bingo: error: {flag} {special} is {WORDS[kind]}, not a regular file; bingo writes only regular files")
    assert_untouched(special, kind)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("kind", ["fifo", "chardev"])
def test_run_refuses_an_export_folder_or_member_that_is_not_a_regular_file(capsys, tmp_path, kind):
    special = make_special(tmp_path / "exp", kind)
    code, _, err = call(capsys, *RUN, "--out", tmp_path / "r.json", "--export", special)
    assert_user_error(code, err, f"--export {special} is {WORDS[kind]}, not a folder")
    folder = tmp_path / "folder"
    folder.mkdir()
    member = make_special(folder / "model.json", kind)
    code, _, err = call(capsys, *RUN, "--out", tmp_path / "r.json", "--export", folder)
    assert_user_error(code, err, f"--export {member} is {WORDS[kind]}, not a regular file")
    assert_untouched(member, kind)


@pytest.mark.parametrize("kind", ["fifo", "chardev"])
def test_compare_refuses_an_out_or_an_out_member_that_is_not_a_regular_file(capsys, tmp_path, kind):
    argv = ["compare", "--data", "digits", "--model", "mlp", "--methods", "random", "--sparsities", "0.5", "--epochs", "1", "--no-progress"]
    special = make_special(tmp_path / "c", kind)
    code, _, err = call(capsys, *argv, "--out", special)
    assert_user_error(code, err, f"--out {special} is {WORDS[kind]}, not a folder")
    out = tmp_path / "out"
    out.mkdir()
    member = make_special(out / "cost.png", kind)
    code, _, err = call(capsys, *argv, "--out", out, "--resume")
    assert_user_error(code, err, f"--out {member} is {WORDS[kind]}, not a regular file")
    assert_untouched(member, kind)
    assert not (out / "results.json").exists()


def test_export_refuses_a_member_of_its_folder_that_is_not_a_regular_file(capsys, tmp_path):
    saved = tmp_path / "m.pt"
    code, _, err = call(capsys, *RUN, "--out", tmp_path / "r.json", "--save", saved)
    assert code == 0, err
    folder = tmp_path / "exp"
    folder.mkdir()
    member = make_special(folder / "weights.safetensors", "fifo")
    code, _, err = call(capsys, "export", saved, folder)
    assert_user_error(code, err, f"{member} is a FIFO \\(named pipe\\), not a regular file")
    assert_untouched(member, "fifo")
    assert not (folder / "model.json").exists()


@pytest.mark.parametrize("kind", SPECIAL)
def test_atomic_writers_refuse_a_path_that_is_not_a_regular_file(tmp_path, kind):
    from bingo.errors import ConfigError
    from bingo.io import save_checkpoint, save_scores, write_json

    special = make_special(tmp_path / "special", kind)
    for write in (lambda: write_json(special, {"a": 1}), lambda: save_scores({"w": torch.ones(2)}, special),
                  lambda: save_checkpoint({"a": 1}, special)):
        with pytest.raises(ConfigError, match=f"{special} is {WORDS[kind]}, not a regular file; bingo writes only regular files"):
            write()
        assert_untouched(special, kind)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["special", *(["special.target"] if kind == "link" else [])])


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_a_fifo_given_as_an_input_is_one_line_and_never_blocks(tmp_path, kind):
    """Was: torch.load of a FIFO as --checkpoint waited for a writer forever."""
    special = make_special(tmp_path / "in.npz", kind)
    out = tmp_path / "r.json"
    result = run_bingo(*RUN, "--out", out, "--checkpoint", special, timeout=60)
    assert_user_error(result.returncode, result.stderr, f"--checkpoint {special} is .*, not a regular file")
    result = run_bingo(*RUN[:2], special, *RUN[3:], "--out", out, timeout=60)
    assert_user_error(result.returncode, result.stderr, f"{special} is .*, not a regular file; bingo reads only regular files")
    result = run_bingo("export", special, tmp_path / "exp", timeout=60)
    assert_user_error(result.returncode, result.stderr, f"checkpoint {special} is .*, not a regular file; bingo reads only regular files")
    assert not out.exists()


def test_library_loaders_refuse_a_fifo_without_blocking(tmp_path):
    result = run_python(f"""
        import os
        from bingo.errors import CheckpointError, DataError
        from bingo.io import load_checkpoint, load_scores
        from bingo.bench.data import load_dataset
        os.mkfifo({str(tmp_path / "p.npz")!r})
        for load in (load_checkpoint, load_scores, load_dataset):
            try:
                load({str(tmp_path / "p.npz")!r})
            except (CheckpointError, DataError) as exc:
                print(type(exc).__name__, exc)
    """, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all("is a FIFO (named pipe), not a regular file; bingo reads only regular files" in line for line in lines)


def test_an_idx_file_that_is_a_fifo_is_refused_not_replaced(tmp_path):
    from bingo.bench.data import IDX_FILES, load_dataset
    from bingo.errors import DataError

    os.mkfifo(tmp_path / IDX_FILES[0])
    with pytest.raises(DataError, match="is a FIFO \\(named pipe\\), not a regular file"):
        load_dataset("fashion-mnist", tmp_path)
    assert_untouched(tmp_path / IDX_FILES[0], "fifo")


# -- an output on an input --------------------------------------------------------------


def write_npz(path: Path, n_train: int = 40, n_test: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.normal(size=(n_train, 8)).astype(np.float32), y_train=np.arange(n_train) % 3,
             x_test=rng.normal(size=(n_test, 8)).astype(np.float32), y_test=np.arange(n_test) % 3)
    return path


@pytest.mark.parametrize("flag", ["--out", "--save", "--scores", "--checkpoint"])
@pytest.mark.parametrize("spelling", ["same", "relative", "hardlink", "symlink"])
def test_run_refuses_an_output_on_its_data_file(capsys, tmp_path, monkeypatch, flag, spelling):
    """Was: --out data.npz replaced the dataset with the results JSON."""
    data = write_npz(tmp_path / "d.npz")
    before = data.read_bytes()
    monkeypatch.chdir(tmp_path)
    target = {"same": data, "relative": Path("sub/../d.npz"), "hardlink": tmp_path / "h.npz", "symlink": tmp_path / "s.npz"}[spelling]
    (tmp_path / "sub").mkdir()
    if spelling == "hardlink":
        os.link(data, target)
    elif spelling == "symlink":
        target.symlink_to(data)
    outputs = {"--out": tmp_path / "r.json", flag: target}
    code, _, err = call(capsys, *RUN[:2], data, *RUN[3:], *(a for pair in outputs.items() for a in pair))
    assert_user_error(code, err, f"{flag} {target} would write over the data file .*d.npz \\(--data\\); give {flag} another path")
    assert data.read_bytes() == before


def test_run_refuses_an_output_on_an_idx_file_of_data_dir(capsys, tmp_path):
    from bingo.bench.data import IDX_FILES

    victim = tmp_path / (IDX_FILES[1] + ".gz")
    victim.write_bytes(b"labels")
    code, _, err = call(capsys, "run", "--data", "fashion-mnist", "--data-dir", tmp_path, "--model", "mlp", "--sparsity", "0.5",
                        "--out", victim, "--no-progress")
    assert_user_error(code, err, "--out .* would write over the data file .*t10k|train-labels")
    assert victim.read_bytes() == b"labels"


def test_export_refuses_a_folder_where_it_would_replace_its_own_model_file(capsys, tmp_path):
    saved = tmp_path / "model.pt2"  # the --save file, named like the program export writes
    code, _, err = call(capsys, *RUN, "--out", tmp_path / "r.json", "--save", saved)
    assert code == 0, err
    before = saved.read_bytes()
    code, _, err = call(capsys, "export", saved, tmp_path)
    assert_user_error(code, err, f"exporting into {tmp_path} would write over {saved}, the model file it exports")
    assert saved.read_bytes() == before


# -- two comparisons into one folder -----------------------------------------------------

COMPARE = ["compare", "--data", "digits", "--model", "mlp", "--sparsities", "0.5", "--epochs", "1", "--no-progress"]


def hold_lock(out: Path) -> subprocess.Popen:
    """A real process holding ``out``'s comparison lock until its stdin closes; returns once it holds it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    code = f"import sys; from bingo.bench.compare import compare_lock\nwith compare_lock({str(out)!r}):\n print('held', flush=True); sys.stdin.read()"
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_compare_into_a_folder_in_use_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "c"
    holder = hold_lock(out)
    try:
        result = run_bingo(*COMPARE, "--methods", "magnitude", "--out", out, timeout=60)
        assert_user_error(result.returncode, result.stderr,
                          f"^bingo: error: {out} is in use by bingo compare pid {holder.pid}; wait for it to finish or give another --out$")
        assert not (out / "results.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    result = run_bingo(*COMPARE, "--methods", "magnitude", "--out", out, timeout=120)  # released: it runs
    assert result.returncode == 0, result.stderr
    assert not (out / ".bingo-compare.lock").exists()


def test_a_lock_left_by_a_killed_compare_is_taken_over(tmp_path):
    import signal

    out = tmp_path / "c"
    holder = hold_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (out / ".bingo-compare.lock").read_text().strip() == str(holder.pid)  # left behind, its pid dead
    result = run_bingo(*COMPARE, "--methods", "magnitude", "--out", out, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["runs"]] == ["magnitude"]
    assert not (out / ".bingo-compare.lock").exists()


def test_two_compares_started_together_into_one_folder_lose_nothing(tmp_path):
    """Was: both exited 0 and results.json held one method's rows, the other's masks orphaned."""
    out = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    runs = [subprocess.Popen([sys.executable, "-m", "bingo", *COMPARE, "--methods", method, "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for method in ("magnitude", "random")]
    try:
        finished = [(run.wait(timeout=180), run.stderr.read()) for run in runs]
    finally:
        for run in runs:
            run.kill()
    codes = sorted(code for code, _ in finished)
    assert codes == [0, 2], finished
    winner = ["magnitude", "random"][[code for code, _ in finished].index(0)]
    loser_err = next(err for code, err in finished if code == 2)
    assert_user_error(2, loser_err, f"{out} (is in use by (bingo compare pid \\d+|another bingo compare)|holds the results of an earlier comparison)")
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == [winner]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{winner}-seed0-sparsity0.5.safetensors"]


def test_the_library_run_compare_holds_the_lock_too(tmp_path):
    from bingo.bench.compare import CompareConfig, run_compare
    from bingo.errors import ConfigError

    out = tmp_path / "c"
    holder = hold_lock(out)
    try:
        with pytest.raises(ConfigError, match=f"is in use by bingo compare pid {holder.pid}"):
            run_compare(CompareConfig(data="digits", model="mlp", epochs=1, methods=("random",), sparsities=(0.5,)), out, progress=False)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# -- a checkpoint resumed on other data of the same name, count and shape ----------------


def test_a_checkpoint_is_not_resumed_on_other_data_of_the_same_name_count_and_shape(capsys, tmp_path):
    data, checkpoint = write_npz(tmp_path / "d.npz", seed=0), tmp_path / "ck.pt"
    argv = ["run", "--data", data, "--model", "mlp", "--sparsity", "0.5", "--out", tmp_path / "r.json", "--checkpoint", checkpoint,
            "--no-progress"]
    code, _, err = call(capsys, *argv, "--epochs", "1")
    assert code == 0, err
    before = checkpoint.read_bytes()
    write_npz(data, seed=1)  # the same file name, sample count and shape; other values
    code, _, err = call(capsys, *argv, "--epochs", "2")
    assert_user_error(code, err, f"checkpoint {checkpoint} was trained on other data: .*d.npz \\(36 training examples of shape \\(8,\\)\\) "
                      "holds other values than it did \\(its SHA-256 differs\\)")
    assert checkpoint.read_bytes() == before
    write_npz(data, seed=0)  # the data it was trained on: resumed
    code, _, err = call(capsys, *argv, "--epochs", "2")
    assert code == 0, err


def test_a_checkpoint_without_a_data_digest_resumes_with_a_warning(capsys, tmp_path):
    from bingo.io import load_checkpoint, save_checkpoint

    data, checkpoint = write_npz(tmp_path / "d.npz"), tmp_path / "ck.pt"
    argv = ["run", "--data", data, "--model", "mlp", "--sparsity", "0.5", "--out", tmp_path / "r.json", "--checkpoint", checkpoint,
            "--no-progress"]
    code, _, err = call(capsys, *argv, "--epochs", "1")
    assert code == 0, err
    old = load_checkpoint(checkpoint)
    del old["data_sha256"]  # as a bingo before the digest wrote it
    save_checkpoint(old, checkpoint)
    code, _, err = call(capsys, *argv, "--epochs", "2")
    assert code == 0, err
    [line] = [line for line in err.splitlines() if "digest" in line]
    assert line.startswith(f"bingo: warning: checkpoint {checkpoint} records no digest of its data (an older bingo wrote it)")
    assert "data_sha256" in load_checkpoint(checkpoint)  # the next epoch's checkpoint has it


# -- a full disk while writing ---------------------------------------------------------


def torch_full_disk(*args, **kwargs):
    """What torch.save raises on a full disk (into a file object: the OSError is its context)."""
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904 (as torch does)


def safetensors_full_disk(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("flag", ["--save", "--checkpoint", "--scores"])
def test_a_full_disk_during_save_checkpoint_or_scores_is_one_line_and_the_old_file_survives(capsys, tmp_path, monkeypatch, flag):
    import bingo.io

    target = tmp_path / "old.file"
    if flag == "--checkpoint":  # a checkpoint of epoch 1, which the save of epoch 2 fails to replace
        code, _, err = call(capsys, *RUN, "--out", tmp_path / "first.json", flag, target)
        assert code == 0, err
        (tmp_path / "first.json").unlink()
    else:
        target.write_bytes(b"the old file")
    before = target.read_bytes()
    if flag == "--scores":
        monkeypatch.setattr(bingo.io, "save_file", safetensors_full_disk)
    else:
        monkeypatch.setattr(torch, "save", torch_full_disk)
    code, _, err = call(capsys, *RUN[:6], "2", *RUN[7:], "--out", tmp_path / "r.json", flag, target)
    assert_user_error(code, err, f"^bingo: error: No space left on device: {target}$")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.file"]  # no temporary left, no results


def test_torch_write_failure_without_an_errno_is_an_os_error_naming_the_path(tmp_path, monkeypatch):
    from bingo.io import save_checkpoint

    def bare(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", bare)
    with pytest.raises(OSError, match="write failed") as caught:
        save_checkpoint({"a": 1}, tmp_path / "c.pt")
    assert caught.value.filename == str(tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (root only; skipped where mounting is not permitted)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    yield mount
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)  # lazily, so no mount outlives the test


def test_a_real_full_disk_under_every_writer_is_an_os_error_and_the_old_file_survives(tiny_disk):
    from bingo.io import save_checkpoint, save_scores, write_json

    big = torch.zeros(100_000)
    for name, write in (("c.pt", lambda p: save_checkpoint({"w": big}, p)), ("s.safetensors", lambda p: save_scores({"w": big}, p)),
                        ("r.json", lambda p: write_json(p, {"w": [0.0] * 100_000}))):
        target = tiny_disk / name
        target.write_bytes(b"old")
        with pytest.raises(OSError) as caught:
            write(target)
        assert (caught.value.strerror, caught.value.filename) == ("No space left on device", str(target))
        assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["c.pt", "r.json", "s.safetensors"]


# -- compare: 0 epochs, sparsity 0 -------------------------------------------------------


def test_compare_with_zero_epochs_records_no_overhead_ratio(capsys, tmp_path):
    """Was: ZeroDivisionError in the search-overhead ratio."""
    out = tmp_path / "c"
    code, stdout, err = call(capsys, *COMPARE[:8], "0", "--no-progress", "--methods", "bingo,magnitude", "--out", out)
    assert code == 0, err
    [overhead] = json.loads((out / "results.json").read_text())["search_overhead"]
    assert overhead["ratio"] is None and overhead["train_seconds"] == 0.0
    assert "—" in (out / "summary.md").read_text().split("### Search overhead")[1]


def test_compare_imp_at_sparsity_zero_completes_and_resumes(capsys, tmp_path):
    """Was: the overlap at sparsity 0 was NaN, the JSON writer refused it, on every --resume too."""
    out = tmp_path / "c"
    argv = [*COMPARE[:6], "0,0.2", *COMPARE[7:], "--methods", "imp,magnitude", "--out", out]
    code, _, err = call(capsys, *argv)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["method"], r["sparsity"]) for r in results["runs"]) == [("imp", 0.0), ("imp", 0.2), ("magnitude", 0.0), ("magnitude", 0.2)]
    assert [(row["sparsity"], "magnitude_vs_imp" in row) for row in results["overlap"]] == [(0.2, True)]  # none at 0: nothing pruned
    before = (out / "results.json").read_bytes()
    code, _, err = call(capsys, *argv, "--resume")
    assert code == 0, err
    assert (out / "results.json").read_bytes() == before


# -- values out of range, damaged files: one line, naming what is wrong -----------------

SEED_RANGE_TEXT = r"\[-9223372036854775808, 18446744073709551615\]"


@pytest.mark.parametrize("command", ["run", "demo"])
@pytest.mark.parametrize("seed", ["1180591620717411303424", "18446744073709551616", "-9223372036854775809"])
def test_a_seed_beyond_64_bits_is_a_range_error(capsys, tmp_path, command, seed):
    """Was: OverflowError (run, demo)."""
    argv = [*RUN, "--out", tmp_path / "r.json"] if command == "run" else ["demo", "--epochs", "1", "--no-progress"]
    code, _, err = call(capsys, *argv, "--seed", seed)
    assert_user_error(code, err, f"argument --seed: must be a whole number in {SEED_RANGE_TEXT}, got '{seed}'")


def test_the_largest_seed_runs(capsys, tmp_path):
    code, _, err = call(capsys, *RUN, "--out", tmp_path / "r.json", "--seed", str(2**64 - 1))
    assert code == 0, err


def test_the_library_refuses_a_seed_beyond_64_bits():
    from bingo.bench.training import TrainConfig
    from bingo.errors import ConfigError

    with pytest.raises(ConfigError, match=f"seed must be a whole number in {SEED_RANGE_TEXT}, got {2**70}"):
        TrainConfig(seed=2**70)
    with pytest.raises(ConfigError, match="seed must be a whole number"):
        TrainConfig(seed=1.5)
    assert TrainConfig(seed=np.int64(3)).seed == 3


@pytest.mark.parametrize("seeds", ["1000000000000", "10001", "0"])
def test_compare_seeds_out_of_range_is_a_range_error(capsys, tmp_path, seeds):
    """Was: MemoryError for --seeds 1000000000000."""
    code, _, err = call(capsys, *COMPARE, "--methods", "random", "--seeds", seeds, "--out", tmp_path / "c")
    assert_user_error(code, err, f"argument --seeds: must be a whole number in \\[1, 10000\\], got '{seeds}'")
    assert not (tmp_path / "c").exists()


def saved_model(capsys, tmp_path) -> Path:
    saved = tmp_path / "m.pt"
    code, _, err = call(capsys, *RUN, "--out", tmp_path / "r.json", "--save", saved)
    assert code == 0, err
    return saved


@pytest.mark.parametrize("key,value,message", [
    ("input_shape", ["a", "b"], r"input_shape must be a list of whole numbers >= 1, got \['a', 'b'\]"),
    ("input_shape", [], r"input_shape must be a list"),
    ("input_shape", [64.5], r"input_shape must be a list"),
    ("raw_shape", [0, 64], r"raw_shape must be a list"),
    ("input_shape", "64", r"input_shape must be a list"),
    ("num_classes", "ten", r"num_classes must be a whole number >= 1, got 'ten'"),
    ("num_classes", True, r"num_classes must be a whole number >= 1, got True"),
    ("preprocess", {"offset": "x", "scale": 1.0}, r"preprocess offset and scale must be finite numbers"),
    ("preprocess", {"offset": 0.0, "scale": 0.0}, r"preprocess offset and scale must be finite numbers, scale not 0"),
    ("state_dict", [1, 2], r"state_dict must be a dict of tensors, got list"),
])
def test_export_of_a_checksummed_model_file_with_bad_fields_is_one_line(capsys, tmp_path, key, value, message):
    """Was: ValueError in 'bingo export' for input_shape ["a", "b"] (the checksum was right: written that way)."""
    from bingo.io import load_checkpoint, save_checkpoint

    saved = saved_model(capsys, tmp_path)
    content = load_checkpoint(saved)
    content[key] = value
    save_checkpoint(content, saved)
    code, _, err = call(capsys, "export", saved, tmp_path / "exp")
    assert_user_error(code, err, f"{saved}: {message}")
    assert not (tmp_path / "exp" / "model.json").exists()


@pytest.mark.parametrize("cut", ["half", "last-bytes"])
def test_export_of_a_truncated_save_file_says_it_is_truncated(capsys, tmp_path, cut):
    """Was: 'cannot read checkpoint m.pt: Invalid argument'."""
    saved = saved_model(capsys, tmp_path)
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2] if cut == "half" else data[:-10])
    code, _, err = call(capsys, "export", saved, tmp_path / "exp")
    assert_user_error(code, err, f"^bingo: error: {saved} is not a bingo checkpoint \\(corrupt or from another program\\): "
                      "it is incomplete \\(truncated\\) or damaged$")


def test_a_npy_member_with_a_huge_header_is_not_called_an_object_array(capsys, tmp_path):
    """Was: 'x_train is an array of Python objects' for a float32 member whose header is 200 KB."""
    import io
    import struct
    import zipfile

    header = repr({"descr": "<f4", "fortran_order": False, "shape": (40, 8)}) + " " * 200_000 + "\n"
    x_train = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    member = b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header.encode("latin1") + x_train.tobytes()
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x_train.npy", member)
        for key, value in {"y_train": np.arange(40) % 3, "x_test": x_train[:12], "y_test": np.arange(12) % 3}.items():
            buffer = io.BytesIO()
            np.save(buffer, value)
            archive.writestr(f"{key}.npy", buffer.getvalue())
    code, _, err = call(capsys, *RUN[:2], path, *RUN[3:], "--out", tmp_path / "r.json")
    line = assert_user_error(code, err, "x_train has a .npy header over NumPy's safety limit \\(max_header_size\\)")
    assert "Python objects" not in line
    np.savez(path, x_train=np.array([[1], "a"], dtype=object), y_train=np.arange(2), x_test=x_train[:2], y_test=np.arange(2))
    code, _, err = call(capsys, *RUN[:2], path, *RUN[3:], "--out", tmp_path / "r.json")
    assert_user_error(code, err, "x_train is an array of Python objects, which would need unpickling")


# -- bingo run's JSON: the time of the prune ---------------------------------------------


@pytest.mark.parametrize("method,timed", [("bingo", True), ("magnitude", True), ("gmp", False)])
def test_run_json_gives_the_prune_seconds_of_each_result(capsys, tmp_path, method, timed):
    """The issue-2 contract: the prune's time (with its compensation) per result, beside train_seconds and search_seconds."""
    out = tmp_path / "r.json"
    code, _, err = call(capsys, "run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.5,0.8",
                        "--method", method, "--out", out, "--no-progress")
    assert code == 0, err
    report = json.loads(out.read_text())
    assert "train_seconds" in report and "search_seconds" in report
    for row in report["results"]:
        if timed:
            assert isinstance(row["prune_seconds"], float) and 0.0 < row["prune_seconds"] < report["train_seconds"] + 60
        else:
            assert row["prune_seconds"] is None  # GMP prunes during training: no prune of its own


def test_piped_progress_is_a_plain_line_per_epoch_not_tqdm_frames(tmp_path):
    # stderr is a pipe here: no \r-frames or lines of spaces; a failed run's error stays easy to find.
    import subprocess
    import sys

    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "bingo", "run", "--data", "digits", "--model", "mlp", "--epochs", "2",
                           "--sparsity", "0.5", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if ": epoch " in line]
    assert [line.split(": epoch ")[1].split(",")[0] for line in lines] == ["1/2", "2/2"], done.stderr


def test_a_run_of_very_few_training_steps_says_so(tmp_path, capsys):
    from bingo.bench.cli import main

    out = tmp_path / "r.json"
    assert main(["run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "256", "--sparsity", "0.5",
                 "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "bingo: warning: only 6 training steps in all (1 epochs of 6 batches of 256 from 1293 examples)" in err
    assert main(["run", "--data", "digits", "--model", "mlp", "--epochs", "10", "--sparsity", "0.5",
                 "--out", str(out), "--no-progress"]) == 0
    assert "training steps in all" not in capsys.readouterr().err  # 110 steps: not a handful


def test_a_killed_writers_leftover_is_removed_by_the_next_write_and_a_live_one_is_kept(tmp_path):
    import os
    import subprocess
    import sys

    from bingo.io import atomic_write

    target = tmp_path / "r.json"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    dead = tmp_path / f".r.json.{gone}.abc123.tmp"  # what a SIGKILLed writer leaves
    live = tmp_path / f".r.json.{os.getpid()}.def456.tmp"  # a write in progress (this process is alive)
    other = tmp_path / ".r.json.notes.tmp"  # not bingo's pattern
    for leftover in (dead, live, other):
        leftover.write_text("partial")
    atomic_write(target, lambda tmp: Path(tmp).write_text("{}"))
    assert target.read_text() == "{}"
    assert not dead.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(delay=st.sampled_from([0.0, 0.3, 1.5]), resume=st.booleans())
def test_concurrent_compares_into_one_folder_never_lose_a_row(tmp_path_factory, delay, resume):
    # Generated interleavings of two real processes: whoever is refused says so in one line, and results.json
    # always holds exactly the rows of the runs that exited 0, with their masks.
    import time

    out = tmp_path_factory.mktemp("concurrent") / "c"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    runs = []
    for method in ("magnitude", "random"):
        argv = [sys.executable, "-m", "bingo", *COMPARE, "--methods", method, "--out", str(out)] + (["--resume"] if resume else [])
        runs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        time.sleep(delay)
    try:
        finished = [(run.wait(timeout=180), run.stderr.read()) for run in runs]
    finally:
        for run in runs:
            run.kill()
    won = [method for method, (code, _) in zip(("magnitude", "random"), finished) if code == 0]
    for code, err in finished:
        if code != 0:
            assert_user_error(code, err, f"{out} (is in use by (bingo compare pid \\d+|another bingo compare)|holds the results of an earlier comparison)")
    assert won, finished
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["method"] for r in results["runs"]) == sorted(won)
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(f"{m}-seed0-sparsity0.5.safetensors" for m in won)

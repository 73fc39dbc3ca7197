"""Tests for bingo.bench.data: IDX files, digits, .npz, Fashion-MNIST and MNIST download.

No test touches the network: MNIST downloads come from ``file://`` URLs of
temporary folders holding generated IDX files.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bingo.bench import data
from bingo.bench.data import (
    DATASETS,
    FASHION_MNIST_DIR,
    IDX_FILES,
    Dataset,
    download_mnist,
    load_dataset,
    read_idx,
    write_idx,
)
from bingo.errors import ConfigError, DataError

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def make_idx_dir(
    directory: Path,
    *,
    n_train: int = 50,
    n_test: int = 20,
    side: int = 28,
    gz: bool | tuple[bool, bool, bool, bool] = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write the four (Fashion-)MNIST IDX files with random content into ``directory``."""
    rng = np.random.default_rng(seed)
    arrays = {
        IDX_FILES[0]: rng.integers(0, 256, size=(n_train, side, side), dtype=np.uint8),
        IDX_FILES[1]: (np.arange(n_train) % 10).astype(np.uint8),
        IDX_FILES[2]: rng.integers(0, 256, size=(n_test, side, side), dtype=np.uint8),
        IDX_FILES[3]: (np.arange(n_test) % 10).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    flags = (gz,) * 4 if isinstance(gz, bool) else gz
    for (name, array), packed in zip(arrays.items(), flags):
        write_idx(directory / (name + ".gz" if packed else name), array)
    return arrays


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_mnist_mirror(directory: Path) -> tuple[str, dict[str, str], dict[str, np.ndarray]]:
    """A folder of gzipped IDX files, its file:// URL and their md5s."""
    arrays = make_idx_dir(directory, n_train=30, n_test=10, gz=True, seed=1)
    md5s = {name + ".gz": md5_of(directory / (name + ".gz")) for name in IDX_FILES}
    return directory.as_uri() + "/", md5s, arrays


def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def npz_arrays(x_shape=(40, 6, 5), n_test=12, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = x_shape[0]
    return {
        "x_train": rng.normal(3.0, 2.0, size=x_shape).astype(np.float32),
        "y_train": np.arange(n) % 4,
        "x_test": rng.normal(3.0, 2.0, size=(n_test, *x_shape[1:])).astype(np.float32),
        "y_test": np.arange(n_test) % 3,
    }


# --------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([0, 9, 255, 7], dtype=np.uint8),
        np.array([[-5, 70000], [3, -2]], dtype=np.int32),
        np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    ],
    ids=["uint8-3d", "uint8-1d", "int32", "float32"],
)
def test_idx_round_trip(tmp_path, suffix, array):
    path = tmp_path / ("file.idx" + suffix)
    write_idx(path, array)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    else:
        assert path.read_bytes()[:2] == b"\x00\x00"
    back = read_idx(path)
    assert back.dtype == array.dtype
    assert back.dtype.isnative
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable


def test_idx_header_layout(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    write_idx(path, np.array([1, 2, 3], dtype=np.uint8))
    assert path.read_bytes() == bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 1, 2, 3])


def test_idx_gzip_is_detected_from_content(tmp_path):
    path = tmp_path / "packed"
    path.write_bytes(gzip.compress(bytes([0, 0, 0x08, 1, 0, 0, 0, 2, 4, 5])))
    np.testing.assert_array_equal(read_idx(path), [4, 5])


def test_idx_gz_output_is_deterministic(tmp_path):
    a = np.arange(100, dtype=np.uint8)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "b.gz", a)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(DataError, match=r"cannot write dtype int64 as IDX; supported dtypes: uint8"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


def test_read_idx_missing_file(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(DataError, match=f"^no such file: {re.escape(str(path))}$"):
        read_idx(path)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(bytes([0x12, 0x34, 0x08, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(DataError, match=rf"^corrupt IDX file {re.escape(str(path))}: bad magic number 0x12340801"):
        read_idx(path)


def test_read_idx_unknown_type_code_is_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(DataError, match=r"bad magic number 0x00004201"):
        read_idx(path)


def test_read_idx_truncated_data(tmp_path):
    path = tmp_path / "images"
    write_idx(path, np.zeros((4, 3, 3), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(
        DataError,
        match=rf"^corrupt IDX file {re.escape(str(path))}: truncated, header dims \(4, 3, 3\) need 36 bytes of data but only 31 are present$",
    ):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0, 0, 4]))
    with pytest.raises(DataError, match=r"truncated header \(8 bytes, 3 dimensions need 16\)"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match=r"truncated header \(2 bytes\)"):
        read_idx(path)


def test_read_idx_extra_data_is_size_mismatch(tmp_path):
    path = tmp_path / "labels"
    write_idx(path, np.zeros(5, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00\x00")
    with pytest.raises(DataError, match=r"size mismatch, header dims \(5,\) need 5 bytes of data but 7 are present"):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path):
    path = tmp_path / "images.gz"
    write_idx(path, np.arange(1000, dtype=np.int32))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match=rf"^corrupt IDX file {re.escape(str(path))}: cannot decompress gzip data"):
        read_idx(path)


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


def test_digits_shapes_and_types(digits):
    assert digits.name == "digits"
    assert digits.input_shape == (1, 8, 8)
    assert digits.raw_shape == (64,)  # as load_digits(return_X_y=True) gives it
    assert digits.num_classes == 10
    # 1797 samples: 360 test (20%, stratified), 1437 train of which 144 (10%) validation
    assert len(digits.x_test) == len(digits.y_test) == 360
    assert len(digits.x_val) == len(digits.y_val) == 144
    assert len(digits.x_train) == len(digits.y_train) == 1293
    for x in (digits.x_train, digits.x_val, digits.x_test):
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
    for y in (digits.y_train, digits.y_val, digits.y_test):
        assert y.dtype == torch.int64 and y.ndim == 1
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert set(digits.y_test.tolist()) == set(range(10))
    assert isinstance(digits.offset, float) and isinstance(digits.scale, float)


def test_digits_preprocessing_normalises_train(digits):
    assert abs(float(digits.x_train.mean())) < 1e-5
    assert float(digits.x_train.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    # raw digits are 0..16: the recovered raw values are integers in that range
    raw = digits.x_test * digits.scale + digits.offset
    assert float(raw.min()) > -1e-3 and float(raw.max()) < 16 + 1e-3
    torch.testing.assert_close(raw, raw.round(), atol=1e-3, rtol=0)
    # preprocess() applies the same transform
    torch.testing.assert_close(digits.preprocess(raw.round()), digits.x_test, atol=1e-5, rtol=0)
    torch.testing.assert_close(digits.preprocess(np.zeros((2, 1, 8, 8))), torch.full((2, 1, 8, 8), -digits.offset / digits.scale))
    assert digits.preprocess(torch.zeros(3, dtype=torch.uint8)).dtype == torch.float32


def test_digits_split_is_deterministic(digits):
    again = load_dataset("digits", seed=0)
    torch.testing.assert_close(again.x_train, digits.x_train)
    torch.testing.assert_close(again.y_val, digits.y_val)
    other = load_dataset("digits", seed=1)
    # the test split does not depend on the seed, the validation split does
    torch.testing.assert_close(other.x_test * other.scale + other.offset, digits.x_test * digits.scale + digits.offset, atol=1e-4, rtol=0)
    torch.testing.assert_close(other.y_test, digits.y_test)
    assert len(other.y_val) == 144
    assert not torch.equal(
        other.x_val * other.scale + other.offset, digits.x_val * digits.scale + digits.offset
    )
    # train + val together are the same samples whatever the seed
    assert sorted((digits.y_train.tolist() + digits.y_val.tolist())) == sorted(
        other.y_train.tolist() + other.y_val.tolist()
    )


def test_digits_without_validation():
    d = load_dataset("digits", validation_fraction=0.0)
    assert len(d.x_train) == 1437
    assert d.x_val.shape == (0, 1, 8, 8) and d.x_val.dtype == torch.float32
    assert d.y_val.shape == (0,) and d.y_val.dtype == torch.int64


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan"), "x"])
def test_bad_validation_fraction(fraction):
    with pytest.raises(ConfigError, match=r"^validation_fraction must be in \[0, 1\), got "):
        load_dataset("digits", validation_fraction=fraction)


def test_dataset_repr_is_short(digits):
    text = repr(digits)
    assert text.startswith("Dataset(name='digits', input_shape=(1, 8, 8), num_classes=10, train=1293")
    assert "\n" not in text


# --------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------


def test_npz_images_nhw_get_a_channel(tmp_path):
    arrays = npz_arrays((40, 6, 5))
    path = save_npz(tmp_path / "d.npz", **arrays)
    d = load_dataset(str(path), validation_fraction=0.25, seed=3)
    assert d.name == str(path)
    assert d.input_shape == (1, 6, 5) and d.raw_shape == (6, 5)  # an export takes N x 6 x 5, as stored
    assert len(d.x_train) == 30 and len(d.x_val) == 10 and len(d.x_test) == 12
    assert d.num_classes == 4
    assert d.y_train.dtype == torch.int64
    assert d.offset == pytest.approx(float(arrays["x_train"].mean()), abs=0.3)
    assert abs(float(d.x_train.mean())) < 1e-5
    torch.testing.assert_close(d.x_test, d.preprocess(torch.from_numpy(arrays["x_test"][:, None])))


def test_npz_images_nchw_are_kept(tmp_path):
    path = save_npz(tmp_path / "d.npz", **npz_arrays((20, 3, 4, 4)))
    d = load_dataset(path, validation_fraction=0.0)
    assert d.input_shape == (3, 4, 4) and d.raw_shape == (3, 4, 4)
    assert d.x_train.shape == (20, 3, 4, 4) and d.x_val.shape == (0, 3, 4, 4)


def test_npz_flat_features_and_integral_float_labels(tmp_path):
    arrays = npz_arrays((30, 7))
    arrays["y_train"] = (np.arange(30) % 5).astype(np.float64)
    arrays["x_train"] = arrays["x_train"].astype(np.float64)
    arrays["x_test"] = (np.arange(12 * 7) % 256).astype(np.uint8).reshape(12, 7)
    path = save_npz(tmp_path / "flat.npz", **arrays)
    d = load_dataset(path, validation_fraction=0.1)
    assert d.input_shape == (7,) and d.raw_shape == (7,)
    assert d.x_test.dtype == torch.float32 and d.x_train.dtype == torch.float32
    assert d.y_train.dtype == torch.int64
    assert d.num_classes == 5
    assert len(d.y_train) + len(d.y_val) == 30 and len(d.y_val) == 3


def test_npz_missing_file(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(DataError, match=f"^no such file: {re.escape(str(path))}$"):
        load_dataset(str(path))


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("hello\n")
    not_npz = rf"^cannot read {re.escape(str(path))} as \.npz: not a NumPy \.npz archive \(a zip of \.npy arrays\)$"
    with pytest.raises(DataError, match=not_npz):
        load_dataset(str(path))
    path.write_bytes(b"")
    with pytest.raises(DataError, match=not_npz):
        load_dataset(str(path))
    path.write_bytes(b"PK\x03\x04 but no zip after it")
    with pytest.raises(DataError, match=rf"^cannot read {re.escape(str(path))} as \.npz: File is not a zip file$"):
        load_dataset(str(path))
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(DataError, match=r"as \.npz: it holds a single array"):
        load_dataset(str(single))


def test_npz_object_arrays_are_not_unpickled(tmp_path):
    arrays = npz_arrays()
    arrays["y_train"] = np.array([str(v) for v in arrays["y_train"]], dtype=object)
    path = save_npz(tmp_path / "objects.npz", **arrays)
    with pytest.raises(DataError, match=rf"^cannot read {re.escape(str(path))} as \.npz: y_train is an array of Python objects, "
                                         r"which would need unpickling; store numbers \(e\.g\. np\.asarray\(x, dtype=np\.float32\)\)$"):
        load_dataset(str(path))


def test_npz_missing_arrays(tmp_path):
    arrays = npz_arrays()
    del arrays["x_test"], arrays["y_test"]
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(
        DataError,
        match=rf"^{re.escape(str(path))} is missing array\(s\) x_test, y_test; an \.npz dataset needs x_train, y_train, x_test, y_test$",
    ):
        load_dataset(str(path))


def test_npz_length_mismatch(tmp_path):
    arrays = npz_arrays()
    arrays["y_test"] = arrays["y_test"][:-2]
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=r": x_test has 12 samples but y_test has 10 labels$"):
        load_dataset(str(path))


def test_npz_non_integer_labels(tmp_path):
    arrays = npz_arrays()
    arrays["y_train"] = np.linspace(0, 1, 40)
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=r": y_train must hold integer class labels, got non-integral values$"):
        load_dataset(str(path))
    arrays["y_train"] = np.array(["a"] * 40)
    path = save_npz(tmp_path / "s.npz", **arrays)
    with pytest.raises(DataError, match=r": y_train must hold integer class labels, got dtype <U1$"):
        load_dataset(str(path))


def test_npz_negative_labels(tmp_path):
    arrays = npz_arrays()
    arrays["y_test"] = arrays["y_test"] - 1
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=r": y_test has negative label -1; labels must be >= 0$"):
        load_dataset(str(path))


def test_npz_empty_train(tmp_path):
    arrays = npz_arrays()
    arrays["x_train"] = arrays["x_train"][:0]
    arrays["y_train"] = arrays["y_train"][:0]
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=r": the training set is empty \(x_train has 0 samples\)$"):
        load_dataset(str(path))


def test_npz_train_test_shape_mismatch(tmp_path):
    arrays = npz_arrays()
    arrays["x_test"] = arrays["x_test"][:, :, :4]
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=r"train and test samples differ in shape: \(1, 6, 5\) vs \(1, 6, 4\)$"):
        load_dataset(str(path))


def test_npz_bad_rank_and_nan(tmp_path):
    arrays = npz_arrays()
    arrays["x_train"] = arrays["x_train"].reshape(-1)
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=r"x_train must be N x F features, N x H x W or N x C x H x W images, got shape \(1200,\)$"):
        load_dataset(str(path))
    arrays = npz_arrays()
    arrays["x_test"][0, 0, 0] = np.nan
    path = save_npz(tmp_path / "n.npz", **arrays)
    with pytest.raises(DataError, match=r"x_test contains NaN or infinite values$"):
        load_dataset(str(path))


# --------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------


def test_fashion_mnist_from_generated_files(tmp_path):
    arrays = make_idx_dir(tmp_path, gz=(True, False, False, True))
    d = load_dataset("fashion-mnist", tmp_path, validation_fraction=0.2, seed=0)
    assert d.name == "fashion-mnist"
    assert d.input_shape == (1, 28, 28) and d.raw_shape == (28, 28)  # IDX stores N x 28 x 28
    assert d.x_train.shape == (40, 1, 28, 28) and d.x_val.shape == (10, 1, 28, 28)
    assert d.x_test.shape == (20, 1, 28, 28)
    assert d.num_classes == 10
    torch.testing.assert_close(d.y_test, torch.from_numpy(arrays[IDX_FILES[3]].astype(np.int64)))
    raw_test = torch.from_numpy(arrays[IDX_FILES[2]])[:, None]
    torch.testing.assert_close(d.x_test, d.preprocess(raw_test))
    # the offset/scale are the mean/std of the raw training split (val excluded)
    raw_train = d.x_train * d.scale + d.offset
    assert d.offset == pytest.approx(float(raw_train.mean()), rel=1e-4)
    assert abs(float(d.x_train.mean())) < 1e-5
    assert float(d.x_train.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)


def test_fashion_mnist_plain_files_take_precedence(tmp_path):
    make_idx_dir(tmp_path, gz=True, seed=0)
    arrays = make_idx_dir(tmp_path, gz=False, seed=5, n_train=12, n_test=4)
    d = load_dataset("fashion-mnist", tmp_path, validation_fraction=0.0)
    assert len(d.y_train) == 12 and len(d.y_test) == 4
    torch.testing.assert_close(d.y_train, torch.from_numpy(arrays[IDX_FILES[1]].astype(np.int64)))


def test_fashion_mnist_missing_files(tmp_path):
    make_idx_dir(tmp_path)
    (tmp_path / IDX_FILES[2]).unlink()
    (tmp_path / IDX_FILES[3]).unlink()
    expected = (
        f"Fashion-MNIST IDX files not found in {tmp_path} "
        "(missing: t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]); "
        "install them with 'apt-get install dataset-fashion-mnist' or pass --data-dir"
    )
    with pytest.raises(DataError, match=f"^{re.escape(expected)}$"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_mnist_default_dir_is_in_message(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "none"))
    with pytest.raises(DataError, match=rf"not found in {re.escape(str(tmp_path / 'none'))} \(missing: train-images"):
        load_dataset("fashion-mnist")


def test_fashion_mnist_corrupt_file_is_named(tmp_path):
    make_idx_dir(tmp_path)
    bad = tmp_path / IDX_FILES[1]
    bad.write_bytes(bad.read_bytes()[:-3])
    with pytest.raises(DataError, match=rf"^corrupt IDX file {re.escape(str(bad))}: truncated"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_mnist_count_mismatch(tmp_path):
    make_idx_dir(tmp_path, n_train=50)
    write_idx(tmp_path / IDX_FILES[1], np.zeros(49, dtype=np.uint8))
    with pytest.raises(DataError, match=r"do not match: 50 images but 49 labels$"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_mnist_wrong_rank(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / IDX_FILES[2], np.zeros((20, 784), dtype=np.uint8))
    with pytest.raises(DataError, match=r"expected 3-D images \(N, H, W\), got shape \(20, 784\)$"):
        load_dataset("fashion-mnist", tmp_path)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason=f"{FASHION_MNIST_DIR} is not installed")
def test_real_fashion_mnist():
    d = load_dataset("fashion-mnist", validation_fraction=0.1, seed=0)
    assert d.x_train.shape == (54000, 1, 28, 28)
    assert d.x_val.shape == (6000, 1, 28, 28)
    assert d.x_test.shape == (10000, 1, 28, 28)
    assert d.y_train.shape == (54000,) and d.y_val.shape == (6000,) and d.y_test.shape == (10000,)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.num_classes == 10
    assert 0 < d.offset < 255 and 0 < d.scale < 255
    assert abs(float(d.x_train.mean())) < 1e-4


# --------------------------------------------------------------------------
# MNIST download
# --------------------------------------------------------------------------


def test_mnist_download_and_load(tmp_path, monkeypatch):
    url, md5s, arrays = make_mnist_mirror(tmp_path / "mirror")
    monkeypatch.setattr(data, "MNIST_FILES", md5s)
    target = tmp_path / "cache" / "mnist"

    # load_dataset downloads from the default URL, so point download_mnist at the mirror
    real_download = data.download_mnist
    calls = []

    def fake_download(directory, **kwargs):
        calls.append(Path(directory))
        return real_download(directory, base_url=url)

    monkeypatch.setattr(data, "download_mnist", fake_download)
    d = load_dataset("mnist", target, validation_fraction=0.1)
    assert calls == [target]
    assert sorted(p.name for p in target.iterdir()) == sorted(md5s)
    assert d.name == "mnist"
    assert d.x_train.shape == (27, 1, 28, 28) and d.x_val.shape == (3, 1, 28, 28)
    assert d.x_test.shape == (10, 1, 28, 28)
    torch.testing.assert_close(d.y_test, torch.from_numpy(arrays[IDX_FILES[3]].astype(np.int64)))

    # the files are now present: no second download
    load_dataset("mnist", target)
    assert len(calls) == 1


def test_download_mnist_places_verified_files(tmp_path, monkeypatch):
    url, md5s, _ = make_mnist_mirror(tmp_path / "mirror")
    monkeypatch.setattr(data, "MNIST_FILES", md5s)
    out = download_mnist(tmp_path / "a" / "b", base_url=url.rstrip("/"))
    assert out == tmp_path / "a" / "b"
    assert sorted(p.name for p in out.iterdir()) == sorted(md5s)  # no temp files left
    for name, md5 in md5s.items():
        assert md5_of(out / name) == md5
    # already present and valid: nothing is fetched again, even from a dead mirror
    assert download_mnist(out, base_url=(tmp_path / "empty").as_uri()) == out


def test_mnist_default_dir_from_env(tmp_path, monkeypatch):
    url, md5s, _ = make_mnist_mirror(tmp_path / "mirror")
    monkeypatch.setattr(data, "MNIST_FILES", md5s)
    monkeypatch.setenv("BINGO_DATA_DIR", str(tmp_path / "root"))
    assert data.default_mnist_dir() == tmp_path / "root" / "mnist"
    assert download_mnist(base_url=url) == tmp_path / "root" / "mnist"
    d = load_dataset("mnist", download=False, validation_fraction=0.0)
    assert len(d.y_train) == 30 and len(d.y_test) == 10
    monkeypatch.delenv("BINGO_DATA_DIR")
    assert data.default_mnist_dir() == Path.home() / ".cache" / "bingo" / "mnist"


def test_mnist_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    url, md5s, _ = make_mnist_mirror(tmp_path / "mirror")
    bad = dict(md5s)
    bad["t10k-images-idx3-ubyte.gz"] = "0" * 32
    monkeypatch.setattr(data, "MNIST_FILES", bad)
    target = tmp_path / "cache"
    with pytest.raises(
        DataError,
        match=rf"^checksum mismatch for t10k-images-idx3-ubyte\.gz downloaded from {re.escape(url)}t10k-images-idx3-ubyte\.gz: "
        rf"expected md5 0{{32}}, got {md5s['t10k-images-idx3-ubyte.gz']}; the download was discarded$",
    ):
        download_mnist(target, base_url=url)
    names = sorted(p.name for p in target.iterdir())
    assert "t10k-images-idx3-ubyte.gz" not in names
    assert not [n for n in names if n.endswith(".part")]
    assert set(names) <= set(md5s)


def test_mnist_download_failure(tmp_path, monkeypatch):
    _, md5s, _ = make_mnist_mirror(tmp_path / "mirror")
    monkeypatch.setattr(data, "MNIST_FILES", md5s)
    empty = tmp_path / "empty"
    empty.mkdir()
    target = tmp_path / "cache"
    url = empty.as_uri() + "/"
    with pytest.raises(
        DataError,
        match=rf"^could not download MNIST from {re.escape(url)}train-images-idx3-ubyte\.gz \(.+\); "
        rf"put the four IDX files in {re.escape(str(target))} or pass --data-dir$",
    ):
        download_mnist(target, base_url=url)
    assert list(target.iterdir()) == []


def test_mnist_missing_without_download(tmp_path):
    with pytest.raises(DataError, match=rf"^MNIST IDX files not found in {re.escape(str(tmp_path))} \(missing: train-images-idx3-ubyte\[\.gz\]"):
        load_dataset("mnist", tmp_path, download=False)


# --------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------


def test_unknown_dataset_lists_choices():
    assert DATASETS == ("digits", "fashion-mnist", "mnist", "teacher-student", "tokens", "signals")
    with pytest.raises(
        ConfigError,
        match=r"^unknown dataset 'foo'; valid choices: digits, fashion-mnist, mnist, teacher-student, tokens, signals, or a PATH\.npz$",
    ) as info:
        load_dataset("foo")
    assert isinstance(info.value, ValueError)


def test_all_is_declared():
    for name in data.__all__:
        assert hasattr(data, name)
    assert {"Dataset", "load_dataset", "read_idx", "write_idx", "download_mnist", "DATASETS"} <= set(data.__all__)


# --------------------------------------------------------------------------
# hostile .npz and IDX contents (issue 9: items 4, 6 and 8)
# --------------------------------------------------------------------------

#: The documented bound on labels (``bingo.bench.data.MAX_CLASSES``), spelled out so a change to it is a decision.
MAX_CLASSES = 100_000


def test_class_limit_is_documented():
    assert data.MAX_CLASSES == MAX_CLASSES
    assert "MAX_CLASSES" in data.__all__


@pytest.mark.parametrize("split", ["train", "test"])
def test_npz_empty_split_is_refused_when_loaded(tmp_path, split):
    # an empty test set used to load, and `bingo run` wrote bare NaN accuracies into its JSON
    arrays = npz_arrays()
    arrays[f"x_{split}"] = arrays[f"x_{split}"][:0]
    arrays[f"y_{split}"] = arrays[f"y_{split}"][:0]
    path = save_npz(tmp_path / "d.npz", **arrays)
    name = "training" if split == "train" else "test"
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: the {name} set is empty \(x_{split} has 0 samples\)$"):
        load_dataset(str(path))


def test_idx_empty_test_set_is_refused(tmp_path):
    make_idx_dir(tmp_path, n_test=0)
    with pytest.raises(DataError, match=rf"^IDX file {re.escape(str(tmp_path / IDX_FILES[2]))} holds no test images$"):
        load_dataset("fashion-mnist", tmp_path)


@pytest.mark.parametrize("shape", [(40, 0), (40, 0, 5), (40, 3, 0, 2)])
def test_npz_empty_samples_are_refused(tmp_path, shape):
    arrays = npz_arrays()
    arrays["x_train"] = np.zeros(shape, dtype=np.float32)
    arrays["x_test"] = np.zeros((12, *shape[1:]), dtype=np.float32)
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=r": x_train samples hold no values \(each has shape \(.*\)\)$"):
        load_dataset(str(path))


@pytest.mark.parametrize(
    "labels,shown",
    [
        (np.array([10**9]), "1000000000"),  # used to ask the mlp's output layer for 128 GB
        (np.array([MAX_CLASSES]), str(MAX_CLASSES)),
        (np.array([2**64 - 1], dtype=np.uint64), "18446744073709551615"),  # used to wrap to -1 past the sign check
        (np.array([1e30]), "1e+30"),  # a whole number as float: used to cast to garbage
    ],
    ids=["1e9", "max-classes", "uint64-max", "float-1e30"],
)
def test_npz_labels_beyond_the_class_limit(tmp_path, labels, shown):
    arrays = npz_arrays()
    arrays["y_train"] = np.concatenate([np.zeros(39, dtype=labels.dtype), labels])
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(
        DataError,
        match=rf"^{re.escape(str(path))}: y_train has label {re.escape(shown)}; labels must be class indices "
        rf"0\.\.{MAX_CLASSES - 1} \(at most MAX_CLASSES = {MAX_CLASSES} classes\)$",
    ):
        load_dataset(str(path))


def test_npz_largest_allowed_label_loads(tmp_path):
    arrays = npz_arrays()
    arrays["y_test"] = np.full(12, MAX_CLASSES - 1, dtype=np.uint64)
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.warns(UserWarning):
        d = load_dataset(str(path))
    assert d.num_classes == MAX_CLASSES
    assert d.y_test.dtype == torch.int64 and int(d.y_test.max()) == MAX_CLASSES - 1


def test_npz_nan_labels(tmp_path):
    arrays = npz_arrays()
    arrays["y_test"] = np.where(np.arange(12) == 3, np.nan, 1.0)
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=r": y_test holds NaN or infinite labels$"):
        load_dataset(str(path))


def test_npz_bool_and_unsigned_labels_load(tmp_path):
    arrays = npz_arrays()
    arrays["y_train"] = np.arange(40) % 2 == 0
    arrays["y_test"] = (np.arange(12) % 2).astype(np.uint64)
    d = load_dataset(str(save_npz(tmp_path / "d.npz", **arrays)))
    assert d.num_classes == 2
    assert d.y_train.dtype == d.y_test.dtype == torch.int64
    assert sorted(set(d.y_test.tolist())) == [0, 1]


def test_idx_labels_beyond_the_class_limit(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / IDX_FILES[3], np.full(20, 10**9, dtype=np.int32))
    with pytest.raises(
        DataError,
        match=rf"^IDX file {re.escape(str(tmp_path / IDX_FILES[3]))} has label 1000000000; labels must be class indices "
        rf"0\.\.{MAX_CLASSES - 1} \(at most MAX_CLASSES = {MAX_CLASSES} classes\)$",
    ):
        load_dataset("fashion-mnist", tmp_path)


def test_idx_non_finite_images(tmp_path):
    make_idx_dir(tmp_path)
    images = np.zeros((20, 28, 28), dtype=np.float32)
    images[3, 4, 5] = np.inf
    write_idx(tmp_path / IDX_FILES[2], images)
    with pytest.raises(DataError, match=rf"^IDX file {re.escape(str(tmp_path / IDX_FILES[2]))} contains NaN or infinite values$"):
        load_dataset("fashion-mnist", tmp_path)


def test_idx_empty_images_are_refused(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / IDX_FILES[0], np.zeros((50, 28, 0), dtype=np.uint8))
    write_idx(tmp_path / IDX_FILES[2], np.zeros((20, 28, 0), dtype=np.uint8))
    with pytest.raises(DataError, match=rf"^corrupt IDX file {re.escape(str(tmp_path / IDX_FILES[0]))}: images hold no values \(each is 28x0\)$"):
        load_dataset("fashion-mnist", tmp_path)


def write_raw_member_npz(path: Path, arrays: dict[str, np.ndarray], raw: dict[str, bytes]) -> Path:
    """An .npz whose members in ``raw`` hold those bytes instead of a .npy array."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for key, array in arrays.items():
            if key in raw:
                archive.writestr(key + ".npy", raw[key])
            else:
                buffer = io.BytesIO()
                np.save(buffer, array)
                archive.writestr(key + ".npy", buffer.getvalue())
    return path


def test_npz_raw_pickle_member_is_named(tmp_path):
    # np.load hands back such a member as bytes: it used to fail with AttributeError
    import pickle

    arrays = npz_arrays()
    path = write_raw_member_npz(tmp_path / "d.npz", arrays, {"y_train": pickle.dumps(arrays["y_train"])})
    with pytest.raises(
        DataError,
        match=rf"^cannot read {re.escape(str(path))} as \.npz: y_train is not a \.npy array \(a raw pickle or other data\); "
        r"save the arrays with np\.savez$",
    ):
        load_dataset(str(path))


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("key", ["x_train", "x_test"])
def test_npz_non_finite_inputs(tmp_path, key, value):
    arrays = npz_arrays()
    arrays[key] = arrays[key].astype(np.float64)
    arrays[key][1, 2, 3] = value
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: {key} contains NaN or infinite values$"):
        load_dataset(str(path))


def test_npz_inputs_beyond_float32(tmp_path):
    # finite as float64, infinite once converted to the float32 the models use
    arrays = npz_arrays()
    arrays["x_test"] = arrays["x_test"].astype(np.float64)
    arrays["x_test"][0, 0, 0] = -1e300
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: x_test has values beyond float32's range \(largest magnitude 1e\+300\)$"):
        load_dataset(str(path))


def test_npz_inputs_too_large_to_standardise(tmp_path):
    # every value fits float32, but value minus mean does not
    arrays = npz_arrays()
    arrays["x_train"] = np.full((40, 6, 5), 3e38, dtype=np.float32)
    arrays["x_train"][::4] = -3e38
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: the inputs cannot be standardised in float32 .*; rescale them$"):
        load_dataset(str(path))


def test_npz_big_endian_and_long_double_arrays_load(tmp_path):
    arrays = npz_arrays()
    expected = load_dataset(str(save_npz(tmp_path / "native.npz", **arrays)), seed=2)
    arrays["x_train"] = arrays["x_train"].astype(">f4")
    arrays["y_train"] = arrays["y_train"].astype(">i8")
    arrays["x_test"] = arrays["x_test"].astype(np.longdouble)
    arrays["y_test"] = arrays["y_test"].astype(">u2")
    d = load_dataset(str(save_npz(tmp_path / "foreign.npz", **arrays)), seed=2)
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        torch.testing.assert_close(getattr(d, name), getattr(expected, name))
    assert d.num_classes == expected.num_classes


def test_num_classes_covers_test_only_classes_with_a_warning(tmp_path):
    arrays = npz_arrays()  # train labels 0..3
    arrays["y_test"] = np.array([0, 1, 2, 3, 7, 7, 5, 0, 1, 2, 3, 0])
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.warns(UserWarning) as record:
        d = load_dataset(str(path), validation_fraction=0.0)
    assert d.num_classes == 8
    messages = [str(w.message) for w in record]
    assert messages == [
        (
            f"{path}: no training examples for class(es) 5 (in test), 7 (in test); "
            "num_classes = 8 counts them, but the model cannot learn them"
        )
    ]
    assert "\n" not in messages[0]


def test_classes_only_in_the_validation_split_are_named(tmp_path):
    arrays = npz_arrays()
    arrays["y_train"] = np.zeros(40, dtype=np.int64)
    arrays["y_train"][5] = 9  # a single example of class 9: wherever it lands, the other split lacks it
    arrays["y_test"] = np.full(12, 9)
    path = save_npz(tmp_path / "d.npz", **arrays)
    for seed in range(6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = load_dataset(str(path), validation_fraction=0.25, seed=seed)
        if 9 not in d.y_train.tolist():
            break
    else:
        pytest.fail("no seed put class 9 in the validation split")
    with pytest.warns(UserWarning, match=r": no training examples for class\(es\) 9 \(in validation, test\); num_classes = 10 counts them"):
        load_dataset(str(path), validation_fraction=0.25, seed=seed)


def test_no_warning_when_every_class_is_trained(tmp_path, recwarn):
    load_dataset(str(save_npz(tmp_path / "d.npz", **npz_arrays())))
    load_dataset("digits")
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_many_untrained_classes_stay_one_line(tmp_path):
    arrays = npz_arrays()
    arrays["y_test"] = np.arange(100, 112)
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.warns(UserWarning, match=r"class\(es\) 100 \(in test\), .*, 109 \(in test\) and 2 more; num_classes = 112 counts them") as record:
        load_dataset(str(path))
    assert "\n" not in str(record[0].message)


def test_training_subset_draws_a_seeded_subset_of_the_training_split_only():
    from bingo.bench.data import training_subset

    data = load_dataset("digits")
    subset = training_subset(data, 100)
    assert subset.x_train.shape == (100, *data.x_train.shape[1:])
    # every chosen example is one of the training split's, paired with its own label, in the original order
    rows = {tuple(x.flatten().tolist()): int(y) for x, y in zip(data.x_train, data.y_train)}
    assert all(rows[tuple(x.flatten().tolist())] == int(y) for x, y in zip(subset.x_train, subset.y_train))
    assert torch.equal(training_subset(data, 100).x_train, subset.x_train)  # same seed, same subset
    assert not torch.equal(training_subset(data, 100, seed=1).x_train, subset.x_train)
    assert torch.equal(subset.x_test, data.x_test) and torch.equal(subset.x_val, data.x_val)
    assert training_subset(data, len(data.y_train)) is data
    for bad in (0, len(data.y_train) + 1, 2.5):
        with pytest.raises(ConfigError, match=rf"^training samples must be a whole number in \[1, {len(data.y_train)}\]"):
            training_subset(data, bad)

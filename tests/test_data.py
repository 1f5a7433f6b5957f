"""The data layer: exact round trips through every official format, and every bad input.

Synthetic datasets are tiny (the specs are shrunk with monkeypatch), so the whole file runs
in seconds; the real-data tests at the end need `JAXBENCH_DATA_DIR` (see conftest.py).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jaxbench import data
from jaxbench.configs import Config
from jaxbench.data import DataError, Dataset, load_dataset

N_TRAIN, N_TEST = 50, 10  # CIFAR-10: 10 records per training batch file
N100_TRAIN, N100_TEST = 40, 20
NAMES10 = [f"class{i}" for i in range(10)]
NAMES100 = [f"fine{i:02d}" for i in range(100)]


# --- building synthetic files in the official formats ------------------------------------------


@dataclasses.dataclass
class Synth:
    """A small dataset and the expected arrays after loading."""

    spec: data.Spec
    classes: list[str]
    x: np.ndarray
    y: np.ndarray
    tx: np.ndarray
    ty: np.ndarray
    cy: np.ndarray | None = None  # coarse labels (CIFAR-100)
    cty: np.ndarray | None = None


def make_synth(spec: data.Spec, seed: int = 0) -> Synth:
    rng = np.random.default_rng(seed)
    n_cls = spec.n_classes

    def imgs(n: int) -> np.ndarray:
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)

    def labels(n: int, k: int) -> np.ndarray:
        return rng.integers(0, k, n).astype(np.int32)

    s = Synth(
        spec,
        NAMES10 if n_cls == 10 else NAMES100,
        imgs(spec.n_train),
        labels(spec.n_train, n_cls),
        imgs(spec.n_test),
        labels(spec.n_test, n_cls),
    )
    if spec.n_coarse:
        s.cy, s.cty = labels(spec.n_train, spec.n_coarse), labels(spec.n_test, spec.n_coarse)
    s.y[0] = s.ty[0] = n_cls - 1  # the top label must be accepted
    return s


def _rows(x: np.ndarray) -> np.ndarray:
    """NHWC images as the official 3072-byte rows (R plane, G plane, B plane)."""
    return x.transpose(0, 3, 1, 2).reshape(len(x), -1)


def _split_files(s: Synth, names: tuple[str, ...], test: str) -> list[tuple[str, slice | None]]:
    per = s.spec.n_train // len(names)
    return [(n, slice(i * per, (i + 1) * per)) for i, n in enumerate(names)] + [(test, None)]


def write_binary(root: Path, s: Synth) -> Path:
    spec = s.spec
    folder = root / spec.bin_dir
    folder.mkdir(parents=True)
    for name, sl in _split_files(s, spec.bin_train, spec.bin_test):
        x, y, c = (
            (s.x[sl], s.y[sl], s.cy[sl] if s.cy is not None else None)
            if sl
            else (
                s.tx,
                s.ty,
                s.cty,
            )
        )
        cols = [y[:, None].astype(np.uint8), _rows(x)]
        if spec.n_coarse:
            cols.insert(0, c[:, None].astype(np.uint8))
        (folder / name).write_bytes(np.concatenate(cols, axis=1).tobytes())
    (folder / spec.bin_meta).write_text("\n".join(s.classes) + "\n\n")
    return folder


def py2_pickle(obj: Any) -> bytes:
    """A protocol-2 pickle as Python 2 wrote the official CIFAR python batches.

    Strings are Python 2 `str` (loaded as bytes), numpy arrays go through
    `numpy.core.multiarray._reconstruct` - the exact globals of the official files.
    """
    out = io.BytesIO()

    def s(b: bytes) -> None:
        out.write(
            b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b
        )

    def i(v: int) -> None:
        out.write(b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v))

    def w(o: Any) -> None:
        if isinstance(o, dict):
            out.write(b"}(")
            for k, v in o.items():
                w(k)
                w(v)
            out.write(b"u")
        elif isinstance(o, list):
            out.write(b"](")
            for v in o:
                w(v)
            out.write(b"e")
        elif isinstance(o, bytes):
            s(o)
        elif isinstance(o, (int, np.integer)):
            i(int(o))
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8 and o.ndim == 2
            out.write(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            i(0)
            out.write(b"\x85")
            s(b"b")
            out.write(b"\x87R(")
            i(1)
            i(o.shape[0])
            i(o.shape[1])
            out.write(b"\x86cnumpy\ndtype\n")
            s(b"u1")
            i(0)
            i(1)
            out.write(b"\x87R(")
            i(3)
            s(b"|")
            out.write(b"NNN")
            i(-1)
            i(-1)
            i(0)
            out.write(b"tb\x89")
            s(o.tobytes())
            out.write(b"tb")
        else:
            raise TypeError(type(o))

    out.write(b"\x80\x02")
    w(obj)
    out.write(b".")
    return out.getvalue()


def write_python(root: Path, s: Synth, dump=py2_pickle) -> Path:
    spec = s.spec
    folder = root / spec.py_dir
    folder.mkdir(parents=True)
    for name, sl in _split_files(s, spec.py_train, spec.py_test):
        x, y = (s.x[sl], s.y[sl]) if sl else (s.tx, s.ty)
        batch = {b"batch_label": b"synthetic", b"data": _rows(x)}
        batch[spec.py_labels.encode()] = [int(v) for v in y]
        if spec.n_coarse:
            c = s.cy[sl] if sl else s.cty
            batch[b"coarse_labels"] = [int(v) for v in c]
        (folder / name).write_bytes(dump(batch))
    meta = {spec.py_names.encode(): [c.encode() for c in s.classes]}
    if spec.n_coarse:
        meta[b"coarse_label_names"] = [f"coarse{i}".encode() for i in range(spec.n_coarse)]
    (folder / spec.py_meta).write_bytes(dump(meta))
    return folder


def make_archive(folder: Path, path: Path) -> Path:
    """`path` (.tar.gz) holding `folder` as its top-level directory, like the official ones."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return path


def assert_matches(ds: Dataset, s: Synth) -> None:
    assert ds.name == s.spec.name
    assert ds.classes == s.classes
    for got, want in ((ds.train_images, s.x), (ds.test_images, s.tx)):
        assert got.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    for got, want in ((ds.train_labels, s.y), (ds.test_labels, s.ty)):
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


def one_line_error(excinfo: pytest.ExceptionInfo[DataError], *fragments: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache, no data folder from the environment, and no network at all."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("JAXBENCH_CACHE_DIR", str(cache))
    monkeypatch.delenv("JAXBENCH_DATA_DIR", raising=False)
    monkeypatch.delenv("JAXBENCH_CIFAR_URL", raising=False)

    def no_network(url: str, timeout: float = 0) -> Any:
        raise AssertionError(f"test tried the network: {url}")

    monkeypatch.setattr(data, "_urlopen", no_network)
    return cache


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> dict[str, data.Spec]:
    """Shrink both datasets so synthetic files are a few kB."""
    specs = {
        "cifar10": dataclasses.replace(data.SPECS["cifar10"], n_train=N_TRAIN, n_test=N_TEST),
        "cifar100": dataclasses.replace(
            data.SPECS["cifar100"], n_train=N100_TRAIN, n_test=N100_TEST
        ),
    }
    for k, v in specs.items():
        monkeypatch.setitem(data.SPECS, k, v)
    return specs


def register_md5(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Pretend a synthetic archive is the published one."""
    monkeypatch.setitem(data.ARCHIVE_MD5, path.name, data.md5_of(path))


# --- round trips ------------------------------------------------------------------------------


def test_binary_folder_round_trip(tmp_path: Path, small, isolated: Path) -> None:
    s = make_synth(small["cifar10"])
    folder = write_binary(tmp_path / "d", s)
    ds = load_dataset(data_dir=tmp_path / "d")
    assert_matches(ds, s)
    assert ds.source == f"binary folder {folder}"
    assert_matches(load_dataset(data_dir=folder), s)  # the layout folder itself works too
    assert files_in(isolated) == []  # folders are read in place, never cached


def test_python_folder_round_trip_official_pickle(tmp_path: Path, small) -> None:
    s = make_synth(small["cifar10"], seed=1)
    write_python(tmp_path, s)
    assert_matches(load_dataset(data_dir=tmp_path), s)


def test_python_folder_round_trip_modern_pickle(tmp_path: Path, small) -> None:
    """A protocol-4 pickle from numpy 2 names `numpy._core.multiarray`; it loads too."""
    s = make_synth(small["cifar10"], seed=2)
    write_python(tmp_path, s, dump=lambda o: pickle.dumps(o, protocol=4))
    assert_matches(load_dataset(data_dir=tmp_path), s)


@pytest.mark.parametrize("layout", ["binary", "python"])
def test_cifar100_round_trip(tmp_path: Path, small, layout: str) -> None:
    s = make_synth(small["cifar100"], seed=3)
    (write_binary if layout == "binary" else write_python)(tmp_path, s)
    ds = load_dataset(Config(dataset="cifar100"), data_dir=tmp_path)
    assert_matches(ds, s)  # fine labels; the coarse byte/list is verified, then dropped
    assert len(ds.classes) == 100


@pytest.mark.parametrize(
    "dataset,layout",
    [("cifar10", "binary"), ("cifar10", "python"), ("cifar100", "binary"), ("cifar100", "python")],
)
def test_archive_round_trip_and_cache(
    tmp_path: Path, small, isolated: Path, monkeypatch, dataset: str, layout: str
) -> None:
    spec = small[dataset]
    s = make_synth(spec, seed=4)
    folder = (write_binary if layout == "binary" else write_python)(tmp_path / "src", s)
    archive_name = spec.bin_archive if layout == "binary" else spec.py_archive
    (tmp_path / "d").mkdir()
    archive = make_archive(folder, tmp_path / "d" / archive_name)
    register_md5(monkeypatch, archive)

    ds = load_dataset(Config(dataset=dataset), data_dir=tmp_path / "d")
    assert_matches(ds, s)
    assert ds.source == f"archive {archive}"
    entry = isolated / archive_name.replace(".tar.gz", ".arrays")
    assert sorted(p.name for p in entry.iterdir()) == [
        "info.json",
        "test_images.npy",
        "test_labels.npy",
        "train_images.npy",
        "train_labels.npy",
    ]
    assert [p.name for p in isolated.iterdir()] == [entry.name]  # no temp files left
    # The second load of the archive uses the decoded arrays; without a folder, so does the cache.
    assert load_dataset(Config(dataset=dataset), data_dir=tmp_path / "d").source.startswith("cache")
    cached = load_dataset(Config(dataset=dataset))
    assert cached.source == f"cache {entry}"
    assert_matches(cached, s)


def test_subsets_take_first_images(tmp_path: Path, small) -> None:
    s = make_synth(small["cifar10"], seed=5)
    write_binary(tmp_path, s)
    cfg = Config(subset=7, test_subset=3, batch_size=1)
    ds = load_dataset(cfg, data_dir=tmp_path)
    np.testing.assert_array_equal(ds.train_images, s.x[:7])
    np.testing.assert_array_equal(ds.train_labels, s.y[:7])
    np.testing.assert_array_equal(ds.test_images, s.tx[:3])
    np.testing.assert_array_equal(ds.test_labels, s.ty[:3])
    with pytest.raises(DataError) as e:
        load_dataset(Config(subset=N_TRAIN + 1, batch_size=1), data_dir=tmp_path)
    one_line_error(e, "--subset", f"1..{N_TRAIN}")


def test_data_dir_from_config_and_environment(tmp_path: Path, small, monkeypatch) -> None:
    s = make_synth(small["cifar10"], seed=6)
    write_binary(tmp_path, s)
    assert_matches(load_dataset(Config(data_dir=str(tmp_path))), s)
    monkeypatch.setenv("JAXBENCH_DATA_DIR", str(tmp_path))
    assert_matches(load_dataset(), s)


def test_channel_stats_match_float64_numpy() -> None:
    x = np.random.default_rng(7).integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
    mean, std = data.channel_stats(x)
    f = x.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, f.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, f.std(0), rtol=0, atol=1e-12)


def test_cli_json_on_synthetic_data(tmp_path: Path, small) -> None:
    s = make_synth(small["cifar10"], seed=8)
    write_binary(tmp_path, s)
    lines: list[str] = []
    assert data.main(["--data-dir", str(tmp_path), "--json"], out=lines.append) == 0
    got = json.loads(lines[0])
    assert list(got) == [
        "train_count",
        "test_count",
        "classes",
        "train_mean",
        "train_std",
        "test_mean",
        "test_std",
    ]
    assert (got["train_count"], got["test_count"], got["classes"]) == (N_TRAIN, N_TEST, NAMES10)
    f = s.x.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(got["train_mean"], f.mean(0), atol=1e-12)
    np.testing.assert_allclose(got["train_std"], f.std(0), atol=1e-12)
    lines.clear()
    assert data.main(["--data-dir", str(tmp_path)], out=lines.append) == 0
    assert "50 images" in lines[0] and "class0, class1" in lines[0]


def test_tfds_source_with_mock_data(small) -> None:
    """`tfds.data_source` + `tfds.testing.mock_data` work without TensorFlow installed."""
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        ds = load_dataset(Config(source="tfds"))
        want = [tfds.data_source("cifar10", split=sp, download=False) for sp in ("train", "test")]
        for images, labels, src in (
            (ds.train_images, ds.train_labels, want[0]),
            (ds.test_images, ds.test_labels, want[1]),
        ):
            assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
            assert labels.dtype == np.int32
            for i in range(6):
                np.testing.assert_array_equal(images[i], src[i]["image"])
                assert labels[i] == int(src[i]["label"])
    assert len(ds.classes) == 10 and ds.source == "tfds cifar10"


def test_tfds_source_not_prepared(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError) as e:
        load_dataset(Config(source="tfds"), data_dir=tmp_path / "tfds")
    one_line_error(e, "tfds has no prepared cifar10", "tfds build cifar10", "--source auto")


# --- bad inputs: one line naming the file and the fix, nothing cached -------------------------


def test_missing_folder(tmp_path: Path, isolated: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset(data_dir=tmp_path / "nope")
    one_line_error(e, str(tmp_path / "nope"), "does not exist", "--data-dir")
    assert files_in(isolated) == []


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return path


@pytest.mark.parametrize(
    "name,body,fragment",
    [
        ("data", b"", "is an empty file"),
        ("cifar-10-binary.tar.gz", b"", "is an empty file"),  # the official name, empty
        ("data.tar.gz", gzip.compress(b"", mtime=0), "is an empty archive"),
        ("notes.txt", b"some text", "is a file, not a data folder or archive"),
        ("empty.tar.gz", None, "is an archive with no cifar10 files"),
        ("other.tar.gz", {"junk/a": b"x"}, "is an archive with no cifar10 files"),
        ("mine.tar.gz", {"cifar-10-batches-bin/data_batch_1.bin": b"x"},
         "rename it to cifar-10-binary.tar.gz"),
    ],
)  # fmt: skip
def test_a_file_given_as_the_data_folder_says_what_it_is(
    tmp_path: Path, isolated: Path, name: str, body: Any, fragment: str
) -> None:
    """It exists: never "does not exist"; the line says what the file is, and the fix."""
    path = tmp_path / name
    if isinstance(body, bytes):
        path.write_bytes(body)
    else:
        _tar(path, body or {})
    before = path.read_bytes()
    with pytest.raises(DataError) as e:
        load_dataset(data_dir=path)
    msg = one_line_error(e, str(path), fragment, "--data-dir")
    assert "does not exist" not in msg
    assert path.read_bytes() == before and files_in(isolated) == []


def test_a_cache_that_is_a_file_is_named_a_file(tmp_path: Path) -> None:
    cache = tmp_path / "cache_file"
    cache.write_text("mine")
    for call in (
        lambda: load_dataset(cache=cache, download=False),
        lambda: data.clear_cache(cache),
    ):
        with pytest.raises(DataError) as e:
            call()
        msg = one_line_error(e, f"cache {cache} is a file, not a folder", "--cache-dir")
        assert "not in the cache" not in msg
    assert cache.read_text() == "mine"


def test_wrong_layout(tmp_path: Path, isolated: Path) -> None:
    (tmp_path / "cifar-10-batches").mkdir()
    (tmp_path / "data_batch_1.png").write_bytes(b"x")
    with pytest.raises(DataError) as e:
        load_dataset(data_dir=tmp_path)
    one_line_error(e, f"{tmp_path} holds no cifar10", "cifar-10-batches-bin/", "--data-dir")
    assert files_in(isolated) == []


@pytest.mark.parametrize(
    "change,what",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[: 3073 * 9], "truncated"),  # cut at a record boundary
        (lambda b: b + b"\0", "oversized"),
        (lambda b: b + b[:3073], "oversized"),
    ],
)
def test_bad_batch_size(tmp_path: Path, small, isolated: Path, change, what: str) -> None:
    folder = write_binary(tmp_path, make_synth(small["cifar10"]))
    f = folder / "data_batch_3.bin"
    f.write_bytes(change(f.read_bytes()))
    with pytest.raises(DataError) as e:
        load_dataset(data_dir=tmp_path)
    one_line_error(e, str(f), what, "expected 30730 ", "fresh copy")
    assert files_in(isolated) == []


def test_label_out_of_range(tmp_path: Path, small) -> None:
    folder = write_binary(tmp_path, make_synth(small["cifar10"]))
    f = folder / "test_batch.bin"
    raw = bytearray(f.read_bytes())
    raw[3073 * 4] = 10
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        load_dataset(data_dir=tmp_path)
    one_line_error(e, str(f), "label 10, outside 0..9")


def test_cifar100_coarse_label_out_of_range(tmp_path: Path, small) -> None:
    folder = write_binary(tmp_path, make_synth(small["cifar100"]))
    f = folder / "train.bin"
    raw = bytearray(f.read_bytes())
    raw[3074 * 2] = 20
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        load_dataset(Config(dataset="cifar100"), data_dir=tmp_path)
    one_line_error(e, str(f), "coarse 20, outside 0..19")


@pytest.mark.parametrize("name", ["data_batch_5.bin", "test_batch.bin", "batches.meta.txt"])
def test_missing_file_in_layout(tmp_path: Path, small, name: str) -> None:
    folder = write_binary(tmp_path, make_synth(small["cifar10"]))
    (folder / name).unlink()
    with pytest.raises(DataError) as e:
        load_dataset(data_dir=tmp_path)
    one_line_error(e, str(folder / name), "missing", "unpack the dataset again")


def test_wrong_class_names(tmp_path: Path, small) -> None:
    folder = write_binary(tmp_path, make_synth(small["cifar10"]))
    (folder / "batches.meta.txt").write_text("a\nb\n")
    with pytest.raises(DataError) as e:
        load_dataset(data_dir=tmp_path)
    one_line_error(e, "batches.meta.txt", "2 class names, expected 10")


def test_python_batch_with_wrong_shape(tmp_path: Path, small) -> None:
    folder = write_python(tmp_path, make_synth(small["cifar10"]))
    batch = {b"data": np.zeros((9, 3072), np.uint8), b"labels": [0] * 9}
    (folder / "data_batch_2").write_bytes(py2_pickle(batch))
    with pytest.raises(DataError) as e:
        load_dataset(data_dir=tmp_path)
    one_line_error(e, str(folder / "data_batch_2"), "uint8 (9, 3072)", "expected uint8 (10, 3072)")


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["whole", "inside"])
def test_hostile_pickle_is_refused_without_running(
    tmp_path: Path, small, isolated: Path, where: str
) -> None:
    folder = write_python(tmp_path / "d", make_synth(small["cifar10"]))
    marker = tmp_path / "pwned"
    payload = _Hostile(marker) if where == "whole" else {"data": [1, _Hostile(marker)]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(DataError) as e:
        load_dataset(data_dir=tmp_path / "d")
    one_line_error(e, str(folder / "data_batch_1"), "refused to load global", "system")
    assert not marker.exists()
    assert files_in(isolated) == []


@pytest.mark.parametrize(
    "module,name",
    [("builtins", "eval"), ("os", "system"), ("numpy", "load"), ("numpy.lib.npyio", "load")],
)
def test_unpickler_allows_only_numpy_array_globals(module: str, name: str) -> None:
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        data.SafeUnpickler(io.BytesIO(b"")).find_class(module, name)


def test_archive_with_wrong_checksum(tmp_path: Path, small, isolated: Path) -> None:
    folder = write_binary(tmp_path / "src", make_synth(small["cifar10"]))
    (tmp_path / "d").mkdir()
    archive = make_archive(folder, tmp_path / "d" / "cifar-10-binary.tar.gz")
    with pytest.raises(DataError) as e:
        load_dataset(data_dir=tmp_path / "d")
    one_line_error(e, str(archive), "not the published c32a1d4ab5d03f1284b67883e8d87530", "delete")
    assert files_in(isolated) == []


@pytest.mark.parametrize(
    "damage", [lambda b: b[: len(b) // 2], lambda b: b[:100] + bytes(len(b) - 100)]
)
def test_damaged_archive(tmp_path: Path, small, isolated: Path, monkeypatch, damage) -> None:
    folder = write_binary(tmp_path / "src", make_synth(small["cifar10"]))
    (tmp_path / "d").mkdir()
    archive = make_archive(folder, tmp_path / "d" / "cifar-10-binary.tar.gz")
    archive.write_bytes(damage(archive.read_bytes()))
    register_md5(monkeypatch, archive)  # the md5 matches; the contents are still broken
    with pytest.raises(DataError) as e:
        load_dataset(data_dir=tmp_path / "d")
    one_line_error(e, str(archive), "damaged archive", "fetch the official archive again")
    assert files_in(isolated) == []


def test_archive_with_bad_member_leaves_no_cache(
    tmp_path: Path, small, isolated: Path, monkeypatch
) -> None:
    folder = write_binary(tmp_path / "src", make_synth(small["cifar10"]))
    (folder / "data_batch_4.bin").write_bytes(b"\0" * 100)
    (tmp_path / "d").mkdir()
    archive = make_archive(folder, tmp_path / "d" / "cifar-10-binary.tar.gz")
    register_md5(monkeypatch, archive)
    with pytest.raises(DataError) as e:
        load_dataset(data_dir=tmp_path / "d")
    one_line_error(e, f"{archive}:cifar-10-batches-bin/data_batch_4.bin", "truncated")
    assert files_in(isolated) == []


# --- download (never the real network) ---------------------------------------------------------


class FakeResponse(io.BytesIO):
    def __init__(self, body: bytes, length: int | None = None) -> None:
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body) if length is None else length)}


def synthetic_archive(tmp_path: Path, small, monkeypatch, register: bool = True) -> tuple:
    s = make_synth(small["cifar10"], seed=9)
    folder = write_binary(tmp_path / "src", s)
    archive = make_archive(folder, tmp_path / "cifar-10-binary.tar.gz")
    if register:
        register_md5(monkeypatch, archive)
    return s, archive.read_bytes()


def test_download_then_cache(tmp_path: Path, small, isolated: Path, monkeypatch) -> None:
    s, body = synthetic_archive(tmp_path, small, monkeypatch)
    urls: list[str] = []

    def opener(url: str, timeout: float = 0) -> FakeResponse:
        urls.append(url)
        return FakeResponse(body)

    monkeypatch.setattr(data, "_urlopen", opener)
    ds = load_dataset(progress=False)
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert_matches(ds, s)
    assert ds.source == f"download {isolated / 'cifar-10-binary.tar.gz'}"
    assert (isolated / "cifar-10-binary.tar.gz").read_bytes() == body
    assert sorted(p.name for p in isolated.iterdir()) == [
        "cifar-10-binary.arrays",
        "cifar-10-binary.tar.gz",
    ]
    assert_matches(load_dataset(progress=False), s)  # from the cache: no second download
    assert len(urls) == 1
    removed = data.clear_cache()
    assert {p.name for p in removed} == {"cifar-10-binary.arrays", "cifar-10-binary.tar.gz"}
    assert files_in(isolated) == []


@pytest.mark.parametrize("failure", ["checksum", "short", "network", "http"])
def test_download_failures_leave_nothing(
    tmp_path: Path, small, isolated: Path, monkeypatch, failure: str
) -> None:
    _, body = synthetic_archive(tmp_path, small, monkeypatch, register=failure != "checksum")

    def opener(url: str, timeout: float = 0) -> FakeResponse:
        if failure == "network":
            raise urllib.error.URLError(OSError(101, "Network is unreachable"))
        if failure == "http":
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)  # type: ignore[arg-type]
        if failure == "short":
            return FakeResponse(body[:1000], length=len(body))
        return FakeResponse(body)

    monkeypatch.setattr(data, "_urlopen", opener)
    with pytest.raises(DataError) as e:
        load_dataset(progress=False)
    msg = one_line_error(e, "cifar-10-binary.tar.gz", "--data-dir", "JAXBENCH_DATA_DIR")
    expect = {
        "checksum": "not the published c32a1d4ab5d03f1284b67883e8d87530",
        "short": "stopped after 1000 of",
        "network": "Network is unreachable",
        "http": "Not Found",
    }[failure]
    assert expect in msg
    assert files_in(isolated) == []


def test_no_download_when_disabled(isolated: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset(download=False)
    one_line_error(e, "not in the cache", "--data-dir")


def test_damaged_cache_entry_names_the_fix(tmp_path: Path, small, isolated: Path) -> None:
    (isolated / "cifar-10-binary.arrays").mkdir(parents=True)
    with pytest.raises(DataError) as e:
        load_dataset()
    one_line_error(e, "cifar-10-binary.arrays is damaged", "--clear-cache")


def test_clear_cache_removes_only_its_own_files(tmp_path: Path, isolated: Path) -> None:
    isolated.mkdir()
    (isolated / "cifar-100-python.tar.gz").write_bytes(b"x")
    (isolated / "cifar-10-binary.arrays").mkdir()
    (isolated / ".cifar-10-binary.tar.gz.abc.tmp").write_bytes(b"x")
    (isolated / "notes.txt").write_text("mine")
    lines: list[str] = []
    assert data.main(["--clear-cache"], out=lines.append) == 0
    assert lines == [f"removed 3 item(s) from {isolated}"]
    assert [p.name for p in isolated.iterdir()] == ["notes.txt"]


# --- the command line as a user runs it: exit code 2, one line, no traceback -------------------


def run_cli(*args: str, cache: Path, url: str = "file:///nonexistent-jaxbench-mirror/"):
    env = {k: v for k, v in os.environ.items() if k != "JAXBENCH_DATA_DIR"}
    env.update(JAXBENCH_CACHE_DIR=str(cache), JAXBENCH_CIFAR_URL=url)
    return subprocess.run(
        [sys.executable, "-m", "jaxbench.data", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_bad_inputs_exit_2_one_line(tmp_path: Path, isolated: Path) -> None:
    """Full-size specs here (a subprocess): tiny files are truncated, archives mismatch md5."""
    spec = data.SPECS["cifar10"]
    bad_size = tmp_path / "bad_size"
    write_binary(bad_size, make_synth(dataclasses.replace(spec, n_train=50, n_test=10)))
    hostile = tmp_path / "hostile" / spec.py_dir
    hostile.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (hostile / "batches.meta").write_bytes(py2_pickle({b"label_names": [b"a"] * 10}))
    (hostile / "data_batch_1").write_bytes(pickle.dumps(_Hostile(marker), protocol=2))
    wrong_md5 = tmp_path / "wrong_md5"
    wrong_md5.mkdir()
    (wrong_md5 / spec.bin_archive).write_bytes(gzip.compress(b"not a tar"))
    empty_file = tmp_path / "empty"
    empty_file.write_bytes(b"")
    cases = {
        "missing": (["--data-dir", str(tmp_path / "nope")], "does not exist"),
        "truncated": (["--data-dir", str(bad_size), "--json"], "data_batch_1.bin is truncated"),
        "hostile": (["--data-dir", str(tmp_path / "hostile")], "refused to load global"),
        "checksum": (["--data-dir", str(wrong_md5)], "not the published"),
        "archive path": (["--data-dir", str(wrong_md5 / spec.bin_archive)], "not the published"),
        "no network": ([], "could not download file:///nonexistent-jaxbench-mirror/"),
        "empty file": (["--data-dir", str(empty_file)], "is an empty file"),
        "cache a file": (["--cache-dir", str(empty_file)], "is a file, not a folder"),
    }
    for name, (args, fragment) in cases.items():
        r = run_cli(*args, cache=isolated)
        assert r.returncode == 2, (name, r.stderr)
        assert r.stdout == "", name
        assert "Traceback" not in r.stderr, (name, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, r.stderr)
        assert fragment in lines[0], (name, lines[0])
        assert files_in(isolated) == [], (name, files_in(isolated))
    assert "--data-dir" in run_cli(cache=isolated).stderr  # the no-network fix
    fresh = tmp_path / "new" / "cache"
    assert run_cli(cache=fresh).returncode == 2
    assert not (tmp_path / "new").exists()  # a failed offline run leaves no empty cache folder
    assert not marker.exists()


# --- the real CIFAR-10 ------------------------------------------------------------------------

TRAIN_MEAN = (0.49139968, 0.48215841, 0.44653091)
TRAIN_STD = (0.24703223, 0.24348513, 0.26158784)


@pytest.fixture(scope="module")
def real(cifar10: Dataset) -> Dataset:
    return cifar10


@pytest.mark.realdata
def test_real_counts_and_classes(real: Dataset) -> None:
    assert real.train_images.shape == (50_000, 32, 32, 3)
    assert real.test_images.shape == (10_000, 32, 32, 3)
    assert real.train_images.dtype == np.uint8 and real.train_labels.dtype == np.int32
    assert np.bincount(real.train_labels).tolist() == [5_000] * 10
    assert np.bincount(real.test_labels).tolist() == [1_000] * 10
    assert real.classes[0] == "airplane" and real.classes[9] == "truck"


@pytest.mark.realdata
def test_real_statistics(real: Dataset) -> None:
    mean, std = data.channel_stats(real.train_images)
    np.testing.assert_allclose(mean, TRAIN_MEAN, rtol=0, atol=1e-6)
    np.testing.assert_allclose(std, TRAIN_STD, rtol=0, atol=1e-6)


@pytest.mark.realdata
def test_real_cli_json(real_data_dir: Path, isolated: Path) -> None:
    r = run_cli("--data-dir", str(real_data_dir), "--json", cache=isolated)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert (got["train_count"], got["test_count"], len(got["classes"])) == (50_000, 10_000, 10)
    np.testing.assert_allclose(got["train_mean"], TRAIN_MEAN, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["train_std"], TRAIN_STD, rtol=0, atol=1e-6)
    assert files_in(isolated) == []


def test_same_size_corruption_of_a_cached_array_is_caught(
    tmp_path: Path, small, isolated: Path, monkeypatch
) -> None:
    """One flipped pixel byte keeps the file's size and shape; the sha256 in info.json
    catches it, and the error names the damaged file. So does an entry without sums."""
    spec = small["cifar10"]
    s = make_synth(spec, seed=9)
    folder = write_binary(tmp_path / "src", s)
    (tmp_path / "d").mkdir()
    register_md5(monkeypatch, make_archive(folder, tmp_path / "d" / spec.bin_archive))
    load_dataset(Config(), data_dir=tmp_path / "d")  # decodes into the cache
    entry = isolated / "cifar-10-binary.arrays"
    target = entry / "train_images.npy"
    raw = bytearray(target.read_bytes())
    raw[-5] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        load_dataset(Config())
    one_line_error(e, f"{target} is damaged (sha256 mismatch)", "--clear-cache")
    info = json.loads((entry / "info.json").read_text())
    del info["sha256"]
    (entry / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataError) as e:
        load_dataset(Config())
    one_line_error(e, "has no checksums", "--clear-cache")

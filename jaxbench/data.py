"""CIFAR-10 and CIFAR-100 as uint8 NHWC arrays: official formats, a cache, a verified download.

Sources, in order: an explicit folder (`data_dir=`, `cfg.data_dir`, `$JAXBENCH_DATA_DIR`)
with an official layout or archive; the cache of decoded arrays; a download into the cache
(or `source="tfds"`). Archives are md5-checked, pickles read by an unpickler that cannot
run code; every problem is one `DataError` naming the file and the fix (docs/data.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import io
import json
import logging
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxbench.command import Command, run_command
from jaxbench.configs import Config, OneLineErrorParser
from jaxbench.progress import progress_bar

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

IMAGE_BYTES = 32 * 32 * 3
DEFAULT_URL = "https://www.cs.toronto.edu/~kriz/"
# Published md5 of the official archives (https://www.cs.toronto.edu/~kriz/cifar.html).
ARCHIVE_MD5: dict[str, str] = {
    "cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530",
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-binary.tar.gz": "03b5dce01913d631647c71ecec9e9cb8",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}
_CHUNK = 1 << 20


class DataError(ValueError):
    """A dataset problem the user can fix, in one line naming the file and the fix."""


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset; images are uint8 N x 32 x 32 x 3 (NHWC), labels int32."""

    name: str
    classes: list[str]
    train_images: np.ndarray  # uint8 NHWC
    train_labels: np.ndarray  # int32
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str = ""  # where it was read from, for messages and records


@dataclass(frozen=True)
class Spec:
    """One dataset's official files; the loaders are driven by it alone."""

    name: str
    n_classes: int
    n_coarse: int  # CIFAR-100's superclasses (its binary records carry both labels); 0 if none
    n_train: int
    n_test: int
    bin_dir: str
    bin_train: tuple[str, ...]
    bin_test: str
    bin_meta: str  # text file, one class name per line
    py_dir: str
    py_train: tuple[str, ...]
    py_test: str
    py_meta: str
    py_labels: str  # key of the label list in a python batch
    py_names: str  # key of the class-name list in the python meta file
    bin_archive: str
    py_archive: str

    @property
    def label_bytes(self) -> int:
        return 2 if self.n_coarse else 1


SPECS: dict[str, Spec] = {
    "cifar10": Spec(
        name="cifar10",
        n_classes=10,
        n_coarse=0,
        n_train=50_000,
        n_test=10_000,
        bin_dir="cifar-10-batches-bin",
        bin_train=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        bin_test="test_batch.bin",
        bin_meta="batches.meta.txt",
        py_dir="cifar-10-batches-py",
        py_train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        py_test="test_batch",
        py_meta="batches.meta",
        py_labels="labels",
        py_names="label_names",
        bin_archive="cifar-10-binary.tar.gz",
        py_archive="cifar-10-python.tar.gz",
    ),
    "cifar100": Spec(
        name="cifar100",
        n_classes=100,
        n_coarse=20,
        n_train=50_000,
        n_test=10_000,
        bin_dir="cifar-100-binary",
        bin_train=("train.bin",),
        bin_test="test.bin",
        bin_meta="fine_label_names.txt",
        py_dir="cifar-100-python",
        py_train=("train",),
        py_test="test",
        py_meta="meta",
        py_labels="fine_labels",
        py_names="fine_label_names",
        bin_archive="cifar-100-binary.tar.gz",
        py_archive="cifar-100-python.tar.gz",
    ),
}


# --- where files come from: a folder or an archive read in one pass -------------------------


class _Files:
    """Named files of one official layout; sizes are known before reading, to refuse early."""

    def __init__(self, label: str, refetch: str) -> None:
        self.label = label  # shown in messages, e.g. a folder path
        self.refetch = refetch  # the fix for a damaged file

    def size(self, name: str) -> int:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def where(self, name: str) -> str:
        return f"{self.label}/{name}"


class _Folder(_Files):
    def __init__(self, root: Path, layout: str) -> None:
        super().__init__(str(root), f"replace the {layout} folder with a fresh copy")
        self.root = root

    def size(self, name: str) -> int:
        path = self.root / name
        if not path.is_file():
            raise DataError(
                f"{path} is missing: {self.root} is incomplete; unpack the dataset again"
            )
        return path.stat().st_size

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {self.root / name}: {e.strerror}") from None


class _Archive(_Files):
    def __init__(self, path: Path, folder: str, members: dict[str, bytes]) -> None:
        super().__init__(f"{path}:{folder}", f"delete {path} and fetch the archive again")
        self.path = path
        self.members = members

    def size(self, name: str) -> int:
        if name not in self.members:
            raise DataError(
                f"{self.where(name)} is missing from the archive; it is not an official "
                f"CIFAR archive: delete {self.path} and fetch it again"
            )
        return len(self.members[name])

    def read(self, name: str) -> bytes:
        return self.members[name]


def _read_archive(path: Path, folder: str, names: Sequence[str]) -> _Archive:
    """The wanted members of a .tar.gz, read in one sequential pass (never extracted to disk)."""
    wanted = {f"{folder}/{n}": n for n in names}
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for info in tar:
                key = wanted.get(info.name.removeprefix("./"))
                if key is None or not info.isfile():
                    continue
                f = tar.extractfile(info)
                assert f is not None  # a regular file always has a reader
                members[key] = f.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(
            f"{path} is a damaged archive ({type(e).__name__}: {e}); delete it and fetch "
            "the official archive again"
        ) from None
    return _Archive(path, folder, members)


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --- decoding the two official layouts -------------------------------------------------------


def _nchw_rows_to_nhwc(rows: np.ndarray, out: np.ndarray) -> None:
    """Rows of 3072 bytes (R plane, G plane, B plane) into NHWC `out`, in cache-sized chunks."""
    step = 512
    for s in range(0, len(rows), step):
        out[s : s + step] = rows[s : s + step].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _check_labels(labels: np.ndarray, n: int, where: str, fix: str, kind: str = "label") -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= n):
        bad = int(labels.max() if labels.max() >= n else labels.min())
        raise DataError(f"{where} has {kind} {bad}, outside 0..{n - 1}: the file is damaged; {fix}")


def _decode_binary_split(
    files: _Files, names: Sequence[str], n_total: int, spec: Spec
) -> tuple[np.ndarray, np.ndarray]:
    per_file = n_total // len(names)
    record = spec.label_bytes + IMAGE_BYTES
    images = np.empty((n_total, 32, 32, 3), np.uint8)
    labels = np.empty(n_total, np.int32)
    for i, name in enumerate(names):
        size, expected = files.size(name), per_file * record
        if size != expected:
            what = "truncated" if size < expected else "oversized"
            raise DataError(
                f"{files.where(name)} is {what}: {size} bytes, expected {expected} "
                f"({per_file} records of {record} bytes); {files.refetch}"
            )
        rows = np.frombuffer(files.read(name), np.uint8).reshape(per_file, record)
        if spec.n_coarse:
            _check_labels(rows[:, 0], spec.n_coarse, files.where(name), files.refetch, "coarse")
        fine = rows[:, spec.label_bytes - 1]
        _check_labels(fine, spec.n_classes, files.where(name), files.refetch)
        sl = slice(i * per_file, (i + 1) * per_file)
        labels[sl] = fine
        _nchw_rows_to_nhwc(rows[:, spec.label_bytes :], images[sl])
    return images, labels


def _decode_binary(files: _Files, spec: Spec) -> tuple[list[str], tuple[np.ndarray, ...]]:
    where = files.where(spec.bin_meta)
    files.size(spec.bin_meta)
    try:
        text = files.read(spec.bin_meta).decode("ascii")
    except UnicodeDecodeError:
        raise DataError(f"{where} is not a text file; {files.refetch}") from None
    classes = [line.strip() for line in text.splitlines() if line.strip()]
    if len(classes) != spec.n_classes:
        raise DataError(
            f"{where} lists {len(classes)} class names, expected {spec.n_classes}; {files.refetch}"
        )
    x, y = _decode_binary_split(files, spec.bin_train, spec.n_train, spec)
    tx, ty = _decode_binary_split(files, (spec.bin_test,), spec.n_test, spec)
    return classes, (x, y, tx, ty)


class SafeUnpickler(pickle.Unpickler):
    """Builds containers, bytes, str, numbers and numpy arrays; refuses every other global."""

    # the only globals an official python batch references, under numpy 1 and 2 spellings
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}") from None


def _unpickle(files: _Files, name: str) -> dict[str, Any]:
    files.size(name)
    try:
        obj = SafeUnpickler(io.BytesIO(files.read(name)), encoding="bytes").load()
    except Exception as e:  # a damaged or hostile pickle can raise nearly anything
        raise DataError(
            f"{files.where(name)} is not a valid CIFAR python batch ({type(e).__name__}: {e}); "
            f"{files.refetch}, or use the binary version"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{files.where(name)} holds a {type(obj).__name__}, not a dict; {files.refetch}"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _decode_python_split(
    files: _Files, name: str, n: int, spec: Spec
) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(files, name)
    where, fix = files.where(name), files.refetch
    keys = ["data", spec.py_labels] + (["coarse_labels"] if spec.n_coarse else [])
    for key in keys:
        if key not in batch:
            raise DataError(f"{where} has no {key!r} entry; {fix}")
    data = batch["data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape == (n, 3072)):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: 'data' is {got}, expected uint8 ({n}, 3072); {fix}")
    label_lists = {}
    for key in keys[1:]:
        try:
            arr = np.asarray(batch[key])
        except Exception:  # ragged or odd contents
            arr = np.empty(0, object)
        if arr.shape != (n,) or arr.dtype.kind not in "iu":
            raise DataError(f"{where}: {key!r} is not a list of {n} integers; {fix}")
        label_lists[key] = arr
    if spec.n_coarse:
        _check_labels(label_lists["coarse_labels"], spec.n_coarse, where, fix, "coarse")
    labels = label_lists[spec.py_labels]
    _check_labels(labels, spec.n_classes, where, fix)
    images = np.empty((n, 32, 32, 3), np.uint8)
    _nchw_rows_to_nhwc(data, images)
    return images, labels.astype(np.int32)


def _decode_python(files: _Files, spec: Spec) -> tuple[list[str], tuple[np.ndarray, ...]]:
    meta = _unpickle(files, spec.py_meta)
    raw = meta.get(spec.py_names)
    if not isinstance(raw, list) or len(raw) != spec.n_classes:
        raise DataError(
            f"{files.where(spec.py_meta)} has no list of {spec.n_classes} {spec.py_names!r}; "
            f"{files.refetch}"
        )
    classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in raw]
    per_file = spec.n_train // len(spec.py_train)
    parts = [_decode_python_split(files, n, per_file, spec) for n in spec.py_train]
    x, y = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
    tx, ty = _decode_python_split(files, spec.py_test, spec.n_test, spec)
    return classes, (x, y, tx, ty)


# --- the cache --------------------------------------------------------------------------------


def cache_dir() -> Path:
    """`$JAXBENCH_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxbench`, else `~/.cache/jaxbench`."""
    if d := os.environ.get("JAXBENCH_CACHE_DIR"):
        return Path(d).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "jaxbench"


_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def _entry_dir(cache: Path, archive: str) -> Path:
    return cache / (archive.removesuffix(".tar.gz") + ".arrays")


def _write_entry(
    cache: Path, archive: str, classes: list[str], arrays: tuple[np.ndarray, ...], md5: str
) -> None:
    """Publish decoded arrays as one folder, atomically: a reader sees all of it or none."""
    final = _entry_dir(cache, archive)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=cache))
    try:
        sha256 = {}
        for key, arr in zip(_ARRAYS, arrays, strict=True):
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            raw = buf.getvalue()
            sha256[f"{key}.npy"] = hashlib.sha256(raw).hexdigest()
            with (tmp / f"{key}.npy").open("wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
        info = {"classes": classes, "archive": archive, "archive_md5": md5, "sha256": sha256}
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:  # another process published it first: keep theirs
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_entry(cache: Path, spec: Spec, archive: str) -> Dataset | None:
    entry = _entry_dir(cache, archive)
    if not entry.is_dir():
        return None
    fix = "run `python -m jaxbench.data --clear-cache` and load again"
    try:
        info = json.loads((entry / "info.json").read_text())
        sums = info.get("sha256")
        if not isinstance(sums, dict):
            raise DataError(
                f"cache entry {entry} has no checksums (an older version wrote it); {fix}"
            )
        arrays = []
        for k in _ARRAYS:
            raw = (entry / f"{k}.npy").read_bytes()
            if hashlib.sha256(raw).hexdigest() != sums.get(f"{k}.npy"):
                raise DataError(
                    f"cache file {entry / f'{k}.npy'} is damaged (sha256 mismatch); {fix}"
                )
            arrays.append(np.load(io.BytesIO(raw), allow_pickle=False))
        x, y, tx, ty = arrays
        classes = [str(c) for c in info["classes"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cache entry {entry} is damaged ({type(e).__name__}); {fix}") from None
    want = [(np.uint8, (n, 32, 32, 3)) for n in (spec.n_train, spec.n_test)]
    want = [want[0], (np.int32, (spec.n_train,)), want[1], (np.int32, (spec.n_test,))]
    if [(a.dtype, a.shape) for a in (x, y, tx, ty)] != want or len(classes) != spec.n_classes:
        raise DataError(f"cache entry {entry} does not hold {spec.name}; {fix}")
    _check_labels(y, spec.n_classes, str(entry), fix)
    _check_labels(ty, spec.n_classes, str(entry), fix)
    return Dataset(spec.name, classes, x, y, tx, ty, source=f"cache {entry}")


def clear_cache(cache: Path | None = None) -> list[Path]:
    """Delete what this module put in the cache (decoded arrays, archives, leftovers); not more."""
    cache = cache_dir() if cache is None else cache
    _check_cache_folder(cache)
    removed: list[Path] = []
    if not cache.is_dir():
        return removed
    ours = set(ARCHIVE_MD5) | {_entry_dir(cache, a).name for a in ARCHIVE_MD5}
    for p in sorted(cache.iterdir()):
        leftover = p.name.startswith(".cifar-") and p.name.endswith(".tmp")
        if p.name in ours or leftover:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


# --- download --------------------------------------------------------------------------------


def _urlopen(url: str, timeout: float = 60.0) -> Any:
    """The network, in one place (tests replace it)."""
    return urllib.request.urlopen(url, timeout=timeout)


def _download(archive: str, cache: Path, progress: bool) -> Path:
    """Fetch an official archive into the cache: md5-checked, temp file, then os.replace."""
    base = os.environ.get("JAXBENCH_CIFAR_URL") or DEFAULT_URL
    url = base.rstrip("/") + "/" + archive
    final = cache / archive
    no_net = (
        "no network? pass --data-dir DIR (or set JAXBENCH_DATA_DIR) with the unpacked dataset "
        f"or {archive} (see docs/data.md)"
    )
    made = [q for q in (cache, *cache.parents) if not q.exists()]  # to remove on failure
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{archive}.", suffix=".tmp", dir=cache)
    except OSError as e:
        raise _unwritable_cache(cache, e) from None
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5()
        got = 0
        with os.fdopen(fd, "wb") as f:
            try:
                with _urlopen(url) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with progress_bar(
                        total=total,
                        unit="B",
                        unit_scale=True,
                        desc=f"downloading {archive}",
                        disable=None if progress else True,
                        file=sys.stderr,
                    ) as bar:
                        while chunk := response.read(_CHUNK):
                            f.write(chunk)
                            h.update(chunk)
                            got += len(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise DataError(f"could not download {url} ({reason}); {no_net}") from None
            if total is not None and got != total:
                raise DataError(
                    f"download of {url} stopped after {got} of {total} bytes; "
                    f"run again, or {no_net}"
                )
            f.flush()
            os.fsync(f.fileno())
        if h.hexdigest() != ARCHIVE_MD5[archive]:
            raise DataError(
                f"downloaded {url} has md5 {h.hexdigest()}, not the published "
                f"{ARCHIVE_MD5[archive]}; nothing was kept: run again, or {no_net}"
            )
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
        for q in made:  # a failed download leaves no empty cache folder behind
            with contextlib.suppress(OSError):
                q.rmdir()
    return final


# --- sources ----------------------------------------------------------------------------------


def _unwritable_cache(cache: Path, e: OSError) -> DataError:
    return DataError(
        f"cannot write the cache {cache} ({e.strerror or e}); set JAXBENCH_CACHE_DIR to a "
        "writable folder"
    )


def _from_archive(path: Path, spec: Spec, cache: Path, how: str) -> Dataset:
    """An md5-verified official archive, decoded once into the cache."""
    _check_cache_folder(cache)
    md5, expected = md5_of(path), ARCHIVE_MD5[path.name]
    if md5 != expected:
        raise DataError(
            f"{path} has md5 {md5}, not the published {expected}: the archive is damaged "
            f"or not the official one; {how}"
        )
    if (hit := _read_entry(cache, spec, path.name)) is not None:
        return hit
    if path.name == spec.bin_archive:
        files = _read_archive(path, spec.bin_dir, (*spec.bin_train, spec.bin_test, spec.bin_meta))
        classes, arrays = _decode_binary(files, spec)
    else:
        files = _read_archive(path, spec.py_dir, (*spec.py_train, spec.py_test, spec.py_meta))
        classes, arrays = _decode_python(files, spec)
    try:
        _write_entry(cache, path.name, classes, arrays, md5)
    except OSError as e:
        raise _unwritable_cache(cache, e) from None
    return Dataset(spec.name, classes, *arrays, source=f"archive {path}")


def _not_a_data_folder(path: Path, spec: Spec) -> str:
    """What a file given as the data folder is, and the fix."""
    fix = (
        f"pass --data-dir (or set JAXBENCH_DATA_DIR to) the folder that holds {spec.bin_dir}/, "
        f"or the official {spec.bin_archive} itself"
    )
    if path.stat().st_size == 0:
        return f"data {path} is an empty file, not a data folder or archive; {fix}"
    try:
        with tarfile.open(path, mode="r:*") as tar:
            names = [info.name.removeprefix("./") for info in tar]
    except tarfile.ReadError as e:  # "empty file": a compressed stream of nothing
        what = "an empty archive" if "empty" in str(e) else "a file, not a data folder or archive"
        return f"data {path} is {what}; {fix}"
    except (tarfile.TarError, EOFError, zlib.error, OSError):
        return f"data {path} is a file, not a data folder or archive; {fix}"
    dirs = [d for d in (spec.bin_dir, spec.py_dir) if any(n.startswith(f"{d}/") for n in names)]
    if not dirs:
        return (
            f"data {path} is an archive with no {spec.name} files in it (no {spec.bin_dir}/); {fix}"
        )
    archive = spec.bin_archive if dirs[0] == spec.bin_dir else spec.py_archive
    return (
        f"data {path} is an archive of {dirs[0]}/ not named {archive}; rename it to {archive} "
        "(its checksum is then checked) or unpack it and pass its folder as --data-dir"
    )


def _check_cache_folder(cache: Path) -> None:
    if cache.exists() and not cache.is_dir():
        raise DataError(
            f"cache {cache} is a file, not a folder; pass --cache-dir (or set "
            "JAXBENCH_CACHE_DIR to) a folder"
        )


def _from_folder(root: Path, spec: Spec, cache: Path) -> Dataset:
    """An official layout in or at the folder, else an archive in it, or the archive itself."""
    if root.is_file() and root.name in (spec.bin_archive, spec.py_archive) and root.stat().st_size:
        return _from_archive(root, spec, cache, f"fetch the official {root.name} again")
    if root.exists() and not root.is_dir():
        raise DataError(_not_a_data_folder(root, spec))
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist; pass --data-dir (or set JAXBENCH_DATA_DIR to) "
            f"the folder that holds {spec.bin_dir}/"
        )
    for sub, marker, layout, decode in (
        (spec.bin_dir, spec.bin_train[0], "binary", _decode_binary),
        (spec.py_dir, spec.py_train[0], "python", _decode_python),
    ):
        for folder in (root / sub, root):
            if (folder / marker).exists() or (folder.name == sub and folder.is_dir()):
                classes, arrays = decode(_Folder(folder, sub), spec)
                return Dataset(spec.name, classes, *arrays, source=f"{layout} folder {folder}")
    for archive in (spec.bin_archive, spec.py_archive):
        if (root / archive).is_file():
            how = f"delete it and fetch the official {archive} again"
            return _from_archive(root / archive, spec, cache, how)
    raise DataError(
        f"{root} holds no {spec.name}: expected {spec.bin_dir}/, {spec.py_dir}/, "
        f"{spec.bin_archive} or {spec.py_archive} in it; point --data-dir (or JAXBENCH_DATA_DIR) "
        "at the folder that holds one of them"
    )


def _from_cache_or_download(spec: Spec, cache: Path, download: bool, progress: bool) -> Dataset:
    _check_cache_folder(cache)
    for archive in (spec.bin_archive, spec.py_archive):
        if (hit := _read_entry(cache, spec, archive)) is not None:
            return hit
    for archive in (spec.bin_archive, spec.py_archive):
        if (cache / archive).is_file():
            return _from_archive(cache / archive, spec, cache, "run --clear-cache and load again")
    if not download:
        raise DataError(
            f"{spec.name} is not in the cache {cache} and downloading is off; pass --data-dir "
            f"DIR (or set JAXBENCH_DATA_DIR) with {spec.bin_dir}/ or {spec.bin_archive}"
        )
    path = _download(spec.bin_archive, cache, progress)
    ds = _from_archive(path, spec, cache, "run --clear-cache and load again")
    return dataclasses.replace(ds, source=f"download {path}")


def _from_tfds(spec: Spec, data_dir: str | None) -> Dataset:
    """Through `tfds.data_source` (array_record, random access; TensorFlow is not needed)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "--source tfds needs tensorflow-datasets: pip install 'jaxbench[tfds]'"
        ) from None
    absl = logging.getLogger("absl")  # tfds warns about metadata; our error says it in one line
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        splits = {
            split: tfds.data_source(spec.name, split=split, data_dir=data_dir, download=False)
            for split in ("train", "test")
        }
        classes = list(splits["train"].dataset_info.features["label"].names)
    except Exception as e:  # tfds raises many kinds; all mean "not prepared here"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"tfds has no prepared {spec.name} in array_record format ({first}); prepare "
            f"it with `tfds build {spec.name} --file_format=array_record` (needs "
            "TensorFlow), or use --source auto"
        ) from None
    finally:
        absl.setLevel(level)
    arrays = []
    for split, src in splits.items():
        n, where = len(src), f"tfds {spec.name}[{split}]"
        images = np.empty((n, 32, 32, 3), np.uint8)
        labels = np.empty(n, np.int32)
        for i in range(n):
            ex = src[i]
            img = np.asarray(ex["image"])
            if img.shape != (32, 32, 3) or img.dtype != np.uint8:
                raise DataError(
                    f"{where}[{i}] image is {img.dtype} {img.shape}, "
                    "expected uint8 (32, 32, 3); rebuild the tfds dataset"
                )
            images[i] = img
            labels[i] = int(ex["label"])
        _check_labels(labels, spec.n_classes, where, "rebuild the tfds dataset")
        arrays += [images, labels]
    return Dataset(spec.name, classes, *arrays, source=f"tfds {spec.name}")


def load_dataset(
    cfg: Config | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    source: str | None = None,
    cache: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = True,
) -> Dataset:
    """The dataset of `cfg` (keywords override it), subsets applied; DataError if wrong."""
    cfg = cfg or Config()
    if (name := dataset or cfg.dataset) not in SPECS:
        raise DataError(f"unknown dataset {name!r}; use --dataset {' or '.join(SPECS)}")
    spec = SPECS[name]
    source = source or cfg.source
    folder = data_dir or cfg.data_dir or os.environ.get("JAXBENCH_DATA_DIR") or None
    cache_root = Path(cache) if cache is not None else cache_dir()
    if source == "tfds":
        tfds_dir = data_dir or cfg.data_dir
        ds = _from_tfds(spec, str(tfds_dir) if tfds_dir else None)
    elif source == "auto":
        if folder is not None:
            ds = _from_folder(Path(folder).expanduser(), spec, cache_root)
        else:
            ds = _from_cache_or_download(spec, cache_root, download, progress)
    else:
        raise DataError(f"unknown source {source!r}; use --source auto or tfds")
    return take_subsets(ds, cfg.subset, cfg.test_subset)


def take_subsets(ds: Dataset, subset: int | None, test_subset: int | None) -> Dataset:
    """The first `subset` training and `test_subset` test images (None keeps all)."""
    for flag, n, have in (
        ("--subset", subset, len(ds.train_images)),
        ("--test-subset", test_subset, len(ds.test_images)),
    ):
        if n is not None and not 0 < n <= have:
            raise DataError(f"{flag} {n} is outside 1..{have} (the images {ds.name} has)")
    return dataclasses.replace(
        ds,
        train_images=ds.train_images[:subset],
        train_labels=ds.train_labels[:subset],
        test_images=ds.test_images[:test_subset],
        test_labels=ds.test_labels[:test_subset],
    )


# --- statistics and the command line ----------------------------------------------------------


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std in [0, 1] units, exact (integer histograms)."""
    flat = images.reshape(-1, images.shape[-1])
    values = np.arange(256, dtype=np.int64)
    means, stds = [], []
    for c in range(flat.shape[1]):
        hist = np.bincount(flat[:, c], minlength=256).astype(np.int64)
        n, s1, s2 = int(hist.sum()), int(hist @ values), int(hist @ values**2)
        means.append(s1 / n / 255.0)
        stds.append(float(np.sqrt((n * s2 - s1 * s1) / (n * n))) / 255.0)
    return means, stds


def summary(ds: Dataset) -> dict[str, Any]:
    """What the CLI prints with --json."""
    s: dict[str, Any] = {"train_count": len(ds.train_images), "test_count": len(ds.test_images)}
    s["classes"] = list(ds.classes)
    for split, images in (("train", ds.train_images), ("test", ds.test_images)):
        s[f"{split}_mean"], s[f"{split}_std"] = channel_stats(images)
    return s


def _per_class(labels: np.ndarray, n: int) -> str:
    counts = np.bincount(labels, minlength=n)
    lo, hi = int(counts.min()), int(counts.max())
    return f"{lo} per class" if lo == hi else f"{lo}..{hi} per class"


def _format(ds: Dataset, s: dict[str, Any]) -> str:
    def row(xs: list[float]) -> str:
        return " ".join(f"{x:.8f}" for x in xs)

    n = len(ds.classes)
    return "\n".join(
        [
            f"{ds.name}: verified, from {ds.source}",
            f"  train  {s['train_count']:>6} images, {_per_class(ds.train_labels, n)}",
            f"  test   {s['test_count']:>6} images, {_per_class(ds.test_labels, n)}",
            f"  classes ({n}): {', '.join(ds.classes)}",
            f"  train  mean {row(s['train_mean'])}  std {row(s['train_std'])}",
            f"  test   mean {row(s['test_mean'])}  std {row(s['test_std'])}",
        ]
    )


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    """`python -m jaxbench.data`: verify a dataset and print its counts and statistics."""
    return run_command(lambda cmd: _main(cmd, argv, out))


def _main(cmd: Command, argv: Sequence[str] | None, out: Callable[[str], None]) -> int:
    # a download in flight removes its temporary file as it unwinds
    cmd.on_stop = lambda word: f"{word}; nothing new kept in the cache"
    p = OneLineErrorParser(
        prog="python -m jaxbench.data",
        description="Verify CIFAR-10/100 and print counts, classes and per-channel statistics.",
    )
    p.add_argument(
        "--data-dir",
        help="folder with an official layout or archive "
        "(default: $JAXBENCH_DATA_DIR, then the cache, then a download)",
    )
    p.add_argument("--dataset", default="cifar10", choices=sorted(SPECS))
    p.add_argument("--source", default="auto", choices=("auto", "tfds"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--cache-dir",
        help="cache folder (default: $JAXBENCH_CACHE_DIR, "
        "$XDG_CACHE_HOME/jaxbench or ~/.cache/jaxbench)",
    )
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading")
    p.add_argument(
        "--clear-cache",
        action="store_true",
        help="delete the decoded arrays, the archives and any partial download in the cache, "
        "then exit",
    )
    args = p.parse_args(argv)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else cache_dir()
    if args.clear_cache:
        removed = clear_cache(cache)
        out(f"removed {len(removed)} item(s) from {cache}")
        return 0
    ds = load_dataset(
        Config(dataset=args.dataset, source=args.source),
        data_dir=args.data_dir,
        cache=cache,
        download=not args.no_download,
    )
    s = summary(ds)
    out(json.dumps(s) if args.json else _format(ds, s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run a selection of checks against the reference (or a plant) and collect the results."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from jaxbench.configs import Config
from jaxbench.threads import thread_settings
from parity.checks import CHECKS, CheckResult, Context, run_check, synthetic_dataset
from parity.plants import get_plant, planted_harness

FAST_CHECKS: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
ALL_CHECKS: tuple[int, ...] = tuple(CHECKS)
SAMPLE_IMAGES = 1024


@dataclass
class SuiteResult:
    """All results of one run, plus what the report needs to say how it was run."""

    results: list[CheckResult]
    config: Config
    quick: bool
    plant: str | None
    data_source: str
    seconds: float
    curves: dict[str, Any] = field(default_factory=dict)
    threads: dict[str, Any] = field(default_factory=dict)  # CPU thread limits in force

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def verdict(self) -> str:
        """One line: pass, fail, or for a plant whether the expected check caught it."""
        failed_checks = [r for r in self.results if not r.passed]
        failed = ", ".join(f"{r.number} ({r.name})" for r in failed_checks)
        if self.plant is not None:
            want, caught = get_plant(self.plant).check, f"plant {self.plant!r} caught by check"
            if any(r.number == want for r in failed_checks):
                return f"{caught} {failed}"
            if failed:
                return f"{caught} {failed}, not by check {want} as expected"
            return f"plant {self.plant!r} NOT caught (expected check {want})"
        return "all checks passed" if self.passed else f"FAILED: check {failed}"


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run PyTorch with n CPU threads, then restore (quick mode: one; on a shared 2-core CPU
    two threads measured 5x slower than one)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def load_data(data_dir: str | os.PathLike[str] | None, dataset: str = "cifar10") -> Any:
    """The real dataset from `data_dir` or $JAXBENCH_DATA_DIR, or None when neither is set."""
    folder = data_dir or os.environ.get("JAXBENCH_DATA_DIR")
    if not folder:
        return None
    from jaxbench.data import load_dataset  # looked up per call: tests replace it

    return load_dataset(Config(dataset=dataset), data_dir=folder, download=False, progress=False)


def parse_checks(text: str) -> tuple[int, ...]:
    """'1,2,5' or '1-6' -> (1, 2, 5) / (1, ..., 6), validated."""
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-"))
                out.extend(range(lo, hi + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise ValueError(f"--checks takes numbers like 1,2,5 or 1-6; got {text!r}") from None
    bad = [c for c in out if c not in CHECKS]
    if bad or not out:
        raise ValueError(f"--checks must name checks 1-{max(CHECKS)}; got {text!r}")
    return tuple(sorted(set(out)))


def run_suite(
    cfg: Config,
    *,
    quick: bool = True,
    data: Any = None,
    checks: Sequence[int] | None = None,
    plant: str | None = None,
    seeds: int | None = None,
    epochs: int | None = None,
    subset: int | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> SuiteResult:
    """Run `checks` (default: 1-7, or 1-6 under a plant) and return every result. Without
    `data` checks 2-6 use random images and check 7 fails. `threads`: PyTorch's (default 1 in
    quick mode); XLA's is set before JAX starts (`python -m parity --threads`)."""
    chosen = tuple(checks) if checks else (FAST_CHECKS if plant else ALL_CHECKS)
    sample = data if data is not None else synthetic_dataset(SAMPLE_IMAGES, 1)
    source = "synthetic (random)" if data is None else getattr(data, "source", "") or "CIFAR-10"
    harness = planted_harness(plant)
    ctx = Context(
        cfg,
        harness,
        quick=quick,
        images=np.asarray(sample.train_images[:SAMPLE_IMAGES]),
        labels=np.asarray(sample.train_labels[:SAMPLE_IMAGES]),
        data=data,
        seeds=seeds if seeds is not None else (3 if quick else 5),
        epochs=epochs,
        subset=subset,
        log=log,
    )
    results: list[CheckResult] = []
    t0 = time.perf_counter()
    torch_n = threads if threads is not None else (1 if quick else None)
    with harness.active(), _torch_threads(torch_n):
        thread_record = {"requested": threads, **thread_settings()}
        for number in chosen:
            log(f"check {number} ({CHECKS[number][0]}) ...")
            r = run_check(number, ctx)
            log(f"check {number} ({r.name}): {'pass' if r.passed else 'FAIL'} in {r.seconds:.1f} s")
            results.append(r)
    seconds = time.perf_counter() - t0
    return SuiteResult(results, cfg, quick, plant, source, seconds, ctx.curves, thread_record)

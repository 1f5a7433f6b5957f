"""Data parallelism: N devices and N processes train the same numbers as one device.

The multi-device runs use XLA's forced host devices and the multi-process runs two
processes on localhost with gloo collectives, so all of this runs on a CPU. The
tolerance is measured in the same run: one device with every batch shuffled (the
same mathematics in another float order, `parallel_probe.py`) shows how far
rounding alone moves the losses and weights in these steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PROBE = Path(__file__).with_name("parallel_probe.py")
ROOT = Path(__file__).resolve().parents[1]
NOISE_FACTOR = 10.0  # how many times the measured rounding noise a match may differ by
ULPS = 8  # plus this many float32 ulps of the compared values (a zero-noise floor)
# A small, gentle run: few enough steps that rounding has not grown into chaos yet.
PROBE_ARGS = ["epochs=1", "lr=0.1"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def _last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])  # gloo prints its own lines first


def _probe(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(PROBE), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _last_json(proc.stdout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def _gaps(run: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """Max |run - ref| of the per-step losses and of each parameter / BN statistic."""
    gaps = {"losses": float(np.abs(np.subtract(run["losses"], ref["losses"])).max())}
    for k, v in ref["leaves"].items():
        gaps[k] = float(np.abs(np.subtract(run["leaves"][k], v)).max())
    return gaps


def _bounds(ref: dict[str, Any], noise_runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per quantity: NOISE_FACTOR x the largest gap a reordered rerun showed, plus ULPS ulps."""
    noise = [_gaps(n, ref) for n in noise_runs]
    scale = {"losses": float(np.abs(ref["losses"]).max())}
    scale.update({k: float(np.abs(v).max()) for k, v in ref["leaves"].items()})
    eps = float(np.finfo(np.float32).eps)
    return {k: NOISE_FACTOR * max(n[k] for n in noise) + ULPS * eps * scale[k] for k in scale}


def _outside(run: dict[str, Any], ref: dict[str, Any], bounds: dict[str, float]) -> list[str]:
    """The quantities of `run` further from `ref` than their bound, worst first."""
    gaps = _gaps(run, ref)
    bad = [(gaps[k] / b, k) for k, b in bounds.items() if gaps[k] > b]
    return [f"{k}: {gaps[k]:.3g} > {bounds[k]:.3g}" for _, k in sorted(bad, reverse=True)]


GHOSTS = (0, 16)  # plain BN and ghost BN, both from one probe process
_PROBES: dict[int, dict[str, Any]] = {}


def _four_devices(ghost: int) -> dict[str, Any]:
    """One probe process with 4 forced CPU devices, for each of `GHOSTS`: 1 device, 2
    shuffled reruns, 4 devices with global BN, 4 devices with per-device BN (computed once
    per module)."""
    if not _PROBES:
        groups = [arg for g in GHOSTS for arg in ("+", f"ghost_bn={g}")]
        found = _probe("4", *PROBE_ARGS, *groups)
        _PROBES.update({g: found[f"ghost_bn={g}"] for g in GHOSTS})
    return _PROBES[ghost]


@pytest.fixture(params=[0, 16], ids=["bn", "ghost-bn"])
def four_devices(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _four_devices(request.param)


def test_four_devices_match_one(four_devices: dict[str, Any]) -> None:
    d = four_devices
    assert d["many"]["devices"] == 4 and d["one"]["devices"] == 1
    bounds = _bounds(d["one"], d["permuted"])
    assert not _outside(d["many"], d["one"], bounds)
    # the first step has no history to amplify rounding: a few ulps at most
    first = abs(d["many"]["losses"][0] - d["one"]["losses"][0])
    assert first <= bounds["losses"]


def test_only_small_all_reduces_cross_devices(four_devices: dict[str, Any]) -> None:
    """The compiled step keeps each device's share of the batch on it: the gradients and
    BN sums are all-reduced, and no image batch is gathered."""
    one, many = four_devices["one"]["collectives"], four_devices["many"]["collectives"]
    assert sum(one.values()) == 0
    assert many["all-reduce"] > 0
    assert many["all-gather"] == many["all-to-all"] == many["collective-permute"] == 0


def test_per_device_bn_is_caught(four_devices: dict[str, Any]) -> None:
    """`--bn-sync local` is a different recipe: the same check must reject it."""
    d = four_devices
    bad = _outside(d["local"], d["one"], _bounds(d["one"], d["permuted"]))
    assert any(b.startswith("losses") for b in bad), bad[:3]


def _members(n: int, args: list[str], port: int) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, str(PROBE), "member", f"localhost:{port}", str(n), str(i), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        for i in range(n)
    ]


@pytest.mark.xdist_group("test_parallel:four_devices")  # it reads the same probe
def test_two_processes_match_one_process() -> None:
    """Two processes on localhost (gloo), one device each, against one device."""
    port = _free_port()
    procs = _members(2, [*PROBE_ARGS, "ghost_bn=16"], port)
    single = _four_devices(16)  # its one-device runs: the same config in one process
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    run = _last_json(outs[0][0])["processes"]
    assert run["devices"] == 2
    assert not outs[1][0].strip().splitlines() or "{" not in outs[1][0]  # only process 0 reports
    assert not _outside(run, single["one"], _bounds(single["one"], single["permuted"]))


# --- the command line -------------------------------------------------------------------


def _train(args: list[str], devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return subprocess.run(
        [sys.executable, "-m", "jaxbench.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(XLA_FLAGS=flags),
        cwd=ROOT,
    )


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "devices", "words"),
    [
        (["--devices", "3", "--batch-size", "100"], 4, ["--batch-size 100", "3 devices"]),
        (["--devices", "8"], 4, ["--devices 8", "sees 4"]),
        (["--devices", "2", "--bn-sync", "fast"], 2, ["--bn-sync"]),
        (["--coordinator", "localhost:1234"], 1, ["--num-processes"]),
        (
            ["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"],
            1,
            ["--process-id 2", "0 .. 1"],
        ),
        (
            ["--coordinator", "nohost", "--num-processes", "2", "--process-id", "1"],
            1,
            ["HOST:PORT"],
        ),
    ],
    ids=["batch-not-divisible", "too-many-devices", "bad-bn-sync", "partial", "id-range", "addr"],
)
def test_bad_topology_is_one_line(
    args: list[str], devices: int, words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", "tiny", "--no-progress", *args]
    if devices == 1:  # this process sees one device: its own `main`, no new interpreter
        from jaxbench import train

        with pytest.raises(SystemExit) as stop:  # the trainer CLI exits 2 on bad input
            train.main(argv)
        proc = subprocess.CompletedProcess(argv, stop.value.code, *capsys.readouterr())
    else:
        proc = _train(argv, devices=devices, timeout=120)
    _one_line_error(proc, *words)


@pytest.mark.parametrize("pid", [0, 1], ids=["missing-peer", "no-coordinator"])
def test_unreachable_topology_stops_within_timeout(pid: int) -> None:
    """A coordinator nobody runs, or peers that never come: exit 2 after --dist-timeout,
    not JAX's abort and not a hang."""
    port = _free_port()
    args = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(pid)]
    t0 = time.monotonic()
    proc = _train(["--config", "tiny", "--dist-timeout", "3", *args], timeout=60)
    assert time.monotonic() - t0 < 45
    _one_line_error(proc, "3 s")


@pytest.mark.slow
def test_two_process_cli_writes_once(real_data_dir: Path, tmp_path: Path) -> None:
    """The CLI end to end on two processes: only process 0 writes, and it records the
    topology; the losses follow the one-process run's (a wrong shard would not)."""
    port = _free_port()
    small = ["--config", "tiny", "--subset", "512", "--test-subset", "200", "--epochs", "1"]
    small += ["--widths", "8,16,32,64", "--batch-size", "64", "--eval-batch-size", "100"]
    small += ["--data-dir", str(real_data_dir), "--no-progress"]
    out = tmp_path / "run"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxbench.train", *small, "--out", str(out)]
            + ["--coordinator", f"localhost:{port}", "--num-processes", "2"]
            + ["--process-id", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        for i in range(2)
    ]
    single = _train([*small, "--devices", "1", "--out", str(tmp_path / "single")])
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    assert "final val_acc" in outs[0][0] and "final val_acc" not in outs[1][0]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["devices"], summary["processes"]) == (2, 2)
    ref = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert ref["devices"] == 1
    losses, ref_losses = np.ravel(summary["step_losses"]), np.ravel(ref["step_losses"])
    assert len(losses) == len(ref_losses) == 8
    # Plumbing, not precision (the probe tests hold the precision): the first step's loss
    # comes from the same weights and images, so only one forward pass of rounding
    # (~1e-7) separates the two; half the images wrong moves it by ~1e-2.
    assert abs(losses[0] - ref_losses[0]) < 1e-4 * abs(ref_losses[0])

"""The sweep: grids refused before anything runs, runs.jsonl that survives a kill,
shards that merge into the unsharded sweep, and the figures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxbench import sweep
from jaxbench import sweep_workers as workers
from jaxbench.configs import get_config

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--config", "tiny", "--set", "subset=200", "test_subset=200", "epochs=1",
         "widths=8,8,8,8", "lr_peak_epoch=0.5"]  # fmt: skip


@pytest.mark.parametrize(
    "args,text",
    [
        (["--grid", "lrr=0.1"], "'lrr' is not a config field"),
        (["--grid", "lr=abc"], "lr='abc' is not a valid value"),
        (["--grid"], "expected at least one argument"),
        ([], "--grid is empty"),
        (["--grid", "lr"], "expected field=v1,v2"),
        (["--grid", "lr=0.1,0.1"], "appears twice"),
        (["--grid", "lr=0.2,"], "an empty value (a stray ',')"),
        (["--grid", "lr=,0.2"], "an empty value"),
        (["--grid", "lr=0.1,,0.2"], "an empty value"),
        (["--grid", "widths=8,8,8,8;"], "an empty value (a stray ';')"),
        (["--grid", "lr=0.1", "lr=0.2"], "names lr twice"),
        (["--grid", "batch_size=100,big"], "batch_size='big' is not a valid value"),
        (["--grid", "batch_size=0,100"], "grid cell batch_size=0"),
        (["--grid", "seed=1,2"], "--seeds"),
        (["--grid", "lr=0.1", "--shard", "2/2"], "--shard 2/2"),
        (["--grid", "lr=0.1", "--frameworks", "jax,mxnet"], "--frameworks"),
        (["--grid", "lr=0.1", "--set", "epochs"], "--set 'epochs'"),
        (["--grid", "lr=0.1", "--workers", "0"], "--workers must be at least 1"),
        (["--grid", "lr=0.1", "--workers", "4096"], "give at most"),
    ],
)
def test_bad_grids_are_one_line_before_anything_runs(
    args: list[str], text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    try:
        code = sweep.main(["--config", "tiny", "--out", str(out), *args])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and text in err, err
    assert not out.exists()


def test_plan_shards_are_disjoint_and_cover_it() -> None:
    base = get_config("tiny")
    grid = sweep.parse_grid(["batch_size=50,100,200", "lr=0.2,0.4", "widths=8,8,8,8;8,16,16,16"])
    assert grid["widths"] == [(8, 8, 8, 8), (8, 16, 16, 16)]
    full = sweep.plan(base, grid, seeds=2, frameworks=["jax", "torch"])
    assert len(full) == 3 * 2 * 2 * 2 * 2 and len({s.key for s in full}) == len(full)
    shards = [sweep.shard(full, i, 3) for i in range(3)]
    keys = [s.key for part in shards for s in part]
    assert sorted(keys) == sorted(s.key for s in full) and len(set(keys)) == len(keys)
    doc = {"grid": {k: [list(v) if isinstance(v, tuple) else v for v in vs]
                    for k, vs in grid.items()},
           "base": base.to_dict(), "seeds": 2, "frameworks": ["jax", "torch"]}  # fmt: skip
    assert sweep.planned_keys(doc) == [s.key for s in full]  # what --merge orders by


def test_a_line_cut_short_is_not_a_run(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    sweep.append_run(path, {"key": "a", "accuracy": 0.5})
    sweep.append_run(path, {"key": "b", "accuracy": 0.6})
    with open(path, "ab") as f:
        f.write(b'{"key": "c", "accur')  # the kill came mid-write
    assert [r["key"] for r in sweep.read_runs(path)] == ["a", "b"]
    assert path.read_bytes().endswith(b"\n") and len(path.read_bytes().splitlines()) == 2
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ValueError, match="line 2 is not a run"):
        sweep.read_runs(path)


def _signal_after_first_run(cmd: list[str], runs: Path, sig: int) -> tuple[int, str]:
    """Start the sweep `cmd`, send `sig` once runs.jsonl has a row; (exit code, stderr).
    SIGINT's default action is restored: a background job may inherit it ignored."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (runs.exists() and runs.read_bytes()):
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.realdata
def test_kill_then_rerun_finishes_without_redoing_or_duplicating(
    real_data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "jaxbench.sweep", *SMALL, "--grid", "lr=0.2,0.4",
           "--seeds", "2", "--data-dir", str(real_data_dir), "--out", str(out)]  # fmt: skip
    runs = out / "runs.jsonl"
    _signal_after_first_run(cmd, runs, signal.SIGKILL)
    before = runs.read_text().splitlines()
    assert 1 <= len(before) < 4, before
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"({len(before)} done before)" in res.stdout
    after = runs.read_text().splitlines()
    assert after[: len(before)] == before  # nothing redone or rewritten
    keys = [json.loads(r)["key"] for r in after]
    planned = sweep.planned_keys(json.loads((out / "sweep.json").read_text()))
    assert sorted(keys) == sorted(planned) and len(set(keys)) == 4
    assert all(json.loads(r)["status"] == "done" for r in after)


@pytest.mark.slow
@pytest.mark.realdata
def test_two_shards_merged_equal_the_unsharded_sweep(
    real_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [*SMALL, "--grid", "lr=0.2,0.4", "batch_size=50,100", "--data-dir",
              str(real_data_dir), "--no-progress"]  # fmt: skip
    for name, extra in (("all", []), ("s0", ["--shard", "0/2"]), ("s1", ["--shard", "1/2"])):
        assert sweep.main([*common, *extra, "--out", str(tmp_path / name)]) == 0
    merged = tmp_path / "merged"
    assert sweep.main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s1"),
                       "--out", str(merged)]) == 0  # fmt: skip

    def runs(folder: str) -> dict[str, float]:
        rows = sweep.read_runs(tmp_path / folder / "runs.jsonl")
        return {r["key"]: r["accuracy"] for r in rows}

    assert runs("merged") == runs("all") and len(runs("all")) == 4
    assert len(runs("s0")) == len(runs("s1")) == 2
    summary = json.loads((merged / "summary.json").read_text())
    assert summary["complete"] and summary["runs"] == 4
    assert (merged / "heatmap.png").stat().st_size > 1000
    table = (merged / "table.md").read_text().splitlines()
    accs = [float(line.split("|")[5].split("±")[0]) for line in table[2:]]
    assert accs == sorted(accs, reverse=True) and len(accs) == 4
    other = tmp_path / "other"  # a shard of another sweep (more seeds) does not merge
    other.mkdir()
    doc = json.loads((tmp_path / "s1" / "sweep.json").read_text())
    (other / "sweep.json").write_text(json.dumps({**doc, "seeds": 3}))
    capsys.readouterr()
    assert sweep.main(["--merge", str(tmp_path / "s0"), str(other),
                       "--out", str(tmp_path / "m2")]) == 2  # fmt: skip
    assert "a different sweep" in capsys.readouterr().err and not (tmp_path / "m2").exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_a_1d_grid_draws_lines(real_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = [*SMALL, "--grid", "lr=0.2,0.4", "--data-dir", str(real_data_dir), "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert sweep.main(args) == 0
    assert (out / "lines.png").stat().st_size > 1000 and not (out / "heatmap.png").exists()
    assert sweep.main(args) == 0  # everything done: nothing runs again
    assert len(sweep.read_runs(out / "runs.jsonl")) == 2


def test_vmapped_jax_runs_are_grouped_by_cell() -> None:
    grid = sweep.parse_grid(["lr=0.2,0.4"])
    full = sweep.plan(get_config("tiny"), grid, seeds=3, frameworks=["jax", "torch"])
    groups = sweep.batches(full, 2)
    jax_groups = [g for g in groups if g[0].framework == "jax"]
    assert [len(g) for g in jax_groups] == [2, 1, 2, 1]
    assert all(len({s.cell for s in g}) == 1 for g in jax_groups)
    assert all(len(g) == 1 for g in groups if g[0].framework == "torch")
    assert sorted(s.key for g in groups for s in g) == sorted(s.key for s in full)


@pytest.mark.slow
@pytest.mark.realdata
def test_a_vmapped_sweep_records_every_seed(real_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = [*SMALL, "--grid", "lr=0.2,0.4", "--seeds", "2", "--vmap-seeds", "2",
            "--data-dir", str(real_data_dir), "--out", str(out), "--no-progress"]  # fmt: skip
    assert sweep.main(args) == 0
    rows = sweep.read_runs(out / "runs.jsonl")
    assert len(rows) == 4 and all(r["vmap_seeds"] == 2 and r["status"] == "done" for r in rows)
    assert sorted(r["key"] for r in rows) == sorted(
        sweep.planned_keys(json.loads((out / "sweep.json").read_text()))
    )
    assert len({r["accuracy"] for r in rows}) > 1


# --- --workers: several sweep processes on one machine ---------------------------------------


def test_workers_split_cores_and_devices() -> None:
    items = list(range(5))
    parts = [workers.split(items, i, 3) for i in range(3)]
    assert parts == [[0, 1], [2, 3], [4]]
    env = workers.worker_env(1, 2, {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["PATH"] == "/bin"
    cpus = [int(c) for c in env["JAXBENCH_WORKER_CPUS"].split(",")]
    assert cpus == workers.split(workers.usable_cpus(), 1, 2)
    assert env["PJRT_NPROC"] == env["OMP_NUM_THREADS"] == str(len(cpus))
    assert "CUDA_VISIBLE_DEVICES" not in workers.worker_env(0, 1, {})
    if len(workers.usable_cpus()) >= 2:
        with pytest.raises(ValueError, match="lists 1 device"):
            workers.check_workers(2, {"CUDA_VISIBLE_DEVICES": "0"})
    argv = ["--grid", "lr=0.1", "--workers", "2", "--overwrite", "--workers=3", "--no-progress"]
    assert workers.child_argv(argv) == ["--grid", "lr=0.1"]


def test_a_run_is_claimed_once_and_a_worker_keeps_its_program(tmp_path: Path) -> None:
    claims = workers.Claims(tmp_path)
    assert claims.claim("run a") and not claims.claim("run a") and claims.claim("run b")
    full = sweep.plan(get_config("tiny"), sweep.parse_grid(["lr=0.2,0.4"]), 2, ["jax", "torch"])
    groups = sweep.batches(full, 1)
    # after jax lr=0.2 seed 0, the same program's next seed comes first, not torch's run
    assert groups[1][0].framework == "torch"
    i = workers.prefer_same_program(groups[1:], ("jax", groups[0][0].cell))
    assert groups[1:][i][0] == sweep.RunSpec("jax", groups[0][0].cell, 1)
    assert workers.prefer_same_program(groups, None) == 0


def _append_many(path: str, tag: str, n: int) -> None:
    for i in range(n):
        sweep.append_run(Path(path), {"key": f"{tag}{i}", "pad": tag * 20_000})


def test_concurrent_appends_never_interleave(tmp_path: Path) -> None:
    """Rows far larger than an atomic pipe write, appended by four processes at once."""
    path = tmp_path / "runs.jsonl"
    code = "import sys; from tests.test_sweep import _append_many as a; a(*sys.argv[1:3], 40)"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path), tag], cwd=ROOT) for tag in "abcd"
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    rows = sweep.read_runs(path, repair=False)
    assert sorted(r["key"] for r in rows) == sorted(f"{t}{i}" for t in "abcd" for i in range(40))


needs_two_cores = pytest.mark.skipif(
    len(workers.usable_cpus()) < 2, reason="--workers 2 needs two CPU cores"
)


@needs_two_cores
@pytest.mark.slow
@pytest.mark.realdata
def test_two_workers_share_the_sweep_and_a_rerun_resumes_it(
    real_data_dir: Path, tmp_path: Path
) -> None:
    """Kill the parent mid-sweep: its workers stop too; the same command finishes the grid
    with every run once, both workers having trained some, each on its own core."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "jaxbench.sweep", *SMALL, "--grid", "lr=0.2,0.4",
           "--frameworks", "jax,torch", "--workers", "2",
           "--data-dir", str(real_data_dir), "--out", str(out), "--no-progress"]  # fmt: skip
    runs = out / "runs.jsonl"
    _signal_after_first_run(cmd, runs, signal.SIGKILL)
    time.sleep(3)  # the workers get SIGTERM from the kernel when their parent dies
    before = runs.read_text().splitlines()
    assert 1 <= len(before) < 4, before
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[4/4]" in res.stdout, res.stdout
    rows = sweep.read_runs(runs)
    keys = [r["key"] for r in rows]
    planned = sweep.planned_keys(json.loads((out / "sweep.json").read_text()))
    assert sorted(keys) == sorted(planned) and len(set(keys)) == 4
    assert all(r["status"] == "done" for r in rows)
    assert {r["worker"] for r in rows} == {"0/2", "1/2"}
    assert all(r["cpus"] == len(workers.split(workers.usable_cpus(), 0, 2)) for r in rows)
    assert (out / "heatmap.png").exists() or (out / "lines.png").exists()
    assert json.loads((out / "summary.json").read_text())["complete"]


def test_runs_skip_monitoring_evaluations_unless_asked() -> None:
    """runs.jsonl keeps the final accuracy only: no per-epoch evaluations by default."""

    def base(*extra: str) -> int:
        args = sweep.build_parser().parse_args(["--config", "tiny", "--out", "x", *extra])
        return sweep.sweep_plan(args)[0].eval_every

    assert get_config("tiny").eval_every == 1
    assert base("--grid", "lr=0.2,0.4") == get_config("tiny").epochs
    assert base("--grid", "epochs=2,5") == 5
    assert base("--grid", "lr=0.2", "--set", "eval_every=1") == 1
    assert base("--grid", "eval_every=1,2") == 1


@needs_two_cores
@pytest.mark.slow
@pytest.mark.realdata
def test_ctrl_c_to_the_parent_stops_its_workers(real_data_dir: Path, tmp_path: Path) -> None:
    """SIGINT to the parent alone (as `kill -INT`): it interrupts its workers, waits for
    them, writes the summary of what finished and exits 130; nothing lands afterwards."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "jaxbench.sweep", *SMALL, "subset=4000", "epochs=2",
           "--grid", "lr=0.2,0.4,0.8", "--seeds", "2", "--workers", "2",
           "--frameworks", "jax,torch", "--data-dir", str(real_data_dir), "--out", str(out),
           "--no-progress"]  # fmt: skip
    runs = out / "runs.jsonl"
    code, err = _signal_after_first_run(cmd, runs, signal.SIGINT)
    assert code == 130, err[-2000:]
    assert "the same command continues the sweep" in err
    rows = runs.read_text()
    time.sleep(5)
    assert runs.read_text() == rows  # no worker left behind
    done = sweep.read_runs(runs)
    assert 1 <= len(done) < 12 and all(r["status"] == "done" for r in done)
    assert (out / "summary.json").exists()


def test_stopped_before_the_first_run_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    """No summary, table or figure of zero runs; a new folder's files go, an old sweep.json
    is restored; with a run done, the summary of it is written."""
    new = tmp_path / "new"
    new.mkdir()
    (new / sweep.SPEC).write_text("{}")
    (new / workers.WORKERS_DIR / "claims").mkdir(parents=True)
    line = sweep.stopped(new, "interrupted", set(), None)
    assert line == f"interrupted before the first run; nothing written to {new}"
    assert list(new.iterdir()) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / sweep.SPEC).write_bytes(b'{"old": 1}')
    (old / "notes.txt").write_text("mine")
    before = {p.name for p in old.iterdir()}
    (old / sweep.SPEC).write_text("{}")
    assert "nothing written" in sweep.stopped(old, "terminated", before, b'{"old": 1}')
    assert (old / sweep.SPEC).read_bytes() == b'{"old": 1}'
    assert sorted(p.name for p in old.iterdir()) == sorted(before)

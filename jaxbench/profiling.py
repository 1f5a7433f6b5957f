"""Profiles of the timed epochs, for both frameworks: each its own trace (viewable in
https://ui.perfetto.dev) and the same top-operations table (`rank`) in its summary, so two
frameworks' hot spots read side by side without a viewer."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TOP_N = 15


def rank(totals: dict[str, tuple[float, int]], n: int = TOP_N) -> list[dict[str, Any]]:
    """Rows {name, seconds, calls, share} for the `n` operations with the most time, from
    name -> (seconds, calls); `share` is of every operation's sum."""
    whole = sum(s for s, _ in totals.values())
    rows = []
    for name, (sec, calls) in sorted(totals.items(), key=lambda kv: kv[1][0], reverse=True)[:n]:
        share = float(sec / whole) if whole > 0 else 0.0
        rows.append({"name": name, "seconds": float(sec), "calls": int(calls), "share": share})
    return rows


def format_top_ops(rows: Iterable[dict[str, Any]], title: str) -> str:
    """A plain-text table of `rank`'s rows, one line per operation."""
    rows = list(rows)
    if not rows:
        return title + "\n  (no operations recorded)"
    width = min(max(len(r["name"]) for r in rows), 60)
    lines = [title, f"  {'operation':<{width}}  {'ms':>9}  {'calls':>7}  {'share':>6}"]
    for r in rows:
        name = r["name"] if len(r["name"]) <= width else r["name"][: width - 1] + "…"
        lines.append(
            f"  {name:<{width}}  {1e3 * r['seconds']:9.2f}  {r['calls']:7d}  "
            f"{100 * r['share']:5.1f}%"
        )
    return "\n".join(lines)


def read_chrome_trace(path: str | Path) -> list[dict[str, Any]]:
    """The events of a Chrome/Perfetto JSON trace (`.json` or `.json.gz`)."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    doc = json.loads(raw)
    return doc["traceEvents"] if isinstance(doc, dict) else list(doc)


def self_times(events: Iterable[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """Per name, (self seconds, calls) of complete ("X") events: each nested event's time
    counted once, its duration less its direct children's on the same thread."""
    by_thread: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e and "ts" in e:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack: list[list[Any]] = []  # [end_us, name, child_us]
        for e in evs:
            ts, dur = float(e["ts"]), float(e["dur"])
            while stack and stack[-1][0] <= ts:
                _close(stack.pop(), totals)
            if stack:
                stack[-1][2] += dur
            stack.append([ts + dur, str(e.get("name", "?")), 0.0, dur])
        while stack:
            _close(stack.pop(), totals)
    return {k: (v[0], int(v[1])) for k, v in totals.items()}


def _close(frame: list[Any], totals: dict[str, list[float]]) -> None:
    _, name, child_us, dur = frame
    entry = totals[name]
    entry[0] += max(dur - child_us, 0.0) * 1e-6
    entry[1] += 1


def xla_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events of XLA's executed operations in a JAX trace: an accelerator's
    `/device:...` processes, or the CPU's `tf_XLA...` threads less the executor's waits."""
    procs: dict[Any, str] = {}
    threads: dict[tuple[Any, Any], str] = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e.get("pid")] = str(e.get("args", {}).get("name", ""))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    devices = {pid for pid, name in procs.items() if "/device:" in name}
    if devices:
        return [e for e in events if e.get("pid") in devices]
    return [
        e
        for e in events
        if threads.get((e.get("pid"), e.get("tid")), "").startswith("tf_XLA")
        and "wait for completion" not in str(e.get("name", ""))  # a runtime wait, not an op
    ]


class JaxProfile:
    """`jax.profiler` from the first `start()` to `finish()` (it cannot pause, so monitoring
    evaluations appear too), into `folder/plugins/profile/<time>/`; then the table."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.running = False
        self.started = False

    def start(self) -> None:
        if self.started:
            return
        import jax

        self.folder.mkdir(parents=True, exist_ok=True)
        jax.profiler.start_trace(str(self.folder), create_perfetto_trace=True)
        self.running = self.started = True

    def pause(self) -> None:
        """A marker only: see the class docstring."""

    def finish(self) -> dict[str, Any]:
        """Stop the trace; {"trace": path, "tensorboard_dir": folder, "top_ops": rows}."""
        import jax

        if self.running:
            jax.profiler.stop_trace()
            self.running = False
        traces = sorted(self.folder.glob("plugins/profile/*/perfetto_trace.json.gz"))
        if not traces:
            return {"trace": None, "tensorboard_dir": str(self.folder), "top_ops": []}
        trace = max(traces, key=lambda p: p.stat().st_mtime)
        rows = rank(self_times(xla_events(read_chrome_trace(trace))))
        return {"trace": str(trace), "tensorboard_dir": str(self.folder), "top_ops": rows}

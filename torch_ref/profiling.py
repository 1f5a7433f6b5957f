"""`python -m torch_ref.train --profile DIR`: a Chrome trace and a table of top operations.

`DIR/torch-trace.json` opens in https://ui.perfetto.dev; the table has the columns of
`python -m jaxbench.train --profile`, ranked by self CPU time on a CPU and by kernel device
time on CUDA. Only the timed training is recorded, not the evaluations between epochs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity

from jaxbench.profiling import rank

TRACE_NAME = "torch-trace.json"


class TorchProfile:
    """One profiler from the first `start()` to `finish()`; collection is off while paused."""

    def __init__(self, folder: str | os.PathLike[str], device: torch.device) -> None:
        self.folder = Path(folder)
        self.cuda = device.type == "cuda"
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof: torch.profiler.profile | None = None
        self.collecting = False

    def start(self) -> None:
        if self.prof is None:
            self.prof = torch.profiler.profile(activities=self.activities)
            self.prof.start()
        elif not self.collecting:
            self.prof.toggle_collection_dynamic(True, self.activities)
        self.collecting = True

    def pause(self) -> None:
        """Stop collecting until the next `start()` (call after the device has synchronised)."""
        if self.prof is not None and self.collecting:
            self.prof.toggle_collection_dynamic(False, self.activities)
            self.collecting = False

    def _stop(self, prof: torch.profiler.profile) -> None:
        if not self.collecting:
            prof.toggle_collection_dynamic(True, self.activities)  # stop() expects it on
        prof.stop()
        self.collecting = False

    def abort(self) -> None:
        """Stop without writing anything (the run failed)."""
        if self.prof is not None:
            self._stop(self.prof)
            self.prof = None

    def finish(self) -> dict[str, Any]:
        """Stop; write `<folder>/torch-trace.json` atomically; {"trace": path, "top_ops": rows}."""
        if self.prof is None:
            return {"trace": None, "top_ops": []}
        self._stop(self.prof)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / TRACE_NAME
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".torch-trace-", suffix=".json")
        os.close(fd)
        try:
            self.prof.export_chrome_trace(tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)  # gone once replaced
        return {"trace": str(path), "top_ops": rank(op_totals(self.prof, cuda=self.cuda))}


def op_totals(prof: torch.profiler.profile, *, cuda: bool) -> dict[str, tuple[float, int]]:
    """{op name: (self seconds, calls)}: CPU ops' self CPU time, or CUDA events' device time."""
    totals: dict[str, tuple[float, int]] = {}
    for evt in prof.key_averages():
        is_device = evt.device_type != torch.autograd.DeviceType.CPU
        if cuda != is_device:
            continue
        us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        if us <= 0:
            continue
        sec, calls = totals.get(evt.key, (0.0, 0))
        totals[evt.key] = (sec + us * 1e-6, calls + int(evt.count))
    return totals

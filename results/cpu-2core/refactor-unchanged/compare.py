"""Compare every non-time field of metrics.jsonl and summary.json between two run trees."""

import json
import sys
from pathlib import Path

TIME = {
    "total_time_seconds",
    "compile_seconds",
    "images_per_second",
    "environment",
    "started",
    "updated",
    "out",
    "profile",
    "warmup_ran",
    "compiled",
}


ADDED: set[str] = set()  # config fields new in "after", with their values


def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if k not in TIME}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


def diff(a, b, path=""):
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a and path.endswith("/config"):
                ADDED.add(f"{k}={b[k]!r}")  # a config field added since: its default is listed
            elif k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'after' if k in b else 'before'}")
            else:
                out += diff(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += diff(x, y, f"{path}[{i}]")
    elif a != b:
        out.append(f"{path}: {str(a)[:60]} != {str(b)[:60]}")
    return out


before, after = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
ok_all = True
for run in sorted(p.name for p in before.iterdir() if p.is_dir()):
    res = {}
    for f in ("metrics.jsonl", "summary.json"):
        pa, pb = before / run / f, after / run / f
        if not pb.exists():
            res[f] = ["missing after"]
            continue
        if f.endswith(".jsonl"):
            a = [json.loads(l) for l in pa.read_text().splitlines() if l.strip()]
            b = [json.loads(l) for l in pb.read_text().splitlines() if l.strip()]
        else:
            a, b = json.loads(pa.read_text()), json.loads(pb.read_text())
        res[f] = diff(strip(a), strip(b))
    ok = not any(res.values())
    ok_all &= ok
    fin = json.loads((before / run / "summary.json").read_text())["final"]
    differences = {k: v[:10] for k, v in res.items() if v}
    rows.append({"run": run, "identical": ok, "differences": differences, "final_before": fin})
    verdict = "identical" if ok else "DIFFERENT"
    print(
        f"{run:28s} {verdict}  ema_val_acc={fin['ema_val_acc']} train_loss={fin['train_loss']:.10f}"
    )
    for k, v in res.items():
        for line in v[:10]:
            print("   ", k, line)
if len(sys.argv) > 3:
    report = {"all_identical": ok_all, "config_fields_added": sorted(ADDED), "runs": rows}
    Path(sys.argv[3]).write_text(json.dumps(report, indent=1) + "\n")
if ADDED:
    print("config fields added since (not differences):", ", ".join(sorted(ADDED)))
sys.exit(0 if ok_all else 1)

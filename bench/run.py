"""The benchmark runner: every case of every operator, a table, and a JSON of rows.

    python -m bench [--quick] [--op topn_create] [--shape paper] [--out bench/results]

Each row: op, provider, shape, direction, ms (median), ms_p20, ms_p80, gbps (forward only),
pct_peak (gbps against a memory copy measured in the same run), device, versions, commit.
Speed-ups are ratios against "eager" (the reference) and "compile" (torch.compile of the
reference) measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from . import timing
from . import topn_create as topn_bench

DIRECTIONS = ("fwd", "fwd+bwd")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name in ("triton", "pykeops"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "absent"
    return out


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_topn_create(args, device, peak_gbps, common, progress) -> list[dict]:
    rows = []
    shapes = [s for s in topn_bench.SHAPES if args.shape in (None, s.name)]
    for shape in shapes:
        inputs, n, n_max, nbytes = topn_bench.make_case(shape, device)
        for direction in DIRECTIONS:
            for provider, fn in topn_bench.providers(device).items():
                progress(f"topn_create {shape.name} {direction} {provider}")
                call = topn_bench.make_call(fn, inputs, n, n_max, direction)
                t = timing.time_fn(call, device, args.budget)
                gbps = nbytes / (t.ms * 1e-3) / 1e9 if direction == "fwd" else None
                rows.append({
                    "op": "topn_create", "provider": provider, "shape": shape.name,
                    "direction": direction, "ms": t.ms, "ms_p20": t.ms_p20, "ms_p80": t.ms_p80,
                    "gbps": gbps, "pct_peak": None if gbps is None else 100 * gbps / peak_gbps,
                    "params": {"B": shape.batch, "n0": shape.n0, "n": shape.n, "a": shape.a,
                               "d": shape.d, "dtype": "float32"},
                    **common,
                })  # fmt: skip
    return rows


def format_table(rows: list[dict]) -> str:
    base = {(r["op"], r["shape"], r["direction"], r["provider"]): r["ms"] for r in rows}
    header = ("op", "shape", "direction", "provider", "ms", "p20-p80", "GB/s", "%peak",
              "vs eager", "vs compile")  # fmt: skip
    lines = [header]
    for r in rows:
        key = (r["op"], r["shape"], r["direction"])
        ratio = {p: base.get((*key, p), float("nan")) / r["ms"] for p in ("eager", "compile")}
        lines.append((
            r["op"], r["shape"], r["direction"], r["provider"], f"{r['ms']:.3f}",
            f"{r['ms_p20']:.3f}-{r['ms_p80']:.3f}",
            "" if r["gbps"] is None else f"{r['gbps']:.2f}",
            "" if r["pct_peak"] is None else f"{r['pct_peak']:.1f}",
            f"{ratio['eager']:.2f}x", f"{ratio['compile']:.2f}x",
        ))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--op", choices=["topn_create"], default=None, help="one operator only")
    parser.add_argument("--shape", default=None, help="one named shape only")
    parser.add_argument("--quick", action="store_true", help="short timing budget (smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.budget = 0.1 if args.quick else 1.0
    device = torch.device(args.device)

    def progress(message: str) -> None:
        print(f"  running {message} ...", file=sys.stderr, flush=True)

    peak = timing.copy_bandwidth_gbps(device, args.budget)
    common = {
        "device": _device_name(device),
        "versions": _versions(),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(f"device: {common['device']}; memory copy {peak:.1f} GB/s (read + write)")
    rows = []
    if args.op in (None, "topn_create"):
        rows += run_topn_create(args, device, peak, common, progress)

    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "latest.json"
    path.write_text(json.dumps({"copy_gbps": peak, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")

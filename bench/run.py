"""The benchmark runner: every case of every operator, then a table, JSON rows and a plot.

    python -m bench [--quick] [--op topn_create ...] [--shape paper ...] [--out bench/results]

Writes <out>/<date>_<commit>.json (a list of rows: op, provider, shape, direction, ms, ms_p20,
ms_p80, gbps, pct_peak, peak_bytes, params, device, versions, commit, date) and its plot,
<out>/<date>_<commit>.png; a later run of the same commit on the same day replaces them.
``python -m bench.report`` prints and redraws the newest (bench.report.latest). GB/s is a
forward's bytes over its median time; %peak compares it with a memory copy measured in the same
run. "vs eager" and "vs compile" are speed-ups against the reference and torch.compile of the
reference, "vs best baseline" against the fastest of what a user would write instead
(report.USER_BASELINES: those two, torch.compile of the plain formulation, dense cdist,
geomloss), all measured in the same run. On CPU the run ends with the CPU targets
(topn_create.cpu_targets, losses.cpu_targets): met or not, and by how much.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from . import cases as cases_module
from . import losses, memory, report, setvae_epoch, timing, topn_create
from .registry import OPS, all_cases


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
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout

    try:
        # results written by an earlier run don't change the code being measured
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
        dirty = dirty.strip()
        return git("rev-parse", "--short", "HEAD").strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def in_turns(cases: list[cases_module.Case]) -> list[list[cases_module.Case]]:
    """The cases cut into groups timed together: consecutive heavy cases of one operator,
    shape and direction with several timed calls each and no context of their own (the
    providers of one epoch benchmark) form one group, timed in turns; every other case is a
    group of its own."""
    groups: list[list[cases_module.Case]] = []
    for case in cases:
        last = groups[-1][-1] if groups else None
        if (
            last is not None
            and case.heavy
            and last.heavy
            and case.repeats > 1
            and case.repeats == last.repeats
            and case.context is contextlib.nullcontext
            and last.context is contextlib.nullcontext
            and (case.op, case.shape, case.direction) == (last.op, last.shape, last.direction)
        ):
            groups[-1].append(case)
        else:
            groups.append([case])
    return groups


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--op", choices=OPS, nargs="+", help="these operators only")
    parser.add_argument("--shape", nargs="+", help="these named shapes only")
    parser.add_argument("--quick", action="store_true", help="a short timing budget: smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=report.RESULTS)
    args = parser.parse_args(argv)
    budget = 0.1 if args.quick else 1.0
    device = torch.device(args.device)

    wanted = [c for c in all_cases(device) if args.op is None or c.op in args.op]
    cases = [c for c in wanted if args.shape is None or c.shape in args.shape]
    if not cases:
        parser.error(f"no case matches --op {args.op} --shape {args.shape}")
    copy_gbps = timing.copy_bandwidth_gbps(device, budget)
    common = {
        "device": _device_name(device),
        "versions": _versions(),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": copy_gbps,
    }
    print(f"{common['device']}: memory copy {copy_gbps:.1f} GB/s (bytes read + written)")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{common['date'][:10]}_{common['commit']}"
    rows: list[dict] = []
    failed: list[str] = []
    try:
        _measure(cases, device, budget, common, copy_gbps, rows, failed, stem)
    except KeyboardInterrupt:  # a time limit (SIGINT): keep the rows measured so far
        print(f"interrupted: {len(rows)} rows of {len(cases)} cases measured", file=sys.stderr)
        interrupted = True
    else:
        interrupted = False

    print(report.table(rows))
    if device.type == "cpu":
        targets = (
            topn_create.cpu_targets(rows)
            + losses.cpu_targets(rows)
            + setvae_epoch.cpu_targets(rows)
        )
        targets = [t for t in targets if t["measured"] is not None]
        if targets:
            print("CPU targets:")
            print(cases_module.format_targets(targets))
    report.write_json(rows, stem.with_suffix(".json"))
    if rows:
        report.plot(rows, stem.with_suffix(".png"))
        print(f"wrote {stem}.json and {stem}.png")
    else:
        print(f"wrote {stem}.json (no rows)")
    if failed:
        print(f"{len(failed)} case(s) failed: {', '.join(failed)}", file=sys.stderr)
    if interrupted:
        sys.exit(130)
    if failed:
        sys.exit(1)


def _measure(
    cases: list[cases_module.Case],
    device: torch.device,
    budget: float,
    common: dict,
    copy_gbps: float,
    rows: list[dict],
    failed: list[str],
    stem: Path,
) -> None:
    """Times the cases in turns, appending to ``rows`` and rewriting ``stem``.json after each
    group, so that an interrupted run keeps what it measured. A group that raises is reported
    and skipped, the ids of its cases appended to ``failed``."""
    done = 0
    for group in in_turns(cases):
        for case in group:
            done += 1
            print(
                f"[{done:>{len(str(len(cases)))}}/{len(cases)}] {case.id}",
                file=sys.stderr,
                flush=True,
            )
        try:
            rows.extend(_time_group(group, device, budget, copy_gbps, common))
        except Exception as err:  # one failing case must not cost the rows of the others
            failed.extend(case.id for case in group)
            print(f"FAILED {', '.join(c.id for c in group)}: {err!r}", file=sys.stderr)
        report.write_json(rows, stem.with_suffix(".json"))


def _time_group(
    group: list[cases_module.Case],
    device: torch.device,
    budget: float,
    copy_gbps: float,
    common: dict,
) -> list[dict]:
    """The rows of one group of cases (in_turns), timed."""
    calls = [case.build() for case in group]
    if len(group) > 1:  # heavy cases of one shape, several calls each: timed in turns
        measured = timing.time_in_turns_with_peak(
            calls, device, memory.peak_bytes, group[0].repeats
        )
    else:
        (case,), (call,) = group, calls
        with case.context():
            if case.heavy:  # few calls: their formulas were compiled by the smaller shapes
                measured = [
                    timing.time_once_with_peak(call, device, memory.peak_bytes, case.repeats)
                ]
            else:
                t = timing.time_fn(call, device, budget)
                measured = [(t, memory.peak_bytes(call, device))]
    rows = []
    for case, (t, peak) in zip(group, measured, strict=True):
        gbps = None if case.nbytes is None else case.nbytes / (t.ms * 1e-3) / 1e9
        pct_peak = None if gbps is None else 100 * gbps / copy_gbps
        labels = {key: getattr(case, key) for key in ("op", "provider", "shape", "direction")}
        values = {**asdict(t), "gbps": gbps, "pct_peak": pct_peak, "peak_bytes": peak}
        rows.append({**labels, **values, "params": case.params, **common})
    return rows

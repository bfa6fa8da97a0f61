"""Benchmark outputs: the terminal table, the JSON rows and the plot, and the newest results.

Each run of ``python -m bench`` writes ``bench/results/<date>_<commit>.json`` and ``.png``;
``latest()`` finds the newest of them. ``python -m bench.report [JSON or folder]`` prints the
table of a results file (default: the newest in bench/results) and redraws its plot beside it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

BASELINES = ("eager", "compile")
# what a user would write instead of this library: the fastest of them is "best baseline"
USER_BASELINES = (
    "eager",
    "compile",
    "compile_plain",
    "compile_ro",
    "cdist",
    "geomloss_online",
    "geomloss_tensorized",
)
RESULTS = Path(__file__).parent / "results"
COLUMNS = ("op", "shape", "direction", "provider", "ms", "p20-p80", "GB/s", "%peak", "peak MB")
RATIOS = (*BASELINES, "best baseline", "fastest")  # the speed-up columns: "vs eager", ...


def _speedups(rows: list[dict]) -> list[dict[str, float]]:
    """Per row, ms of each baseline (of the fastest user baseline, and of the fastest provider)
    of the same (op, shape, direction) / the row's ms."""
    ms = {(r["op"], r["shape"], r["direction"], r["provider"]): r["ms"] for r in rows}
    fastest: dict[tuple, float] = {}
    best: dict[tuple, float] = {}
    for r in rows:
        key = (r["op"], r["shape"], r["direction"])
        fastest[key] = min(fastest.get(key, math.inf), r["ms"])
        if r["provider"] in USER_BASELINES:
            best[key] = min(best.get(key, math.inf), r["ms"])
    out = []
    for r in rows:
        key = (r["op"], r["shape"], r["direction"])
        ratios = {b: ms.get((*key, b), math.nan) / r["ms"] for b in BASELINES}
        ratios["best baseline"] = best.get(key, math.nan) / r["ms"]
        ratios["fastest"] = fastest[key] / r["ms"]
        out.append(ratios)
    return out


def _ratio(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.2f}x"


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _pad(cells, widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def table(rows: list[dict]) -> str:
    lines = [(*COLUMNS, *(f"vs {name}" for name in RATIOS))]
    for r, speedup in zip(rows, _speedups(rows), strict=True):
        peak = r.get("peak_bytes")
        numbers = (
            f"{r['ms']:.3f}",
            f"{r['ms_p20']:.3f}-{r['ms_p80']:.3f}",
            _number(r["gbps"], ".1f"),
            _number(r["pct_peak"], ".0f"),
            _number(None if peak is None else peak / 2**20, ".1f"),
        )
        ratios = (_ratio(speedup[name]) for name in RATIOS)
        lines.append((r["op"], r["shape"], r["direction"], r["provider"], *numbers, *ratios))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = [_pad(line, widths) for line in lines]
    text.insert(1, _pad(["-" * w for w in widths], widths))
    return "\n".join(text)


def write_json(rows: list[dict], path: Path) -> None:
    path.write_text(json.dumps(rows, indent=1) + "\n")


def read_json(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text())


def latest(directory: Path = RESULTS) -> Path:
    """The newest results JSON of ``directory`` (``<date>_<commit>.json``, as ``python -m
    bench`` names them): the one whose run started last (the rows' UTC ``date``; the file
    name breaks ties). Its plot is the same path with ``.png``."""
    paths = sorted(Path(directory).glob("????-??-??_*.json"))
    if not paths:
        raise FileNotFoundError(f"no <date>_<commit>.json results in {directory}")

    def started(path: Path) -> str:
        rows = read_json(path)
        return rows[0]["date"] if rows else ""

    return max(paths, key=lambda path: (started(path), path.name))


def plot(rows: list[dict], path: Path) -> None:
    """One panel per operator: per shape and direction, the providers' median ms side by side
    (log scale), with p20-p80 whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(
        len(ops), 1, figsize=(11, 4.2 * len(ops)), squeeze=False, layout="constrained"
    )
    for ax, op in zip(axes[:, 0], ops, strict=True):
        mine = [r for r in rows if r["op"] == op]
        groups = list(dict.fromkeys((r["shape"], r["direction"]) for r in mine))
        providers = list(dict.fromkeys(r["provider"] for r in mine))
        width = 0.8 / len(providers)
        for k, provider in enumerate(providers):
            xs, ms, err = [], [], [[], []]
            for g, (shape, direction) in enumerate(groups):
                for r in mine:
                    if (r["shape"], r["direction"], r["provider"]) == (shape, direction, provider):
                        xs.append(g - 0.4 + (k + 0.5) * width)
                        ms.append(r["ms"])
                        err[0].append(r["ms"] - r["ms_p20"])
                        err[1].append(r["ms_p80"] - r["ms"])
            ax.bar(xs, ms, width, yerr=err, label=provider, capsize=2)
        ax.set_xticks(range(len(groups)), [f"{s}\n{d}" for s, d in groups])
        ax.set_yscale("log")
        ax.set_ylabel("ms (median, log scale)")
        ax.set_title(op)
        ax.legend(fontsize=8, ncol=len(providers))
        ax.grid(axis="y", alpha=0.3, which="both")
    r0 = rows[0]
    title = f"{r0['device']} | torch {r0['versions']['torch']} | commit {r0['commit']}"
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="Print the table of a results JSON and redraw its plot (same name, .png).",
    )
    parser.add_argument(
        "path",
        nargs="?",
        type=Path,
        default=RESULTS,
        help="a results JSON, or a folder whose newest results JSON to use (default: %(default)s)",
    )
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    path = latest(args.path) if args.path.is_dir() else args.path
    rows = read_json(path)
    print(f"{path}:")
    print(table(rows))
    if not args.no_plot:
        plot(rows, path.with_suffix(".png"))
        print(f"redrew {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

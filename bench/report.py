"""Benchmark outputs: the terminal table, the JSON rows and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

BASELINES = ("eager", "compile")


def _speedups(rows: list[dict]) -> list[dict[str, float]]:
    """Per row, ms of each baseline (and of the fastest provider) of the same (op, shape,
    direction) / the row's ms."""
    ms = {(r["op"], r["shape"], r["direction"], r["provider"]): r["ms"] for r in rows}
    fastest: dict[tuple, float] = {}
    for r in rows:
        key = (r["op"], r["shape"], r["direction"])
        fastest[key] = min(fastest.get(key, math.inf), r["ms"])
    out = []
    for r in rows:
        key = (r["op"], r["shape"], r["direction"])
        ratios = {b: ms.get((*key, b), math.nan) / r["ms"] for b in BASELINES}
        ratios["fastest"] = fastest[key] / r["ms"]
        out.append(ratios)
    return out


def _ratio(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.2f}x"


def table(rows: list[dict]) -> str:
    header = ("op", "shape", "direction", "provider", "ms", "p20-p80", "GB/s", "%peak",
              "peak MB", "vs eager", "vs compile", "vs fastest")  # fmt: skip
    lines = [header]
    for r, speedup in zip(rows, _speedups(rows), strict=True):
        peak = r.get("peak_bytes")
        lines.append((
            r["op"], r["shape"], r["direction"], r["provider"], f"{r['ms']:.3f}",
            f"{r['ms_p20']:.3f}-{r['ms_p80']:.3f}",
            "" if r["gbps"] is None else f"{r['gbps']:.1f}",
            "" if r["pct_peak"] is None else f"{r['pct_peak']:.0f}",
            "" if peak is None else f"{peak / 2**20:.1f}",
            _ratio(speedup["eager"]), _ratio(speedup["compile"]), _ratio(speedup["fastest"]),
        ))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in lines]  # fmt: skip
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def write_json(rows: list[dict], path: Path) -> None:
    path.write_text(json.dumps(rows, indent=1) + "\n")


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
    fig.suptitle(f"{r0['device']} | torch {r0['versions']['torch']} | commit {r0['commit']}",
                 fontsize=9)  # fmt: skip
    fig.savefig(path, dpi=110)
    plt.close(fig)

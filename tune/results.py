"""The sweep's result in the paper's shape: axis value -> probe top-1, mean +- std over seeds.

`trial_rows` reads Tune's ResultGrid into one row per trial; `summarize` groups them by grid point;
`to_markdown`, `write_json` and `plot` render the table (the PNG: probe val/test top-1 against the
first axis, one line per combination of the other axes, error bars = std over seeds).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def trial_rows(
    grid, axis_keys: Sequence[str], unfinished: set[str] | frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """One row per trial of a Tune ResultGrid: its axis values, seed, status (done, failed,
    stopped by the scheduler, or unfinished: a folder name in `unfinished`) and scores."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        cfg = result.config or {}
        if result.error is not None:
            status = "failed"
        elif m.get("phase") == "probe":
            status = "done"
        elif Path(str(result.path)).name in unfinished:
            status = "unfinished"
        else:
            status = "stopped"  # the scheduler ended it before the step budget
        rows.append({
            "point": {k: cfg.get(k) for k in axis_keys},
            "seed": cfg.get("seed"),
            "status": status,
            "val_top1": m.get("val_top1") if status == "done" else None,
            "top1": m.get("top1") if status == "done" else None,
            "loss": m.get("loss"),
            "step": m.get("step"),
            "run_id": m.get("run_id"),
            "error": None if result.error is None else str(result.error).strip().splitlines()[-1][:300],
        })
    return rows


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarize(rows: list[dict[str, Any]], points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per grid point (in grid order): mean/std of val and test top-1 over its finished
    seeds, and how many seeds finished, failed or were stopped."""
    out = []
    for point in points:
        mine = [r for r in rows if r["point"] == point]
        done = [r for r in mine if r["status"] == "done"]
        val_mean, val_std = _mean_std([r["val_top1"] for r in done])
        test_mean, test_std = _mean_std([r["top1"] for r in done])
        out.append({
            "point": point,
            "val_top1_mean": val_mean, "val_top1_std": val_std,
            "top1_mean": test_mean, "top1_std": test_std,
            "seeds_done": len(done),
            "seeds_failed": sum(r["status"] == "failed" for r in mine),
            "seeds_stopped": sum(r["status"] == "stopped" for r in mine),
        })
    return out


def _pct(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if n > 1 else "")


def to_markdown(summary: list[dict[str, Any]], axis_names: dict[str, str], kind: str = "linear") -> str:
    """| block_size | order | probe val top-1 (%) | probe test top-1 (%) | seeds |"""
    keys = list(axis_names)
    head = [axis_names[k] for k in keys] + [f"{kind} probe val top-1 (%)", f"{kind} probe test top-1 (%)",
                                            "seeds done", "failed", "stopped"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        n = s["seeds_done"]
        cells = [str(s["point"][k]) for k in keys] + [
            _pct(s["val_top1_mean"], s["val_top1_std"], n), _pct(s["top1_mean"], s["top1_std"], n),
            str(n), str(s["seeds_failed"]), str(s["seeds_stopped"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps(clean(payload), indent=2, default=str))


def plot(path: Path, summary: list[dict[str, Any]], axis_names: dict[str, str], title: str) -> None:
    """Probe top-1 (%) against the first axis; one line (val solid, test dashed) per combination
    of the other axes; error bars: std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(axis_names)
    first, rest = keys[0], keys[1:]
    xs = list(dict.fromkeys(s["point"][first] for s in summary))  # in grid order
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for s in summary:
        groups.setdefault(tuple(s["point"][k] for k in rest), []).append(s)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for g, entries in groups.items():
        label = ", ".join(f"{axis_names[k]}={v}" for k, v in zip(rest, g))
        for metric, style in (("val_top1", "-o"), ("top1", "--s")):
            pos, ys, es = [], [], []
            for e in entries:
                if e[f"{metric}_mean"] is not None:
                    pos.append(xs.index(e["point"][first]))
                    ys.append(100 * e[f"{metric}_mean"])
                    es.append(100 * (e[f"{metric}_std"] or 0.0))
            if pos:
                which = "val" if metric == "val_top1" else "test"
                ax.errorbar(pos, ys, yerr=es, fmt=style, capsize=4,
                            label=f"{label} ({which})" if label else which)
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_xlabel(axis_names[first])
    ax.set_ylabel("probe top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no point probed (every trial failed): no legend
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no trial was probed", transform=ax.transAxes, ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

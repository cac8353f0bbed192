#!/usr/bin/env python
"""Charts from the scale benchmark's figures: `bench/scale.py --json-out bench/data/NAME.json` writes
them, this turns every bench/data/*.json into two PNGs (matplotlib; `pip install -e '.[bench]'`):

    python bench/plot.py                       # bench/data/*.json -> bench/scaling.png, bench/lag.png
    python bench/plot.py --data DIR --out DIR

- scaling.png: jobs/s (whole run, and steady 10th-90th percentile) against worker processes, one
  line per file whose runs were at zero inference latency (the throughput runs);
- lag.png: the distribution of the lag behind the provider (finished_at minus the moment the
  provider had the result), one cumulative curve per run with a non-zero latency, the issue-13
  targets (p95 <= 1 s with defaults, <= 0.3 s with webhooks) as lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(data_dir: Path) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(data_dir.glob("*.json")):
        try:
            docs.append((path.stem, json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            print(f"skipped {path}: {exc}")
    return docs


def edit_worker_runs(doc: dict) -> list[dict]:
    return [r for r in doc.get("results", []) if r.get("kind") == "edit-worker" and not r.get("timed_out")]


def plot_scaling(docs: list[tuple[str, dict]], out: Path) -> bool:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for name, doc in docs:
        runs = sorted((r for r in edit_worker_runs(doc) if r.get("latency") == 0), key=lambda r: r["workers"])
        if not runs:
            continue
        xs = [r["workers"] for r in runs]
        ax.plot(xs, [r["jobs_per_s"] for r in runs], marker="o", label=f"{name}: jobs/s (drain)")
        steady = [r.get("steady_jobs_per_s") for r in runs]
        if all(v is not None for v in steady):
            ax.plot(xs, steady, marker="s", linestyle="--", label=f"{name}: steady jobs/s")
        for r in runs:
            ax.annotate(
                f"{1000 * r['cpu_s_per_job']:.1f} ms CPU/job",
                (r["workers"], r["jobs_per_s"]),
                fontsize=7,
                xytext=(4, -10),
                textcoords="offset points",
            )
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xticks(sorted({r["workers"] for _, doc in docs for r in edit_worker_runs(doc) if r.get("latency") == 0}))
    ax.set_xlabel("worker processes")
    ax.set_ylabel("jobs per second")
    ax.set_title("Throughput at zero provider latency (bench/scale.py)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_lag(docs: list[tuple[str, dict]], out: Path) -> bool:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for name, doc in docs:
        for r in edit_worker_runs(doc):
            # Log axis: a lag at or below 10 ms (or a tiny negative one, clock granularity) shows at 10 ms.
            lags = sorted(max(x, 0.01) for x in (r.get("lags") or []))
            if not lags or not r.get("latency"):
                continue
            ys = [(i + 1) / len(lags) for i in range(len(lags))]
            p95 = r["lag"]["p95"]
            label = f"{name} ({r['jobs']} jobs x {r['latency']:g}s{', webhooks' if r.get('webhooks') else ''}): p95 {p95:.2f}s"
            ax.plot(lags, ys, label=label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    for target, text in ((1.0, "target p95 <= 1 s (defaults)"), (0.3, "target p95 <= 0.3 s (webhooks)")):
        ax.axvline(target, color="grey", linestyle=":", linewidth=1)
        ax.text(target, 0.55, text, rotation=90, fontsize=7, va="bottom", ha="left")
    ax.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(left=0.01)
    ax.set_xlabel("lag behind the provider, seconds (finished_at - provider result time)")
    ax.set_ylabel("share of jobs")
    ax.set_title("Lag behind the provider, cumulative (bench/scale.py)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=HERE / "data", help="folder of scale.py --json-out files (default bench/data)")
    p.add_argument("--out", type=Path, default=HERE, help="where the PNGs go (default bench/)")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    docs = load(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, fn in (("scaling.png", plot_scaling), ("lag.png", plot_lag)):
        target = args.out / name
        print(f"{target}: {'written' if fn(docs, target) else 'no runs of that kind in ' + str(args.data)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

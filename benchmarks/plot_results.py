"""Charts of the benchmark JSON files: kernel speedups and the training-step breakdown.

    python benchmarks/plot_results.py --ops bench_ops.json --step bench_step.json --out charts/

--ops (benchmarks/bench_ops.py --json): one bar per benchmark case, our kernel's speedup over the PyTorch reference
  (and over torch.compile of the reference where it was measured), log scale -> kernel_speedups.png
--step (benchmarks/bench_step.py --json [--breakdown]): ms per step of every variant, stacked by kernel category
  when the breakdown was recorded (GPU idle time on top) -> step_breakdown.png
Prints the paths it wrote. Titles carry the device and versions from the files' "environment" entry.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ORDER = ["convolution", "matmul", "attention", "normalization", "elementwise+other", "matching+loss", "optimizer",
         "idle", "python+other"]


def _env_line(env) -> str:
    if isinstance(env, dict):
        return ", ".join(f"{k} {v}" for k, v in env.items() if k in ("device", "torch", "cuda"))
    return str(env).splitlines()[0] if env else ""


def plot_ops(doc: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r.get("ours_ms") and r.get("reference_ms")]
    if not rows:
        raise ValueError("no row with both reference_ms and ours_ms in the ops file")
    labels = [" ".join(str(r[k]) for k in ("op", "case", "dtype", "pass") if r.get(k)) for r in rows]
    ref = [r["reference_ms"] / r["ours_ms"] for r in rows]
    comp = [r["compiled_ref_ms"] / r["ours_ms"] if r.get("compiled_ref_ms") else None for r in rows]
    fig, ax = plt.subplots(figsize=(13, 0.3 * len(rows) + 1.5))
    ys = list(range(len(rows)))
    ax.barh([y - 0.2 for y in ys], ref, height=0.4, label="vs reference")
    cy = [y + 0.2 for y, c in zip(ys, comp) if c]
    if cy:
        ax.barh(cy, [c for c in comp if c], height=0.4, label="vs torch.compile(reference)")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of our kernel (x, log scale)")
    ax.set_title(f"kernel speedups ({_env_line(doc.get('environment'))})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_step(doc: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    if not rows:
        raise ValueError("no variant in the step file")
    names = [r["variant"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if all("breakdown_ms" in r for r in rows):
        cats = [c for c in ORDER if any(c in r["breakdown_ms"] for r in rows)]
        cats += sorted({k for r in rows for k in r["breakdown_ms"]} - set(cats) - {"step"})
        # scale each profile to the timed ms/step (profiling adds overhead; the shares are what it measures)
        bottom = [0.0] * len(rows)
        for cat in cats:
            vals = []
            for r in rows:
                b = r["breakdown_ms"]
                scale = r["ms_per_step"] / b["step"] if b.get("step") else 1.0
                vals.append(b.get(cat, 0.0) * scale)
            ax.bar(names, vals, bottom=bottom, label=cat, hatch="//" if cat in ("idle", "python+other") else None)
            bottom = [a + v for a, v in zip(bottom, vals)]
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.bar(names, [r["ms_per_step"] for r in rows])
    for x, r in enumerate(rows):
        ax.text(x, r["ms_per_step"], f"{r['ms_per_step']:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per training step")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)  # long variant names would overlap
    batch = doc.get("batch")
    ax.set_title(f"training step{' (batch %d, up to %dx%d)' % tuple(batch) if batch else ''}\n"
                 f"{_env_line(doc.get('environment'))}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default="", help="bench_ops.py JSON")
    ap.add_argument("--step", default="", help="bench_step.py JSON")
    ap.add_argument("--out", default=".", help="folder for the PNG files")
    a = ap.parse_args(argv)
    if not a.ops and not a.step:
        ap.error("give --ops and/or --step")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.ops:
        print(plot_ops(json.loads(Path(a.ops).read_text()), out / "kernel_speedups.png"))
    if a.step:
        print(plot_step(json.loads(Path(a.step).read_text()), out / "step_breakdown.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

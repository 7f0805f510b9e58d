"""Training curves: the per-epoch log (output_dir/log.jsonl) drawn as a loss / AP figure (PNG, Agg backend)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def read_log(path: str | os.PathLike) -> list[dict]:
    """Records of log.jsonl in epoch order; when an epoch appears twice (a resumed run) the later record wins."""
    by_epoch: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            rec = json.loads(line)
            by_epoch[int(rec["epoch"])] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_curves(log_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Left: train loss (total and its ce / bbox / giou terms) per epoch; right: AP and AP50 of the evaluated
    epochs. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_log(log_path)
    epochs = [r["epoch"] + 1 for r in recs]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train_loss", "-"), ("train_loss_ce", "--"), ("train_loss_bbox", "--"),
                       ("train_loss_giou", "--")):
        pts = [(e, r[key]) for e, r in zip(epochs, recs) if key in r]
        if pts:
            ax_loss.plot(*zip(*pts), style, marker="o", markersize=3, label=key.replace("train_", ""))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    for key in ("AP", "AP50", "AP75"):
        pts = [(e, r[key]) for e, r in zip(epochs, recs) if key in r]
        if pts:
            ax_ap.plot(*zip(*pts), marker="o", label=key)
    ax_ap.set_xlabel("epoch")
    ax_ap.set_ylabel("COCO metric")
    ax_ap.set_ylim(0, 1)
    ax_ap.set_title("validation AP")
    ax_ap.grid(alpha=0.3)
    if ax_ap.lines:
        ax_ap.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png

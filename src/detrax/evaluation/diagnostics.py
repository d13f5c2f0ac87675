"""`detrax eval`'s diagnostics, written beside metrics.json: per_class.json (AP, AP50, AR and ground-truth count of
each class), pr.png (each class's precision-recall curve at IoU 0.5), thresholds.json (the F1-best score
threshold per class and overall, which `detrax predict --threshold auto` reads), confusion.json and
confusion.png (at the overall threshold: true classes against predicted ones, with missed objects and spurious
detections), errors.json (the kinds of error at that threshold). Numbers: `analysis` (pycocotools' own state)
and `confusion`."""

from __future__ import annotations

import json
import os

from detrax.evaluation import analysis, confusion

FILES = ("per_class.json", "pr.png", "thresholds.json", "confusion.json", "confusion.png", "errors.json")


def diagnose(ev, gt: dict, results: list[dict], out_dir: str) -> dict:
    """Write the diagnostics of a box evaluation (`ev`: COCOeval after accumulate, of `results` against `gt`)
    into `out_dir`; returns them."""
    rows = analysis.per_class(ev)
    cuts = analysis.thresholds(ev)
    score = cuts["overall"]["threshold"]
    score = 0.5 if score is None else score
    matrix = confusion.confusion(gt, results, score, ev.params.imgIds)
    errors = confusion.error_kinds(gt, results, score, ev.params.imgIds)
    os.makedirs(out_dir, exist_ok=True)
    for name, value in (("per_class", rows), ("thresholds", cuts), ("confusion", matrix), ("errors", errors)):
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(value, f, indent=1)
    _plot_pr(analysis.pr_curves(ev), rows, os.path.join(out_dir, "pr.png"))
    _plot_confusion(matrix, os.path.join(out_dir, "confusion.png"))
    return {"per_class": rows, "thresholds": cuts, "confusion": matrix, "errors": errors}


def table(rows: list[dict]) -> str:
    """The per-class numbers as a text table, for the terminal."""
    width = max([len("class"), *(len(r["name"]) for r in rows)])
    lines = [f"{'class':<{width}}  {'gt':>6}  {'AP':>6}  {'AP50':>6}  {'AR':>6}"]
    for r in rows:
        cells = "  ".join(f"{100 * r[k]:6.1f}" if r[k] >= 0 else f"{'-':>6}" for k in ("AP", "AP50", "AR"))
        lines.append(f"{r['name']:<{width}}  {r['gt']:>6}  {cells}")
    return "\n".join(lines)


def auto_thresholds(path: str) -> dict:
    """{category id: threshold} from a thresholds.json (`diagnose`): each class's, the overall one for a class
    without its own."""
    try:
        with open(path) as f:
            cuts = json.load(f)
        overall = cuts["overall"]["threshold"]
        found = {int(k): overall if v["threshold"] is None else float(v["threshold"])
                 for k, v in cuts["per_class"].items()}
        return {k: v for k, v in found.items() if v is not None}
    except FileNotFoundError:
        raise ValueError(f"--threshold auto: {path} is missing; `detrax eval` of the run writes it") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--threshold auto: {path} is not a thresholds file ({type(e).__name__}: {e})") from None


def _plot_pr(curves: dict, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recall = curves["recall"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        precision = [max(p, 0.0) for p in curves[r["id"]]]
        ax.plot(recall, precision, label=f"{r['name']} (AP50 {100 * max(r['AP50'], 0):.1f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="precision-recall at IoU 0.5")
    if len(rows) <= 20:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_confusion(m: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.array(m["matrix"])
    n = len(counts)
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * n, 1.2 + 0.45 * n))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(n), [*m["classes"], "missed"], rotation=90)
    ax.set_yticks(range(n), [*m["classes"], "background"])
    ax.set(xlabel="predicted", ylabel="true", title=f"score >= {m['score']:.2f}")
    if n <= 30:
        for (i, j), v in np.ndenumerate(counts):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > counts.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

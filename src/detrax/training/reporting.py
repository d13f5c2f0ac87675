"""What a training run shows: a live progress bar, JSON-lines metrics, TensorBoard events, PNG plots."""

from __future__ import annotations

import json
import os
import sys
import time

from detrax.errors import TrainingError

SHOWN = ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice", "class_error")


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without PyTorch: where PyTorch is installed, tensorboardX's writer
    imports it (only to accept torch tensors, which detrax never logs), 1.3-6 s of every training run's start.
    A process that has PyTorch already keeps it."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError meanwhile
        try:
            from tensorboardX import SummaryWriter
        finally:
            if sys.modules.get("torch", 0) is None:
                del sys.modules["torch"]
    return SummaryWriter


class Reporter:
    def __init__(self, workdir: str, total_steps: int, steps_per_epoch: int, batch_size: int, enabled: bool = True,
                 stream=None):
        self.workdir, self.total, self.per_epoch, self.batch = workdir, total_steps, steps_per_epoch, batch_size
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last: dict = {}
        self.t0, self.step0 = time.time(), 0
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)

    def _writer(self, purge_step: int | None = None):
        if self._tb is None:
            self._tb = _summary_writer()(os.path.join(self.workdir, "tensorboard"), purge_step=purge_step)
        return self._tb

    def begin(self, step: int, kind: str, record: dict, changes: list[str], redo_eval: bool = False):
        """The metrics log rewound to `step` (rows of a killed run's steps after its checkpoint are dropped: the
        resumed run logs them again, and with `redo_eval` its evaluation of `step` too; TensorBoard is told to purge
        its events from `step` on), then a row of `kind` (start or resume) with what the run started from."""
        if not self.enabled:
            return
        self._writer(purge_step=step)
        path = os.path.join(self.workdir, "metrics.jsonl")
        if os.path.exists(path):
            rows = [(line, json.loads(line)) for line in open(path) if line.endswith("}\n")]
            kept = [line for line, r in rows if r["step"] <= step and step > 0
                    and not (redo_eval and r["step"] == step and r["kind"] in ("eval", "eval_ema"))]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "epoch": step / max(1, self.per_epoch), "kind": kind,
                                "time": time.time(), "record": record, "changes": changes}) + "\n")

    def start(self, step: int):
        self.t0, self.step0 = time.time(), step

    def log(self, step: int, kind: str, metrics: dict):
        """Append to metrics.jsonl and TensorBoard (`kind` is train or eval)."""
        if not self.enabled:
            return
        row = {"step": step, "epoch": step / max(1, self.per_epoch), "kind": kind, "time": time.time(),
               **{k: float(v) for k, v in metrics.items()}}
        path = os.path.join(self.workdir, "metrics.jsonl")
        try:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise TrainingError(f"{path}: the metrics of step {step} could not be written ({e}); the last checkpoint "
                                "is intact: free space or fix the folder, then --resume") from e
        tb = self._writer()
        for k, v in metrics.items():
            tb.add_scalar(f"{kind}/{k}", float(v), step)
        tb.flush()
        if kind == "train":
            self.last = {k: float(metrics[k]) for k in SHOWN if k in metrics}
        else:
            name = "eval (ema)" if kind == "eval_ema" else kind
            self.line(f"{name} at step {step}: " + " ".join(f"{k} {float(v):.3f}" for k, v in metrics.items()))

    def progress(self, step: int):
        """The bar: epoch, step, loss terms, images per second, ETA."""
        if not self.enabled:
            return
        done = step - (self.step0 or 0)
        elapsed = max(time.time() - self.t0, 1e-9)
        rate = done / elapsed
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * step / max(1, self.total))
        terms = " ".join(f"{k.replace('loss_', '')} {v:.3f}" for k, v in self.last.items())
        epoch = max(step - 1, 0) // max(1, self.per_epoch) + 1  # the epoch of the step just done
        text = (f"epoch {epoch} [{'#' * filled}{'.' * (width - filled)}] "
                f"{step}/{self.total} {terms} | {rate * self.batch:.1f} img/s | ETA {_hms(eta)}")
        if self.tty:
            self.stream.write("\r" + text[:200] + "\x1b[K")
        elif step % max(1, self.per_epoch) == 0 or step == self.total:
            self.stream.write(text + "\n")
        self.stream.flush()

    def line(self, text: str):
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()
        if self.enabled and self.tty:
            self.stream.write("\n")


def _hms(seconds: float) -> str:
    if seconds == float("inf"):
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


def plot(workdir: str) -> list[str]:
    """losses.png (training terms against steps) and ap.png (eval AP curves), from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = [json.loads(line) for line in open(path)]
    written = []
    for kind, keys, name in (("train", ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"),
                              "losses.png"),
                             ("eval", ("AP", "AP50", "AP75"), "ap.png"), ("eval", ("PQ", "PQ_th", "PQ_st"), "pq.png")):
        sel = [r for r in rows if r["kind"] == kind and any(k in r for k in keys)]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for k in keys:  # and the weights' moving average's evaluation (train.ema_decay), dashed
            for which, style in ((kind, "-"), ("eval_ema", "--") if kind == "eval" else (None, "")):
                pts = [(r["step"], r[k]) for r in rows if r["kind"] == which and k in r]
                if pts:
                    ax.plot(*zip(*pts), style, label=k + (" (ema)" if which == "eval_ema" else ""),
                            marker="o" if kind == "eval" else None)
        ax.set_xlabel("step")
        ax.set_title(f"{kind} ({os.path.basename(os.path.abspath(workdir))})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, name))
        plt.close(fig)
        written.append(os.path.join(workdir, name))
    return written

"""Resume from any moment, end to end through the CLI: a `demo`-preset run of 40 steps on a COCO-format set that
detrax did not generate (discs and squares of 23 categories drawn here with PIL), SIGKILLed twice (the first kill
before any checkpoint: the preset writes one every 500 steps, so only the last one exists) and resumed, against
the same run straight through. Prints whether the final weights and frozen statistics are bitwise equal, and the
wall time of the killed-and-resumed run over the straight one (the relaunches' start-up and compiles).

    .venv/bin/python benchmarks/bench_resume.py [--steps 40] [--kills 12,28]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import record


def write_foreign_set(root: str, n: int, split: str, seed: int) -> None:
    """A COCO-format split of coloured discs and squares, 23 categories (ids 1..23), PNG images."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    os.makedirs(f"{root}/{split}", exist_ok=True)
    os.makedirs(f"{root}/annotations", exist_ok=True)
    images, anns = [], []
    for i in range(n):
        h, w = int(rng.integers(100, 200)), int(rng.integers(100, 200))
        im = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 5))):
            c = int(rng.integers(1, 24))
            bw, bh = int(rng.integers(10, w // 2)), int(rng.integers(10, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            colour = ((c * 37) % 255, (c * 91) % 255, (c * 53) % 255)
            (draw.ellipse if c % 2 else draw.rectangle)([x, y, x + bw, y + bh], fill=colour)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
        im.save(f"{root}/{split}/img{i:04d}.png")
        images.append({"id": i + 1, "file_name": f"img{i:04d}.png", "height": h, "width": w})
    with open(f"{root}/annotations/instances_{split}.json", "w") as f:
        json.dump({"images": images, "annotations": anns,
                   "categories": [{"id": c, "name": f"thing{c}"} for c in range(1, 24)]}, f)


def last_logged(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return max([json.loads(line)["step"] for line in f if line.endswith("}\n") and '"train"' in line], default=0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--kills", default="12,28", help="logged steps after which to SIGKILL the run")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    from detrax.models.detr import weight_arrays
    from detrax.weights.checkpoint import load_run

    root = args.workdir or tempfile.mkdtemp(prefix="resume-")
    data = os.path.join(root, "data")
    write_foreign_set(data, 96, "train", 1)
    write_foreign_set(data, 16, "val", 2)

    def command(workdir, resume):
        return [sys.executable, "-m", "detrax.cli", "train", "--config", "demo", "--data", data, "--workdir", workdir,
                f"steps={args.steps}", *(["--resume"] if resume else [])]  # the class count follows the data

    t0 = time.time()
    r = subprocess.run(command(os.path.join(root, "straight"), False), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    straight_s = time.time() - t0
    workdir, kills, t0 = os.path.join(root, "killed"), [], time.time()
    for i, at in enumerate(int(k) for k in args.kills.split(",")):
        proc = subprocess.Popen(command(workdir, i > 0), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and last_logged(workdir) < at:
            time.sleep(0.02)
        ckpts = sorted(os.listdir(os.path.join(workdir, "checkpoints"))) if os.path.isdir(
            os.path.join(workdir, "checkpoints")) else []
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        kills.append({"after_step": last_logged(workdir), "checkpoints": [c for c in ckpts if c.isdigit()]})
        print(f"SIGKILL after step {kills[-1]['after_step']}; committed checkpoints then: {kills[-1]['checkpoints']}")
    r = subprocess.run(command(workdir, True), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_s = time.time() - t0
    print(f"last launch's first line: {r.stderr.splitlines()[0]}")
    a = {k: np.asarray(v) for k, v in weight_arrays(load_run(os.path.join(root, "straight"))).items()}
    b = {k: np.asarray(v) for k, v in weight_arrays(load_run(workdir)).items()}
    equal = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    diff = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    cpu = record.cpu()
    print(f"{cpu}: {len(a)} arrays (weights and frozen statistics) bitwise equal: {equal} (max |diff| {diff}); "
          f"killed and resumed / straight wall time {resumed_s / straight_s:.2f} ({resumed_s:.0f} s vs "
          f"{straight_s:.0f} s)")
    record.finish({"cpu": cpu, "steps": args.steps, "kills": kills, "bitwise_equal": equal, "max_abs_diff": diff,
                   "arrays": len(a), "straight_s": round(straight_s, 1), "killed_and_resumed_s": round(resumed_s, 1),
                   "ratio_wall_time": round(resumed_s / straight_s, 2)})


if __name__ == "__main__":
    main()

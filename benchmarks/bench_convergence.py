"""How fast a preset learns a new dataset: steps to val AP50 0.3 and 0.5, and AP50 after a fixed budget, for plain
DETR and each training option, over seeds (the spread matters as much as the mean), on two synthetic datasets
of different sizes and class sets that the project generates:

- shapes: `write_dataset`'s rectangles, ellipses and triangles (ids 1-3) at the demo's 128x160;
- varied: `write_varied_dataset`'s diamonds, crosses and rings (ids 7, 15, 23) of mixed image sizes, with crowd
  regions and empty images;
- foreign (not in the default `--sets`): `foreign_set.py`'s, written apart from detrax's generators, harder (class
  by shape only, textured backgrounds, images up to 320 pixels): a stand-in for a user's folder.

    .venv/bin/python benchmarks/bench_convergence.py [--sets shapes varied] [--seeds 0 1 2] [--steps 1800 6000]
        [--variant NAME:key=value,key=value ...] [--preset demo] [--base-until STEP] [--out /tmp/bench_convergence]
        [--resume] [--results NAME]

Each variant is the preset with its overrides (default: `plain` = the official DETR's training, without the
preset's training-only aids: one query group, no denoising, no encoder head, with three times the set's budget;
`aids` = the preset as it is). A variant's `train.steps=N` is its budget, `train.steps=Kx` K times the set's.
Evaluations about every `--eval-steps`. `--resume` keeps the runs in `--out`: a finished run is read back, a cut
one continues from its last checkpoint (detrax's `--resume`), one recorded with another config starts again.
`--base-until STEP` runs the first variant only as far as a ratio against it needs: each seed stops (with a
checkpoint) once it passes AP50 0.5, or at STEP, its schedule still its budget's; its AP50 at the end is then at
the stop. Plain DETR's seeds at three times the aids' median steps to 0.5 settle the goal's third either way.

A variant with `train.ema_decay` also reports the moving average's AP50 at the end against the raw weights' (the
same run), and one with `train.keep_best` the best kept against the last evaluation (in-sample: the best is chosen
on the val split it is measured on).

Prints the CPU model, a line per run, a table per set and last one JSON object: per set and variant the budget,
the steps to 0.3 / 0.5 per seed (null: not reached), the median (a seed that did not get there counts as later
than any that did; null unless most did), AP50 at the end (mean, min, max), minutes (the backbone's warm-up included, a
resumed run's without the time it was cut), and each variant's ratio of median steps to 0.5 against the first
variant's (or, where the first did not get there in its budget, the bound `ratio_steps_to_0.5_below`).
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import threading

import record

PRESETS = {"shapes": "demo", "varied": "small", "foreign": "small"}
# the aids' step budget per set: foreign `small`'s own; varied the 6000 its figures were measured at
BUDGETS = {"shapes": 1800, "varied": 6000, "foreign": 18000}
# the official DETR's training (the encoder head off, its loss weight at the default, no backbone warm-up: the same
# config as before the presets set them, so `--resume` reads back plain runs recorded then)
PLAIN = "model.query_groups=1,model.dn_groups=0,model.encoder_head=false,loss.enc_weight=1,train.crop_steps=0"
# plain DETR with three times the budget (a ratio of steps to 0.5 of at most 1/3 shows even where it falls short),
# then the preset with its training-only aids
DEFAULT_VARIANTS = [f"plain:{PLAIN},train.steps=3x", "aids:"]


def write_set(name: str, out: str) -> str:
    from detrax.config import presets
    from detrax.data.synthetic import write_dataset, write_varied_dataset

    path = os.path.join(out, "data", name)
    if not os.path.isdir(os.path.join(path, "annotations")):
        if name == "shapes":
            write_dataset(path, 1600, seed=101, val_fraction=0.25, shape=presets.DEMO_SHAPE)
        elif name == "varied":
            write_varied_dataset(path, 600, seed=202)
        else:
            from foreign_set import write  # beside this script

            write(path, 500, seed=7)
    return path


def first_step(curve, level):
    return next((step for step, ap in curve if ap >= level), None)


def budget(overrides, steps):
    """A variant's step budget and its other overrides: `train.steps=N` steps, `train.steps=Kx` K set budgets."""
    own = [o.split("=", 1)[1] for o in overrides if o.startswith("train.steps=")]
    rest = [o for o in overrides if not o.startswith("train.steps=")]
    if not own:
        return steps, rest
    return (round(float(own[-1][:-1]) * steps) if own[-1].endswith("x") else int(own[-1])), rest


def read_curve(workdir, kind="eval"):
    """{step: AP50} of the run's evaluations (`eval_ema`: of its weights' moving average; a step evaluated again
    after a resume: its last value)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = [json.loads(line) for line in open(path) if line.endswith("\n")]  # a line being written: not yet
    return dict((r["step"], r["AP50"]) for r in rows if r["kind"] == kind)


def settled(curve, until):
    """Whether a run stopped at `until` = (level, cap) has nothing left to show: it passed the level or the cap."""
    return until is not None and any(ap >= until[0] or step >= until[1] for step, ap in curve.items())


class StopWhenSettled(threading.Thread):
    """Asks the training loop in this process to stop (SIGTERM: it saves a checkpoint and returns, as on a
    user's Ctrl-C) once the run's evaluations pass `until`'s level or its cap step."""

    def __init__(self, workdir, until):
        super().__init__(daemon=True)
        self.workdir, self.until, self.done = workdir, until, threading.Event()

    def run(self):
        while not self.done.wait(5.0):
            if settled(read_curve(self.workdir), self.until):
                os.kill(os.getpid(), signal.SIGTERM)
                return


def same_config(workdir, cfg):
    """Whether the run recorded in `workdir` has `cfg` (the class count aside, which it resolved from the data)."""
    from detrax.config import schema
    from detrax.training.start import config_differences

    with open(os.path.join(workdir, "run.json")) as f:
        recorded = json.load(f)["config"]
    diffs = config_differences(recorded, schema.to_dict(cfg))
    return all(d.startswith("model.num_classes:") for d in diffs)


def one_run(preset, overrides, data, workdir, seed, steps, eval_steps, resume, until=None):
    """One training run; its AP50 curve and minutes. `until` = (level, cap): stop once AP50 passes the level
    or at the cap step (the curve is cut there, so a cap smaller than a recorded run's reads it back the same)."""
    from detrax.config import presets
    from detrax.config.overrides import override
    from detrax.data.sources import read_split
    from detrax.errors import ResumeConflict
    from detrax.training.loop import Run, fit

    images = len(read_split(data, "train").records)
    cfg = override(presets.get(preset), [*overrides, f"train.seed={seed}", f"train.steps={steps}"])
    per_epoch = images // cfg.train.batch_size
    cfg = override(cfg, [f"train.eval_every={max(1, round(eval_steps / per_epoch))}"])
    cut = resume and settled(read_curve(workdir), until) and same_config(workdir, cfg)  # read back, not continued
    for again in [] if cut else [True, False] if resume else [False]:  # a resume that conflicts starts again
        if not again:
            shutil.rmtree(workdir, ignore_errors=True)
        os.makedirs(workdir, exist_ok=True)
        try:
            watch = StopWhenSettled(workdir, until)
            if until is not None:
                watch.start()
            late = signal.getsignal(signal.SIGTERM)
            if until is not None:  # one the watcher sends as fit returns: ignored (a user's, without it, is not)
                signal.signal(signal.SIGTERM, lambda *_: None)
            try:
                with open(os.path.join(workdir, "log.txt"), "a") as log, contextlib.redirect_stdout(log), \
                        contextlib.redirect_stderr(log):
                    fit(cfg, Run(data, workdir, resume=again))  # its metrics.jsonl holds the curve
            finally:
                watch.done.set()
                signal.signal(signal.SIGTERM, late)
            break
        except ResumeConflict as e:
            if not again:
                raise
            print(f"{workdir}: recorded with another config, starting again ({str(e).splitlines()[0]})", flush=True)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    curve = {s: ap for s, ap in read_curve(workdir).items() if until is None or s <= until[1]}
    starts = [i for i, r in enumerate(rows) if r["kind"] in ("start", "resume")] + [len(rows)]
    seconds = sum(rows[b - 1]["time"] - rows[a]["time"] for a, b in zip(starts, starts[1:]))  # cut time left out
    with open(os.path.join(workdir, "run.json")) as f:  # the backbone's warm-up, before the first row
        seconds += json.load(f).get("crop_warmup", {}).get("seconds", 0.0)
    best = os.path.join(workdir, "best.json")  # train.keep_best's record
    with open(best) if os.path.exists(best) else contextlib.nullcontext() as f:
        best = json.load(f) if f else None
    return {"curve": sorted(curve.items()), "minutes": seconds / 60, "ema_curve": sorted(read_curve(
        workdir, "eval_ema").items()), "best": best and {k: best[k] for k in ("value", "step", "weights")}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sets", nargs="+", default=["shapes", "varied"], choices=["shapes", "varied", "foreign"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, nargs="+", default=None, help="the step budget of each set, in --sets "
                   "order (one number: every set; default: shapes 1800, varied 6000, foreign 18000: small's own)")
    p.add_argument("--eval-steps", type=int, default=250)
    p.add_argument("--preset", default=None, help="one preset for every set (default: demo on shapes, small on "
                   "varied and foreign)")
    p.add_argument("--variant", action="append", default=None, help="NAME:key=value,key=value (repeatable)")
    p.add_argument("--out", default="/tmp/bench_convergence")
    p.add_argument("--base-until", type=int, default=None, help="the first variant's seeds stop once they pass "
                   "AP50 0.5, or at this step (its budget's schedule unchanged): enough to settle a ratio of steps "
                   "to 0.5 against it, e.g. 3x the others' median for the goal's third")
    p.add_argument("--resume", action="store_true", help="keep the runs in --out: read back the finished ones, "
                   "continue the cut ones")
    p.add_argument("--results", default=None, help="the results file's name: bench_convergence_RESULTS (default: "
                   "bench_convergence)")
    args = p.parse_args()
    from detrax.training.devices import prefer_eigen_convolutions

    prefer_eigen_convolutions()  # as the `detrax` command
    print(record.cpu(), flush=True)
    variants = [(v.split(":", 1)[0], [o for o in v.split(":", 1)[1].split(",") if o] if ":" in v else [])
                for v in (args.variant or DEFAULT_VARIANTS)]
    figures: dict = {"seeds": args.seeds}
    budgets = args.steps or [BUDGETS[s] for s in args.sets]
    if len(budgets) not in (1, len(args.sets)):
        p.error(f"--steps: {len(budgets)} budgets for {len(args.sets)} sets")
    for name, steps in zip(args.sets, budgets * len(args.sets) if len(budgets) == 1 else budgets):
        data = write_set(name, args.out)
        preset = args.preset or PRESETS[name]
        figures[name] = {"preset": preset, "steps": steps}
        for variant, overrides in variants:
            own, rest = budget(overrides, steps)
            capped = variant == variants[0][0] and args.base_until is not None
            until = (0.5, args.base_until) if capped else None
            runs = []
            for seed in args.seeds:
                workdir = os.path.join(args.out, "runs", f"{name}-{variant}-{seed}")
                r = one_run(preset, rest, data, workdir, seed, own, args.eval_steps, args.resume, until)
                runs.append(r)
                print(f"{name} {variant} seed {seed}: {r['minutes']:.1f} min, AP50 by step "
                      f"{' '.join(f'{s}:{ap:.3f}' for s, ap in r['curve'])}"
                      + (f"; moving average {' '.join(f'{s}:{ap:.3f}' for s, ap in r['ema_curve'])}"
                         if r["ema_curve"] else "") + (f"; best {r['best']}" if r["best"] else ""), flush=True)
            to = {lv: [first_step(r["curve"], lv) for r in runs] for lv in (0.3, 0.5)}
            finals = [r["curve"][-1][1] if r["curve"] else 0.0 for r in runs]
            # a seed that did not get there counts as later than any that did: the median is defined while most did
            median = statistics.median(math.inf if s is None else s for s in to[0.5])
            figures[name][variant] = {
                "steps_to_0.3": to[0.3], "steps_to_0.5": to[0.5],
                "median_steps_to_0.5": None if math.isinf(median) else median,
                "ap50_end_mean": round(statistics.mean(finals), 3), "ap50_end_min": round(min(finals), 3),
                "ap50_end_max": round(max(finals), 3),
                "steps": own, "minutes_mean": round(statistics.mean(r["minutes"] for r in runs), 1)}
            if runs[0]["ema_curve"]:  # train.ema_decay: the average's AP50 at the end, against the raw weights'
                ema = [r["ema_curve"][-1][1] for r in runs]
                figures[name][variant].update(
                    ema_ap50_end=[round(a, 3) for a in ema], raw_ap50_end=[round(a, 3) for a in finals],
                    ema_minus_raw_mean=round(statistics.mean(e - f for e, f in zip(ema, finals)), 3))
            if runs[0]["best"]:  # train.keep_best: the best evaluated against the last (the average where kept)
                last = [r["ema_curve"][-1][1] if r["ema_curve"] else r["curve"][-1][1] for r in runs]
                figures[name][variant].update(
                    best=[r["best"] for r in runs],
                    best_minus_last=[round(r["best"]["value"] - v, 3) for r, v in zip(runs, last)])
            if capped:  # stopped at 0.5 or the cap: its `ap50_end` is at the stop; a bound ratio is against the cap
                figures[name][variant].update(budget=own, steps=min(own, args.base_until),
                                              stopped_at=[r["curve"][-1][0] if r["curve"] else None for r in runs])
        base = figures[name][variants[0][0]]["median_steps_to_0.5"]
        print(f"\n{name}: variant, steps to AP50 0.3 / 0.5 per seed, AP50 at the end of its budget (mean [min, max])")
        for variant, _ in variants:
            f = figures[name][variant]
            mine = f["median_steps_to_0.5"]
            f["ratio_steps_to_0.5"] = round(mine / base, 2) if mine and base else None
            if mine and not base:  # the first variant did not get there in the budget: the ratio is below this
                f["ratio_steps_to_0.5_below"] = round(mine / figures[name][variants[0][0]]["steps"], 2)
            ratio = f["ratio_steps_to_0.5"] or (f"< {f['ratio_steps_to_0.5_below']}" if mine else None)
            print(f"  {variant:12s} {f['steps']:5d} {f['steps_to_0.3']} / {f['steps_to_0.5']}  "
                  f"{f['ap50_end_mean']:.3f} [{f['ap50_end_min']:.3f}, {f['ap50_end_max']:.3f}]  ratio {ratio}")
    record.finish(figures, name=f"bench_convergence_{args.results}" if args.results else None)


if __name__ == "__main__":
    main()

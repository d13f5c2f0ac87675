"""The figure tables of README.md and benchmarks/README.md, written from the results files (`record.py`):

    .venv/bin/python benchmarks/tables.py           # rewrite the tables in both files
    .venv/bin/python benchmarks/tables.py --check   # exit 1 if a table differs from its results (a test runs it)

A table sits between `<!-- figures: NAME -->` and `<!-- /figures -->`; everything between is generated, one row
per results file of each row below (a file per kind of machine), with the CPU, date and commit that measured it
and the command that gives it again ("not measured yet" where there is none). A row's `figure` reads the
benchmark's JSON line (`figures`)."""

from __future__ import annotations

import argparse
import difflib
import glob
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FILES = {"readme": os.path.join(REPO, "README.md"), "benchmarks": os.path.join(HERE, "README.md")}


@dataclass(frozen=True)
class Row:
    benchmark: str  # the results files' name: benchmarks/results/<benchmark>.<machine>.json
    what: str
    figure: Callable[[dict], str]
    tables: tuple[str, ...] = ("readme", "benchmarks")
    command: str = ""  # what gives it, where its script is not <benchmark>.py


def _runtimes(f: dict, tag: str) -> str:
    times = sorted((v, k[: -len(tag) - 3]) for k, v in f.items() if k.endswith(f"_{tag}_s"))
    return ", ".join(f"{name} {s:.3f} s" for s, name in times)


def _export(f: dict, suffix: str = "") -> str:
    """Best of each in any precision (int8 included); detrax's best float; float32 against float32."""
    tags = ("800x1216_b1", "800x1216_b4", "640x640_b1", "640x640_b4")
    return "; ".join(f"{name}: " + " / ".join(str(f[f"{key}_{t}{suffix}"]) for t in tags)
                     for name, key in (("any", "ratio"), ("float", "ratio_float"), ("float32", "ratio_fp32")))


def _export_one_thread(f: dict) -> str:
    return _export(f, "_t1") if "ratio_800x1216_b1_t1" in f else "not measured in this run"


def _export_detail(f: dict) -> str:
    return "; ".join(f"{t.replace('_', ' ')}: {_runtimes(f, t)}" for t in ("800x1216_b1", "640x640_b1"))


def _ema(f: dict) -> str:
    v = next(v for k, v in f.items() if isinstance(v, dict) and "preset" in v)
    v = next(x for x in v.values() if isinstance(x, dict))
    return (", ".join(f"{r} / {e}" for r, e in zip(v["raw_ap50_end"], v["ema_ap50_end"]))
            + f" (mean change {v['ema_minus_raw_mean']:+}); " + ", ".join(f"{d:+}" for d in v["best_minus_last"]))


def _int8(f: dict) -> str:
    return "; ".join(f"{rt}: val {f[f'{rt}_int8_minus_f32_val_AP50']:+} / {f[f'{rt}_int8_minus_f32_val_AP']:+}, "
                     f"held out {f[f'{rt}_int8_minus_f32_held_out_AP50']:+} / {f[f'{rt}_int8_minus_f32_held_out_AP']:+}"
                     for rt in ("onnxruntime", "openvino"))


def _int8_runtimes(f: dict) -> str:
    return "; ".join(f"{k} {v['held_out_AP50']} / {v['held_out_AP']}, {v['ms_per_image_b1']} ms"
                     for k, v in f.items() if isinstance(v, dict) and "held_out_AP50" in v)


def _inference(f: dict) -> str:
    return "; ".join(f"{s}: {r['ratio_vs_torch_fp32']} / {r['ratio_vs_torch_best']} ({r['detrax']['median_s']} s vs "
                     f"{r['torch']['median_s']} s / {r['torch_cl']['median_s']} s)"
                     for s, r in f.items() if isinstance(r, dict) and "ratio_vs_torch_fp32" in r)


def _inference_memory(f: dict) -> str:
    s = f["800x1216"]
    return (f"{s['memory_ratio_vs_torch']} ({s['detrax']['peak_rss_mib']:.0f} vs {s['torch']['peak_rss_mib']:.0f} "
            "MiB); "
            f"compile {s['detrax']['compile_s']} s / {f['640x640']['detrax']['compile_s']} s")


def _matching(f: dict, solver: str) -> str:
    return " / ".join(f"{f[b][f'speedup_{solver}']}x ({f[b]['official_ms']} vs {f[b][f'{solver}_ms']} ms)"
                      for b in ("B32", "B8", "B2") if b in f)


FOREIGN = ".venv/bin/python benchmarks/bench_int8.py --set foreign"
ROWS = [
    Row("bench_export", "DETR-R50 inference, 800x1216 batch 1 / batch 4, 640x640 batch 1 / batch 4: detrax's fastest "
        "runtime (XLA, ONNX Runtime, OpenVINO; int8 in both; OpenVINO in bfloat16 where the CPU has it) / PyTorch's "
        "best setting in any precision (HF DETR; bfloat16 autocast where the CPU has it); detrax's best float "
        "runtime / the same; float32 against float32", _export),
    Row("bench_export", "the same, every framework on one core and one thread", _export_one_thread, ("benchmarks",)),
    Row("bench_export", "the runtimes' seconds per call, 800x1216 and 640x640, batch 1", _export_detail,
        ("benchmarks",)),
    Row("bench_export", "ONNX export of DETR-R50: time; size (graph and weights)",
        lambda f: f"{f['export_s']} s; {f['onnx_mib']} MiB", ("benchmarks",)),
    Row("bench_int8", "int8 on a trained model (the demo run, calibrated on 64 training images): AP50 / AP change "
        "from float32, ONNX Runtime and OpenVINO, on the demo's val split (in-sample) and on 250 held-out scenes",
        _int8),
    Row("bench_int8", "the same: AP50 / AP (held out) and milliseconds per image at batch 1, by runtime",
        _int8_runtimes, ("benchmarks",)),
    Row("bench_int8_foreign", "int8 on the foreign set (`small` trained on it, calibrated on 64 training images): "
        "AP50 / AP change from float32 on its val split (in-sample) and on 100 images of another seed", _int8,
        command=FOREIGN),
    Row("bench_int8_foreign", "the same: AP50 / AP (held out) and milliseconds per image at batch 1, by runtime; "
        "training steps", lambda f: f"{_int8_runtimes(f)}; {f['steps']} steps", ("benchmarks",), FOREIGN),
    Row("bench_inference", "DETR-R50 forward (XLA, fp32), batch 1: detrax / HF PyTorch NCHW / PyTorch's best fp32 "
        "layout (channels_last)", _inference),
    Row("bench_inference", "peak RSS of the process at 800x1216, detrax / PyTorch; XLA compile of the forward, "
        "800x1216 / 640x640", _inference_memory, ("benchmarks",)),
    Row("bench_matching", "matching 6 decoder layers of B=32 / 8 / 2 images, 100 queries, 1-50 targets: speed-up "
        "of the batched host `hungarian` over the official loop", lambda f: _matching(f, "hungarian")),
    Row("bench_matching", "the same, on-device `hungarian_jax` / `sinkhorn` (meant for accelerators)",
        lambda f: f"{_matching(f, 'hungarian_jax')}; {_matching(f, 'sinkhorn')}", ("benchmarks",)),
    Row("bench_train", "DETR-R50 training step, batch 2 at 512x512, layer2-4 and the transformer trained in both: "
        "detrax / HF PyTorch", lambda f: f"{f['ratio_detrax_vs_torch']} ({f['detrax']['median_s']} s vs "
        f"{f['torch']['median_s']} s)"),
    Row("bench_train", "the step's compile; matching and set loss as a share of the step; peak RSS detrax / "
        "PyTorch; Eigen / XLA's default (YNNPACK) convolutions",
        lambda f: f"{f['detrax']['compile_s']} s; {100 * f['detrax']['matching_loss_share']:.1f}%; "
        f"{f['detrax']['peak_rss_mib']} / {f['torch']['peak_rss_mib']} MiB; "
        f"{f['ratio_eigen_vs_ynnpack_convolutions']}", ("benchmarks",)),
    Row("bench_data", "padding in training batches (official augmentation, coco-tiny, batch 2): the loader's "
        "shape-grouped batches in buckets of 64 / each to its own maximum; batches in shuffled order, the same two; "
        "1333x1333", lambda f: f"{f['padding_waste_buckets']:.1%} / {f['padding_waste_batch_max']:.1%}; "
        f"{f['padding_waste_buckets_shuffled']:.1%} / {f['padding_waste_batch_max_shuffled']:.1%}; "
        f"{f['padding_waste_worst_case_1333']:.1%}"),
    Row("bench_data", "the training pipeline's images per second in process / with 1 / 2 worker processes",
        lambda f: " / ".join(str(f[f"images_per_s_{n}_workers"]) for n in (0, 1, 2)), ("benchmarks",)),
    Row("bench_predict", "`Detector.predict` on coco-tiny's real images, DETR-R50 at 800/1333: per-image time "
        "detrax / HF pipeline, batch 1 / batch 8",
        lambda f: f"{f['time_ratio_detrax_vs_hf_batch1']} / {f['time_ratio_detrax_vs_hf_batch8']}"),
    Row("bench_startup", "time to the first detection: `detrax predict` of one 640x480 image with a DETR-R50 "
        "weights file in a fresh process, the first / the second (JAX's persistent compilation cache: it compiles "
        "nothing) / the cache off; seconds of compiling in the first",
        lambda f: f"{f['first_s']} s / {f['second_s']} s ({f['second_over_first']:.0%}) / {f['off_s']} s; "
        f"{f['compile_seconds_first']} s"),
    Row("bench_segmentation", "panoptic forward (DETR-R50 and the official mask head, 250 classes), batch 1 at "
        "640x640: detrax / HF `DetrForSegmentation`", lambda f: f"{f['ratio_detrax_vs_hf']} ({f['detrax_median_s']} s "
        f"vs {f['hf_median_s']} s)"),
    Row("bench_panoptic", "the synthetic panoptic recipe (`demo_panoptic_detector`, then `demo_panoptic`'s mask "
        "head): PQ on the val scenes (in-sample: the recipe was tuned on them) with the preset's mask-head init / "
        "the official init (things, stuff); the preset's PQ held out (500 new scenes of another seed); the "
        "detector's AP50; minutes for both stages",
        lambda f: f"{f['pq']} / {f['pq_official_init']} ({f['pq_th']}, {f['pq_st']} / {f['pq_th_official_init']}, "
        f"{f['pq_st_official_init']}); {f['held_out_pq']} ({f['held_out_pq_th']}, {f['held_out_pq_st']}); "
        f"{f['stage1_AP50']}; {f['minutes']}"),
    Row("bench_demo", "`detrax demo`: AP50 (AP) on its 250 val images, in-sample (the preset was tuned on them) / "
        "held out (250 new scenes of another seed); minutes end to end",
        lambda f: f"{f['AP50']:.3f} ({f['AP']:.3f}) / {f['held_out_AP50']:.3f} ({f['held_out_AP']:.3f}); "
        f"{f['minutes']}"),
    Row("bench_convergence_ema_demo", "the weights' moving average on `demo` (`train.ema_decay=0.99`, 1800 steps on "
        "the shapes set, 3 seeds): AP50 at the end, raw / average per seed; the best kept minus the last, per seed "
        "(in-sample: chosen on the val images it is measured on)", _ema, ("benchmarks",)),
    Row("bench_convergence_ema_small", "the same on `small` (`train.ema_decay=0.997`, the varied set, a 6000-step "
        "schedule in place of its 18000, 3 seeds)", _ema, ("benchmarks",)),
    Row("bench_suite", "the test suite as CI runs it (`.ci/run` in a fresh clone: install, ruff, mypy, pytest "
        "with 2 workers): minutes; pytest's minutes and tests; CPU minutes",
        lambda f: f"{f['minutes']}; {f['pytest_minutes']}, {f['passed']} tests; {f['cpu_minutes']}"),
]


def results(benchmark: str, folder: str | None = None) -> list[dict]:
    """The results files of `benchmark`, one per kind of machine, sorted by machine."""
    paths = sorted(glob.glob(os.path.join(folder or os.path.join(HERE, "results"), f"{benchmark}.*.json")))
    out = []
    for path in paths:
        with open(path) as f:
            out.append(json.load(f))
    return out


def table(name: str, folder: str | None = None) -> str:
    lines = ["| what | figure | measured | command |", "| --- | --- | --- | --- |"]
    for row in ROWS:
        if name not in row.tables:
            continue
        found = results(row.benchmark, folder)
        for r in found:
            lines.append(f"| {row.what} | {row.figure(r['figures'])} | {r['cpu']} ({r['isa']}), {r['date']}, "
                         f"{r['commit']} | `{r['command']}` |")
        if not found:
            command = row.command or f".venv/bin/python benchmarks/{row.benchmark}.py"
            lines.append(f"| {row.what} | not measured yet | | `{command}` |")
    return "\n".join(lines)


MARK = re.compile(r"(<!-- figures: (\w+) -->\n)(.*?)(<!-- /figures -->)", re.S)


def render(text: str, folder: str | None = None) -> str:
    """`text` with each marked table rewritten from the results files."""
    return MARK.sub(lambda m: f"{m.group(1)}{table(m.group(2), folder)}\n{m.group(4)}", text)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    stale = 0
    for path in FILES.values():
        with open(path) as f:
            text = f.read()
        new = render(text)
        if new == text:
            continue
        if args.check:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), path, "results"))
        else:
            with open(path, "w") as f:
                f.write(new)
            print(f"rewrote the figures of {os.path.relpath(path, REPO)}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

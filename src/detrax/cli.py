"""The `detrax` command: a thin layer over the library API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _writable_dir(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".detrax-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"detrax: error: output folder {path} cannot be written ({e.strerror})") from None
    return path


def cmd_predict(args) -> int:
    import numpy as np

    import detrax
    from detrax.data.synthetic import scene
    from detrax.predict import list_images, read_image, write_results

    out = _writable_dir(args.out)
    files = list_images(args.paths)
    if not files:
        gen = _writable_dir(os.path.join(out, "inputs"))
        rng = np.random.default_rng(args.seed)
        for i in range(args.generate):
            image, _, _ = scene(rng, 480, 640)
            files.append(os.path.join(gen, f"scene{i:03d}.jpg"))
            image.save(files[-1], quality=95)
        print(f"no images given: generated {len(files)} synthetic scenes in {gen}")
    images, kept, skipped = [], [], []
    for f in files:
        try:
            images.append(read_image(f))
            kept.append(f)
        except (ValueError, FileNotFoundError) as e:
            skipped.append(f)
            print(f"skipped: {e}", file=sys.stderr)
    t0 = time.time()
    detector = detrax.load(args.checkpoint, runtime=args.runtime)
    if args.checkpoint.startswith("random:"):
        print(f"{args.checkpoint}: RANDOM weights, so the boxes mean nothing; pass a converted or trained "
              "checkpoint for real detections")
    threshold = args.threshold if args.threshold is not None else 0.85 if args.task == "panoptic" else 0.7
    if args.task != "detection":
        from detrax.predict import write_instances, write_panoptic

        found = detector.segment(images, args.task, threshold, args.batch_size, args.size, args.max_size) \
            if images else []
        path = write_panoptic(out, kept, images, found) if args.task == "panoptic" else write_instances(
            out, kept, images, found, detector.names)
        n = sum(len(r["segments"] if args.task == "panoptic" else r["scores"]) for r in found)
        print(json.dumps({"images": len(kept), "skipped": len(skipped), "segments" if args.task == "panoptic"
                          else "detections": n, "threshold": threshold, "results": path,
                          "seconds": round(time.time() - t0, 2)}))
        return 0
    dets = detector.predict(images, threshold=threshold, batch_size=args.batch_size, size=args.size,
                            max_size=args.max_size) if images else []  # sizes None: the model's own
    path = write_results(out, kept, images, dets, detector.names)
    if args.attention and dets:
        for f, im, d in zip(kept, images, dets):
            points = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in d["boxes"][:args.attention_points]]
            stem = os.path.splitext(os.path.basename(f))[0]
            detector.attention(im, d, args.size, args.max_size, points).save(
                os.path.join(out, f"{stem}_attention.png"))
    n = sum(len(d["scores"]) for d in dets)
    print(json.dumps({"images": len(kept), "skipped": len(skipped), "detections": n, "threshold": threshold,
                      "results": path, "seconds": round(time.time() - t0, 2)}))
    return 0


def cmd_convert(args) -> int:
    from detrax import presets
    from detrax.convert import convert_file

    overrides = {"num_heads": args.num_heads} if args.num_heads else {}
    if args.dilation:
        overrides["dilation"] = True
    data = None
    if args.preset:
        d = presets.get(args.preset).data
        data = {"val_size": d.val_size, "max_size": d.max_size, "bucket_step": d.bucket_step}
    report = convert_file(args.src, args.dst, data=data, **overrides)
    cfg = report["config"]
    print(f"{args.src}: {report['format']} checkpoint -> {args.dst}")
    print(f"  model: {cfg.backbone}{' DC5' if cfg.dilation else ''} depths {cfg.depths}, {cfg.num_classes} classes, "
          f"{cfg.num_queries} queries, {cfg.enc_layers}+{cfg.dec_layers} layers, "
          f"{'pre' if cfg.pre_norm else 'post'}-norm; {report['filled']} weights converted")
    if report["categories"]:
        print(f"  classes: {len(report['categories'])} categories by id ({report['categories'][0]['name']}, ...)")
    if data:
        print(f"  val transform of {args.preset}: shorter side {data['val_size']}, longer at most {data['max_size']}")
    if report["fresh"]:
        print(f"  freshly initialised ({len(report['fresh'])} weights): transformer and heads")
    return 0


def cmd_data_synth(args) -> int:
    from detrax.data.synthetic import write_dataset, write_panoptic_dataset

    h, w = _size(args.size)
    if args.panoptic:
        counts = write_panoptic_dataset(args.out, args.num_images, args.seed, shape=(h or 128, w or 160))
    else:
        counts = write_dataset(args.out, args.num_images, args.seed, shape=(h, w) if h and w else None)
    print(json.dumps({"out": args.out, **counts}))
    return 0


def cmd_data_check(args) -> int:
    from detrax.data.doctor import check

    report = check(args.dir, args.split, args.max_targets)
    print(json.dumps(report, indent=1 if args.pretty else None))
    return 0 if report["ok"] else 1


def _config(args, default: str):
    """The preset named by --config with the key=value overrides. Without --config, a resumed run keeps its own
    config (the overrides apply to it) and a new one takes `default`."""
    from detrax import configs, presets

    if args.config is None and args.resume:
        from detrax.start import recorded_config

        recorded = recorded_config(args.workdir)
        if recorded is not None:
            return configs.override(configs.from_dict(recorded), args.overrides)
    return configs.override(presets.get(args.config or default, smoke=args.smoke), args.overrides)


def _distributed(args):
    if args.num_processes > 1:
        import jax

        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def cmd_train(args) -> int:
    from detrax.train import Run, fit

    cfg = _config(args, "detr_r50")
    _distributed(args)
    summary = fit(cfg, Run(args.data, args.workdir, resume=args.resume, init=args.init,
                           allow_changes=args.allow_changes))
    print(json.dumps({"workdir": args.workdir, "step": summary["step"], "eval": summary["eval"],
                      "stopped": summary["stopped"]}))
    return _exit_status(summary)


def _exit_status(summary) -> int:
    """0, or 128 + the signal that stopped training (after its checkpoint was saved), as shells expect."""
    import signal

    return 128 + signal.Signals[summary["stopped"]].value if summary["stopped"] else 0


def cmd_eval(args) -> int:
    import detrax
    from detrax import configs, presets
    from detrax.data.sources import read_split, resolve_split
    from detrax.evaluate import evaluate

    detector = detrax.load(args.checkpoint, runtime=args.runtime)
    # the run's own data config (its val transform), else the preset's, else the official 800/1333
    data_cfg = presets.get(args.config).data if args.config else detector.data or configs.DataConfig()
    data_cfg = configs.override(configs.Config("eval", detector.config, data=data_cfg), args.overrides).data
    split = resolve_split(args.data, args.split or data_cfg.val_split, "val", data_cfg.task)
    ds = read_split(args.data, split, task=data_cfg.task)
    infer = detector.infer_masks if data_cfg.task != "detection" else detector.infer
    metrics = evaluate(infer, ds, data_cfg, batch_size=args.batch_size, out_dir=args.out,
                       class_ids=detector.config.class_ids)
    print(json.dumps(metrics))
    return 0


def cmd_export(args) -> int:
    import dataclasses

    import detrax
    from detrax.export import FORMATS, Shape, export

    if args.format not in FORMATS:  # before the weights are read
        raise ValueError(f"unknown export format {args.format!r}; formats: {', '.join(sorted(FORMATS))}")
    shape = Shape(args.batch, *_size(args.size))
    detector = detrax.load(args.checkpoint)
    export(detector, args.out, args.format, shape, dtype=args.dtype)
    print(json.dumps({"out": args.out, "format": args.format, "shape": dataclasses.asdict(shape),
                      "dtype": args.dtype or detector.config.dtype}))
    return 0


def _size(text: str | None) -> tuple[int | None, int | None]:
    """`HxW` (or one number for a square) -> (H, W); None -> any size."""
    if text is None:
        return None, None
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--size {text!r}: expected HxW, e.g. 800x1216, or one number for a square")
    return int(parts[0]), int(parts[-1])


def cmd_demo(args) -> int:
    """Synthetic data -> train the `demo` preset -> COCO AP -> predictions drawn on val images."""
    import detrax
    from detrax import presets
    from detrax.data.sources import read_split
    from detrax.data.synthetic import write_dataset
    from detrax.predict import read_image, write_results
    from detrax.train import Run, fit

    t0 = time.time()
    data = os.path.join(args.workdir, "data")
    if not os.path.isdir(os.path.join(data, "annotations")):
        total = args.num_images + args.num_val
        counts = write_dataset(data, total, args.seed, val_fraction=args.num_val / total, shape=presets.DEMO_SHAPE)
        print(f"synthetic dataset: {counts['train']} train and {counts['val']} val images in {data}")
    cfg = _config(args, "demo")
    summary = fit(cfg, Run(data, args.workdir, resume=args.resume, allow_changes=args.allow_changes))
    if summary["stopped"]:
        return _exit_status(summary)
    val = read_split(data, "val")
    detector = detrax.load(args.workdir)  # with the dataset's category names
    files = [r["file"] for r in val.records[:args.draw]]
    images = [read_image(f) for f in files]
    dets = detector.predict(images, threshold=args.threshold)  # the run's own val transform
    out = os.path.join(args.workdir, "predictions")
    write_results(out, files, images, dets, detector.names)
    ev = summary["eval"] or {}
    print(json.dumps({"AP": ev.get("AP"), "AP50": ev.get("AP50"), "minutes": round((time.time() - t0) / 60, 1),
                      "workdir": args.workdir, "predictions": out}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detrax", description="DETR in JAX and Flax NNX")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("predict", help="detect objects in images; writes results.json and drawn images")
    s.add_argument("checkpoint", help="detrax weights (.safetensors), an official/HF checkpoint, or random:PRESET")
    s.add_argument("paths", nargs="*", help="image files or folders (none: generate synthetic scenes)")
    s.add_argument("--out", default="runs/predict", help="output folder")
    s.add_argument("--threshold", type=float, default=None,
                   help="score to keep a detection or segment (default 0.7; 0.85 for panoptic, as the official)")
    s.add_argument("--task", choices=("detection", "panoptic", "segm"), default="detection",
                   help="panoptic: segments as COCO panoptic PNGs + panoptic.json, drawn; segm: detections with "
                   "masks (RLE in results.json); both need a model with a mask head")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--size", type=int, default=None,
                   help="shorter side after resizing (default: a run's own val_size; 800 for weights files)")
    s.add_argument("--max-size", type=int, default=None, help="longer side at most (default: as --size, 1333)")
    s.add_argument("--generate", type=int, default=2, help="synthetic scenes to make when no image is given")
    s.add_argument("--attention", action="store_true", help="also write <image>_attention.png: each detection's "
                   "decoder cross-attention, and encoder self-attention at the first detections' centres")
    s.add_argument("--attention-points", type=int, default=2, help="encoder self-attention points (box centres)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--runtime", default="xla", help="what runs the model: xla, onnxruntime or openvino "
                   "(detrax.runtimes; the latter two export it to ONNX first)")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("convert", help="official DETR / HF DETR / torchvision ResNet / BiT / MasterSkepticista/detr "
                       "weights -> detrax weights")
    s.add_argument("src", help=".pth/.pt/.bin (needs the torch extra), .safetensors, BiT's .npz, or a Flax msgpack "
                   "checkpoint of MasterSkepticista/detr (checkpoint_<step>)")
    s.add_argument("dst", help="output .safetensors")
    s.add_argument("--dilation", action="store_true", help="DC5 model (also implied by 'dc5' in the file name)")
    s.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, where the weights cannot tell (official, HF: 8)")
    s.add_argument("--preset", default=None, help="record this preset's val transform in the file (e.g. "
                   "detr_r50_640 for weights trained at 640), which `detrax.load`, eval and predict then use")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("export", help="a detector for serving, with the weights inside: stablehlo (pixels in, "
                       "detections out) or onnx (pixels in, model outputs out); any batch and size unless fixed")
    s.add_argument("checkpoint", help="a training workdir, detrax weights, or an official/HF checkpoint")
    s.add_argument("out", help="the file to write")
    s.add_argument("--format", default="stablehlo", help="a registered export format (detrax.export.FORMATS)")
    s.add_argument("--batch", type=int, default=None, help="images per call (default: any)")
    s.add_argument("--size", default=None, help="HxW: the padded canvas (default: any size)")
    s.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype of the exported model (default: the model's)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("train", help="train a DETR on a COCO-format folder")
    s.add_argument("--config", default=None, help="a preset of detrax.configs (default: detr_r50; with --resume, "
                   "the run's own config)")
    s.add_argument("--data", required=True, help="a COCO-format folder, or tfds:coco/2017[@DATA_DIR]")
    s.add_argument("--workdir", required=True, help="checkpoints, metrics, plots")
    s.add_argument("--resume", action="store_true", help="continue the workdir's run from its latest checkpoint "
                   "(without one: start it again exactly as it was recorded)")
    s.add_argument("--allow-changes", action="store_true", help="with --resume: continue although the config, "
                   "--init weights or training data differ from the run's (the changes are recorded)")
    s.add_argument("--init", default=None, help="start from these weights (the class head may differ)")
    s.add_argument("--smoke", action="store_true", help="the preset's smoke-sized variant")
    s.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.steps=100")
    s.add_argument("--coordinator", default=None, help="host:port of process 0, for multi-host runs")
    s.add_argument("--num-processes", type=int, default=1)
    s.add_argument("--process-id", type=int, default=0)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("demo", help="the built-in default: synthetic shapes, train a small DETR on the CPU, "
                                     "evaluate, draw predictions")
    s.add_argument("--workdir", default="runs/demo")
    s.add_argument("--config", default=None, help="a preset (default: demo; with --resume, the run's own)")
    s.add_argument("--num-images", type=int, default=3000, help="synthetic training images")
    s.add_argument("--num-val", type=int, default=250, help="synthetic val images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--draw", type=int, default=8, help="val images to draw predictions on")
    s.add_argument("--threshold", type=float, default=0.5)
    s.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    s.add_argument("--allow-changes", action="store_true", help="with --resume: continue despite a changed config")
    s.add_argument("--smoke", action="store_true", help="a one-epoch run, to see that everything works")
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("eval", help="COCO AP of a checkpoint or a training run's workdir")
    s.add_argument("checkpoint", help="detrax weights, an official/HF checkpoint, or a training workdir")
    s.add_argument("--data", required=True, help="a COCO-format folder, or tfds:coco/2017[@DATA_DIR]")
    s.add_argument("--split", default=None, help="default: the split named val*")
    s.add_argument("--config", default=None, help="preset whose data settings (val_size, ...) to use (default: "
                   "a run's own, or the one a weights file records; else the official 800/1333)")
    s.add_argument("--out", default=None, help="write metrics.json and results.json here")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("overrides", nargs="*", help="key=value overrides of data settings, e.g. data.val_size=640")
    s.add_argument("--runtime", default="xla", help="what runs the model: xla, onnxruntime or openvino "
                   "(detrax.runtimes; the latter two export it to ONNX first)")
    s.set_defaults(func=cmd_eval)

    data = sub.add_parser("data", help="datasets: make a synthetic one, check one").add_subparsers(
        dest="data_command", required=True)
    s = data.add_parser("synth", help="write a COCO-format folder of synthetic shapes (train and val)")
    s.add_argument("out")
    s.add_argument("--num-images", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", default=None, help="HxW of every image (default: each 128-192 on either side; "
                   "128x160 with --panoptic)")
    s.add_argument("--panoptic", action="store_true", help="a COCO panoptic folder instead: the shapes as things "
                   "over sky and ground (stuff); every segment also as an instance (boxes, RLE masks)")
    s.set_defaults(func=cmd_data_synth)
    s = data.add_parser("check", help="read a dataset as training would; print a JSON report; exit 1 if bad")
    s.add_argument("dir")
    s.add_argument("--split", default=None, help="one split (default: every split found)")
    s.add_argument("--max-targets", type=int, default=100)
    s.add_argument("--pretty", action="store_true")
    s.set_defaults(func=cmd_data_check)
    return p


def main(argv=None) -> int:
    if argv is None:  # the `detrax` command owns its process: CPU convolutions through Eigen (devices.py)
        from detrax.devices import prefer_eigen_convolutions

        prefer_eigen_convolutions()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (argparse takes one block of positionals)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from detrax.errors import TrainingError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"detrax: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"detrax: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

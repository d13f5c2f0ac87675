"""What each `detrax` command does, over the library API (`cli` parses the command line and calls these)."""

from __future__ import annotations

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


def _detector(args):
    """`detrax.load` of the command's checkpoint, run by its `--runtime` (with `--model`, the exported file that
    runtime runs: an ONNX file `detrax export` wrote, quantized or not; else the model exported now)."""
    import detrax

    model = getattr(args, "model", None)
    if model is not None and args.runtime == "xla":
        raise ValueError("--model is an exported file for another runtime (--runtime onnxruntime or openvino); "
                         "xla runs the checkpoint itself")
    detector = detrax.load(args.checkpoint, weights=args.weights)
    if args.runtime == "xla":
        return detector
    return detector.with_runtime(args.runtime, **({"onnx": model} if model is not None else {}))


def cmd_serve(args) -> int:
    from detrax.serving.service import Settings, serve

    detector = _detector(args)
    print(f"detrax serve: http://{args.host}:{args.port}/ ({args.checkpoint}, run by {args.runtime}); Ctrl-C stops",
          file=sys.stderr)
    settings = Settings(args.max_batch, args.window_ms, args.queue, int(args.max_mb * 2**20))
    serve(detector, args.host, args.port, settings)
    return 0


def cmd_predict(args) -> int:
    from detrax.data.synthetic import write_scenes
    from detrax.serving.images import list_images, read_all, write_results

    out = _writable_dir(args.out)
    files = list_images(args.paths)
    if not files:
        files = write_scenes(_writable_dir(os.path.join(out, "inputs")), args.generate, args.seed)
        print(f"no images given: generated {len(files)} synthetic scenes in {os.path.join(out, 'inputs')}")
    images, kept, skipped = read_all(files)
    for _, why in skipped:
        print(f"skipped: {why}", file=sys.stderr)
    t0 = time.time()
    detector = _detector(args)
    if args.checkpoint.startswith("random:"):
        print(f"{args.checkpoint}: RANDOM weights, so the boxes mean nothing; pass a converted or trained "
              "checkpoint for real detections")
    from detrax.serving import panoptic, postprocess

    default = panoptic.THRESHOLD if args.task == "panoptic" else postprocess.THRESHOLD
    threshold = default if args.threshold is None else args.threshold
    if threshold == "auto":
        from detrax.evaluation.diagnostics import auto_thresholds

        if args.task != "detection":
            raise ValueError("--threshold auto is for detection (per-class box thresholds); give a number")
        threshold = auto_thresholds(os.path.join(args.checkpoint, "eval", "thresholds.json"))
    if args.task != "detection":
        from detrax.serving.images import write_instances, write_panoptic

        found = detector.segment(images, args.task, threshold, args.batch_size, args.size, args.max_size) \
            if images else []
        path = write_panoptic(out, kept, images, found) if args.task == "panoptic" else write_instances(
            out, kept, images, found, detector.names)
        counted = {"segments" if args.task == "panoptic" else "detections":
                   sum(len(r["segments"] if args.task == "panoptic" else r["scores"]) for r in found)}
    else:
        dets = detector.predict(images, threshold=threshold, batch_size=args.batch_size, size=args.size,
                                max_size=args.max_size) if images else []  # sizes None: the model's own
        path = write_results(out, kept, images, dets, detector.names)
        for f, im, d in zip(kept, images, dets) if args.attention else ():
            points = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in d["boxes"][:args.attention_points]]
            stem = os.path.splitext(os.path.basename(f))[0]
            detector.attention(im, d, args.size, args.max_size, points).save(
                os.path.join(out, f"{stem}_attention.png"))
        counted = {"detections": sum(len(d["scores"]) for d in dets)}
    print(json.dumps({"images": len(kept), "skipped": len(skipped), **counted, "threshold": threshold,
                      "results": path, "seconds": round(time.time() - t0, 2)}))
    return 0


def cmd_convert(args) -> int:
    from detrax.config import presets
    from detrax.weights.convert import convert_file

    if args.to != "detrax":
        return _convert_out(args)

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


def _convert_out(args) -> int:
    import detrax
    from detrax.weights.to_torch import write

    overrides = {k: v for k, v in (("num_heads", args.num_heads), ("dilation", args.dilation or None)) if v}
    detector = detrax.load(args.src, weights=args.weights, **overrides)
    written = write(detector.model, args.dst, args.to, detector.names)
    cfg = detector.config
    print(f"{args.src} -> {written} ({'official DETR' if args.to == 'official' else 'Hugging Face DETR'}"
          f"{', with its mask head' if cfg.masks else ''}: {cfg.backbone}, {cfg.num_classes} classes, "
          f"{cfg.num_queries} queries, {cfg.enc_layers}+{cfg.dec_layers} layers)")
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


def cmd_data_convert(args) -> int:
    from detrax.data.convert import convert

    print(json.dumps(convert(args.src, args.dst, args.to, skip_bad=args.skip_bad)))
    return 0


def _config(args, default: str):
    """The preset named by --config with the key=value overrides. Without --config, a resumed run keeps its own
    config (the overrides apply to it) and a new one takes `default`."""
    from detrax.config import presets, schema
    from detrax.config.overrides import override

    if args.config is None and args.resume:
        from detrax.training.start import recorded_config

        recorded = recorded_config(args.workdir)
        if recorded is not None:
            return override(schema.from_dict(recorded), args.overrides)
    return override(presets.get(args.config or default, smoke=args.smoke), args.overrides)


def _distributed(args):
    if args.num_processes > 1:
        import jax

        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def cmd_train(args) -> int:
    from detrax.training.loop import Run, fit

    cfg = _config(args, "detr_r50")
    _distributed(args)
    summary = fit(cfg, Run(args.data, args.workdir, resume=args.resume, init=args.init,
                           allow_changes=args.allow_changes))
    shown = ("step", "eval", "stopped", "eval_ema", "best", "early_stopped")  # the last three where the run has them
    print(json.dumps({"workdir": args.workdir} | {k: summary.get(k) for k in shown[:3]}
                     | {k: summary[k] for k in shown[3:] if summary.get(k)}))
    return _exit_status(summary)


def _exit_status(summary) -> int:
    """0, or 128 + the signal that stopped training (after its checkpoint was saved), as shells expect."""
    import signal

    return 128 + signal.Signals[summary["stopped"]].value if summary["stopped"] else 0


def cmd_eval(args) -> int:
    from detrax.config import presets, schema
    from detrax.config.overrides import override
    from detrax.data.sources import read_split, resolve_split
    from detrax.evaluation.coco import evaluate

    detector = _detector(args)
    # the run's own data config (its val transform), else the preset's, else the official (DataConfig's)
    data_cfg = presets.get(args.config).data if args.config else detector.data or schema.DataConfig()
    data_cfg = override(schema.Config("eval", detector.config, data=data_cfg), args.overrides).data
    split = resolve_split(args.data, args.split or data_cfg.val_split, "val", data_cfg.task)
    ds = read_split(args.data, split, task=data_cfg.task, skip_bad=data_cfg.skip_bad)
    infer = detector.infer_masks if data_cfg.task != "detection" else detector.infer
    run = os.path.isdir(os.path.join(args.checkpoint, "checkpoints"))
    out = args.out or (os.path.join(args.checkpoint, "eval") if run else None)
    metrics = evaluate(infer, ds, data_cfg, batch_size=args.batch_size, out_dir=out,
                       class_ids=detector.config.class_ids, diagnose=True)
    if out and os.path.isfile(os.path.join(out, "per_class.json")):
        from detrax.evaluation.diagnostics import table

        with open(os.path.join(out, "per_class.json")) as f:
            print(f"{table(json.load(f))}\ndiagnostics in {out}", file=sys.stderr)
    print(json.dumps(metrics))
    return 0


def cmd_export(args) -> int:
    import dataclasses

    import detrax
    from detrax.serving.export import FORMATS, Shape, export

    if args.format not in FORMATS:  # before the weights are read
        raise ValueError(f"unknown export format {args.format!r}; formats: {', '.join(sorted(FORMATS))}")
    shape = Shape(args.batch, *_size(args.size))
    detector = detrax.load(args.checkpoint, weights=args.weights)
    done = {"out": args.out, "format": args.format, "shape": dataclasses.asdict(shape),
            "dtype": args.dtype or detector.config.dtype}
    if not args.quantize:
        export(detector, args.out, args.format, shape, dtype=args.dtype)
        print(json.dumps(done))
        return 0
    from detrax.serving.quantize import calibration_images

    source, split = _calibration_source(args)
    images, about = calibration_images(source, args.calibration_images, split)
    export(detector, args.out, args.format, shape, dtype=args.dtype, quantize=args.quantize, calibration=images,
           calibration_about=about, calibration_method=args.calibration_method)
    done |= {"quantize": args.quantize, "calibration": about | {"images_used": len(images)}}
    if "data" in about:  # the accuracy it kept, on the data's val split
        from detrax.evaluation.coco import accuracy_kept

        kept = done["accuracy"] = accuracy_kept(detector, detector.with_runtime("onnxruntime", onnx=args.out),
                                                about["data"], "int8", args.tolerance)
        if kept.get("within_tolerance") is False:
            print(f"detrax export: int8 AP50 {kept['int8_AP50']} is more than {args.tolerance} points below "
                  f"float32's {kept['float32_AP50']} on {about['data']} {kept['split']}", file=sys.stderr)
    print(json.dumps(done))
    return 0


def _calibration_source(args) -> tuple[str, str]:
    """--calibration, else the training split the run (a workdir) recorded."""
    from detrax.training.start import read_record

    if args.calibration:
        return args.calibration, "auto"
    data = (read_record(args.checkpoint) or {}).get("data") if os.path.isdir(args.checkpoint) else None
    if not data or not os.path.isdir(data.get("path", "")):
        raise ValueError(f"{args.checkpoint}: no training data recorded here to calibrate int8 on; give "
                         "--calibration DATA_OR_IMAGES")
    return data["path"], data.get("split") or "auto"


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
    from detrax.config import presets
    from detrax.data.sources import read_split
    from detrax.data.synthetic import write_dataset
    from detrax.serving.images import read_image, write_results
    from detrax.training.loop import Run, fit

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
    ev = (summary.get("best") or {}).get("eval") or summary.get("eval_ema") or summary["eval"] or {}  # as loaded
    print(json.dumps({"AP": ev.get("AP"), "AP50": ev.get("AP50"), "minutes": round((time.time() - t0) / 60, 1),
                      "workdir": args.workdir, "predictions": out}))
    return 0

"""The `detrax` command: a thin layer over the library API. The parser is here; what each command does is in
`commands`."""

from __future__ import annotations

import argparse
import sys

from detrax import commands
from detrax.config.schema import DataConfig
from detrax.serving import panoptic, postprocess
from detrax.serving.infer import BATCH_SIZE
from detrax.weights.opener import WEIGHTS

VAL = DataConfig()  # the official val transform: what weights files that record none are resized by


def _weights_arg(s: argparse.ArgumentParser) -> None:
    """--weights: which weights of a training run."""
    s.add_argument("--weights", choices=WEIGHTS, default="auto", help="of a training run: best (its best evaluated, "
                   "train.keep_best), last (its latest checkpoint's; their moving average where it keeps one, "
                   "train.ema_decay), raw (the latest trained weights themselves); auto: best where kept, else last")


def _runtime_args(s: argparse.ArgumentParser) -> None:
    """--runtime, --model and --weights, of the commands that run a model (predict, eval)."""
    _weights_arg(s)
    s.add_argument("--runtime", default="xla", help="what runs the model: xla, onnxruntime or openvino "
                   "(detrax.serving.runtimes; the latter two export it to ONNX first, unless --model)")
    s.add_argument("--model", default=None, help="with --runtime onnxruntime or openvino: the exported file to run "
                   "(`detrax export --format onnx`), so that what is measured is the file that ships")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detrax", description="DETR in JAX and Flax NNX")
    p.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh and keep nothing "
                   "(default: JAX's persistent compilation cache in ~/.cache/detrax/jax or $DETRAX_COMPILATION_CACHE; "
                   "DETRAX_COMPILATION_CACHE=off also turns it off)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("predict", help="detect objects in images; writes results.json and drawn images")
    s.add_argument("checkpoint", help="detrax weights (.safetensors), an official/HF checkpoint, or random:PRESET")
    s.add_argument("paths", nargs="*", help="image files or folders (none: generate synthetic scenes)")
    s.add_argument("--out", default="runs/predict", help="output folder")
    s.add_argument("--threshold", type=_threshold, default=None,
                   help=f"score to keep a detection or segment (default {postprocess.THRESHOLD}; {panoptic.THRESHOLD} "
                   "for panoptic, as the official); auto: each class's F1-best score from the run's "
                   "eval/thresholds.json (`detrax eval RUN` writes it)")
    s.add_argument("--task", choices=("detection", "panoptic", "segm"), default="detection",
                   help="panoptic: segments as COCO panoptic PNGs + panoptic.json, drawn; segm: detections with "
                   "masks (RLE in results.json); both need a model with a mask head")
    s.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    s.add_argument("--size", type=int, default=None,
                   help=f"shorter side after resizing (default: a run's own val_size; {VAL.val_size} for weights "
                   "files)")
    s.add_argument("--max-size", type=int, default=None,
                   help=f"longer side at most (default: as --size, {VAL.max_size})")
    s.add_argument("--generate", type=int, default=2, help="synthetic scenes to make when no image is given")
    s.add_argument("--attention", action="store_true", help="also write <image>_attention.png: each detection's "
                   "decoder cross-attention, and encoder self-attention at the first detections' centres")
    s.add_argument("--attention-points", type=int, default=2, help="encoder self-attention points (box centres)")
    s.add_argument("--seed", type=int, default=0)
    _runtime_args(s)
    s.set_defaults(func=commands.cmd_predict)

    s = sub.add_parser("serve", help="an HTTP service: POST /detect, GET /health, /info, and a page at / (the serve "
                       "extra)")
    s.add_argument("checkpoint", help="a training workdir, detrax weights, an official/HF checkpoint, or random:PRESET")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=8, help="requests run as one batch at most")
    s.add_argument("--window-ms", type=float, default=10.0, help="how long a request waits for others to join it")
    s.add_argument("--queue", type=int, default=64, help="requests waiting at most; one more is answered 503")
    s.add_argument("--max-mb", type=float, default=20.0, help="an upload's size at most, in MiB (413 above)")
    _runtime_args(s)
    s.set_defaults(func=commands.cmd_serve)

    s = sub.add_parser("convert", help="official DETR / HF DETR / torchvision ResNet / BiT / MasterSkepticista/detr "
                       "weights -> detrax weights; with --to, a detrax model -> an official or HF DETR")
    s.add_argument("src", help=".pth/.pt/.bin (needs the torch extra), .safetensors, BiT's .npz, or a Flax msgpack "
                   "checkpoint of MasterSkepticista/detr (checkpoint_<step>); with --to, also a training workdir")
    s.add_argument("dst", help="output .safetensors (--to official: a .pth file; --to hf: a folder)")
    s.add_argument("--to", choices=["detrax", "official", "hf"], default="detrax",
                   help="official: {'model': state_dict, 'args'} for facebookresearch/detr's build_model (DETRsegm "
                   "for a mask model); hf: config.json and model.safetensors for transformers' from_pretrained")
    s.add_argument("--dilation", action="store_true", help="DC5 model (also implied by 'dc5' in the file name)")
    s.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, where the weights cannot tell (official, HF: 8)")
    s.add_argument("--preset", default=None, help="record this preset's val transform in the file (e.g. "
                   "detr_r50_640 for weights trained at 640), which `detrax.load`, eval and predict then use")
    _weights_arg(s)
    s.set_defaults(func=commands.cmd_convert)

    s = sub.add_parser("export", help="a detector for serving, with the weights inside: stablehlo (pixels in, "
                       "detections out) or onnx (pixels in, model outputs out); any batch and size unless fixed")
    s.add_argument("checkpoint", help="a training workdir, detrax weights, or an official/HF checkpoint")
    s.add_argument("out", help="the file to write")
    s.add_argument("--format", default="stablehlo", help="a registered export format (detrax.serving.export.FORMATS)")
    _weights_arg(s)
    s.add_argument("--batch", type=int, default=None, help="images per call (default: any)")
    s.add_argument("--size", default=None, help="HxW: the padded canvas (default: any size)")
    s.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype of the exported model (default: the model's)")
    s.add_argument("--quantize", choices=("int8",), default=None, help="onnx: post-training int8 quantization "
                   "(detrax.serving.quantize), then AP50 and AP of float32 and int8 on the calibration data's val "
                   "split")
    s.add_argument("--calibration", default=None, help="with --quantize: a data folder (its training split), an "
                   "image or a folder of images (default: the run's own training data)")
    s.add_argument("--calibration-images", type=int, default=64, help="with --quantize: how many images")
    s.add_argument("--calibration-method", default="minmax", help="with --quantize: minmax (each activation's "
                   "range) or percentile (its 99.999th percentile: an outlier moves it less; about 4x slower)")
    s.add_argument("--tolerance", type=float, default=1.0,
                   help="with --quantize: AP50 points int8 may lose against float32 before it is reported")
    s.set_defaults(func=commands.cmd_export)

    s = sub.add_parser("train", help="train a DETR on a COCO-format folder")
    s.add_argument("--config", default=None, help="a preset of detrax.config.schema (default: detr_r50; with --resume, "
                   "the run's own config)")
    s.add_argument("--data", required=True, help="a COCO-format, YOLO or Pascal VOC folder, or "
                   "tfds:coco/2017[@DATA_DIR]")
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
    s.set_defaults(func=commands.cmd_train)

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
    s.set_defaults(func=commands.cmd_demo)

    s = sub.add_parser("eval", help="COCO AP of a checkpoint or a training run's workdir")
    s.add_argument("checkpoint", help="detrax weights, an official/HF checkpoint, or a training workdir")
    s.add_argument("--data", required=True, help="a COCO-format, YOLO or Pascal VOC folder, or "
                   "tfds:coco/2017[@DATA_DIR]")
    s.add_argument("--split", default=None, help="default: the split named val*")
    s.add_argument("--config", default=None, help="preset whose data settings (val_size, ...) to use (default: "
                   f"a run's own, or the one a weights file records; else the official {VAL.val_size}/{VAL.max_size})")
    s.add_argument("--out", default=None, help="write metrics.json, results.json and the diagnostics (per class, "
                   "precision-recall, thresholds, confusion, errors) here (default: RUN/eval for a training workdir)")
    s.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    s.add_argument("overrides", nargs="*", help="key=value overrides of data settings, e.g. data.val_size=640")
    _runtime_args(s)
    s.set_defaults(func=commands.cmd_eval)

    data = sub.add_parser("data", help="datasets: make a synthetic one, check one, convert one").add_subparsers(
        dest="data_command", required=True)
    s = data.add_parser("synth", help="write a COCO-format folder of synthetic shapes (train and val)")
    s.add_argument("out")
    s.add_argument("--num-images", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", default=None, help="HxW of every image (default: each 128-192 on either side; "
                   "128x160 with --panoptic)")
    s.add_argument("--panoptic", action="store_true", help="a COCO panoptic folder instead: the shapes as things "
                   "over sky and ground (stuff); every segment also as an instance (boxes, RLE masks)")
    s.set_defaults(func=commands.cmd_data_synth)
    s = data.add_parser("check", help="read a dataset as training would; print a JSON report; exit 1 if bad")
    s.add_argument("dir")
    s.add_argument("--split", default=None, help="one split (default: every split found)")
    s.add_argument("--max-targets", type=int, default=100)
    s.add_argument("--pretty", action="store_true")
    s.set_defaults(func=commands.cmd_data_check)
    s = data.add_parser("convert", help="write a dataset (YOLO, Pascal VOC, COCO) as a COCO folder")
    s.add_argument("src")
    s.add_argument("dst", help="a new or empty folder")
    s.add_argument("--to", default="coco", help="the format written: coco")
    s.add_argument("--skip-bad", action="store_true", help="skip and count bad labels and images (default: stop "
                   "at the first, naming its file)")
    s.set_defaults(func=commands.cmd_data_convert)
    return p


def _threshold(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a score (0.7) or auto") from None


def main(argv=None) -> int:
    if argv is None:  # the `detrax` command owns its process: CPU convolutions through Eigen (devices.py)
        from detrax.training.devices import prefer_eigen_convolutions

        prefer_eigen_convolutions()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (argparse takes one block of positionals)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from detrax.errors import TrainingError
    from detrax.serving import compilation_cache

    if args.no_compile_cache:
        compilation_cache.disable()
    compilation_cache.enable()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"detrax: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"detrax: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

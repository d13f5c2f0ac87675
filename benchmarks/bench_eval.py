"""The evaluation during training, as `detrax demo` runs it (the demo preset, its 250 synthetic val images, batch
8): the one inference path on the live training state (uint8 batches normalised and post-processed on the
device) against the path it replaced, run in the same process as its peer: the weights copied to the host and
set into a separate `Detector` at every evaluation, pixels normalised in float32 on the device, pulled back to
the host and sent again, post-processing on the host. Both read the same loader batches and give the same AP
(checked). Each path is timed on its second evaluation (the first compiles).

    .venv/bin/python benchmarks/bench_eval.py [--images 250] [--repeats 2]
"""

import argparse
import tempfile
import time

import numpy as np
import record


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=250)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    import jax
    from flax import nnx

    from detrax.api import Detector
    from detrax.config import presets
    from detrax.config.overrides import override
    from detrax.data.sources import read_split
    from detrax.data.synthetic import write_dataset
    from detrax.data.transforms import normalize_batch
    from detrax.evaluation.coco import evaluate
    from detrax.models.detr import DETR, assemble, weight_arrays
    from detrax.serving.infer import make_infer
    from detrax.serving.postprocess import postprocess
    from detrax.training.devices import local_copy

    root = tempfile.mkdtemp(prefix="bench-eval-")
    write_dataset(root, args.images + 8, seed=0, val_fraction=args.images / (args.images + 8))
    cfg = override(presets.get("demo"), ["model.num_classes=4"])  # the synthetic shapes: ids 1..3
    val = read_split(root, "val")
    model = DETR(cfg.model, rngs=nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))  # as training's
    bs = cfg.train.batch_size

    infer = make_infer(graphdef)
    live = lambda pixels, mask, sizes: infer(state, pixels, mask, sizes)

    detector = []

    def previous(pixels, mask, sizes):  # the replaced path, step by step
        c = cfg.model
        normalised = np.asarray(normalize_batch(pixels, mask, c.pixel_mean, c.pixel_std))  # float32, back to the host
        out = detector[0](normalised, mask)  # sent again
        return postprocess(jax.device_get(out), sizes)

    def previous_eval():
        local = {k: local_copy(v) for k, v in weight_arrays(nnx.merge(graphdef, state)).items()}  # to the host
        if detector:
            detector[0].set_weights(local)
        else:
            detector.append(Detector(assemble(cfg.model, local)))
        return evaluate(previous, val, cfg.data, batch_size=bs)

    times, aps = {"infer": [], "previous": []}, {}
    for _ in range(args.repeats):
        for name, run in (("infer", lambda: evaluate(live, val, cfg.data, batch_size=bs)), ("previous", previous_eval)):
            t0 = time.perf_counter()
            aps[name] = run()
            times[name].append(time.perf_counter() - t0)
    same = all(abs(aps["infer"][k] - aps["previous"][k]) < 1e-6 for k in aps["infer"])
    new, old = min(times["infer"][1:] or times["infer"]), min(times["previous"][1:] or times["previous"])
    cpu = record.cpu()
    print(f"{cpu}: evaluation of {len(val.records)} images, demo preset, batch {bs}: one inference path "
          f"{new:.2f} s, previous path {old:.2f} s; ratio {new / old:.2f}; same AP: {same} "
          f"(first evaluations, with compiles: {times['infer'][0]:.1f} s / {times['previous'][0]:.1f} s)")
    record.finish({"cpu": cpu, "images": len(val.records), "infer_s": round(new, 3), "previous_s": round(old, 3),
                   "ratio": round(new / old, 3), "first_infer_s": round(times["infer"][0], 2),
                   "first_previous_s": round(times["previous"][0], 2), "same_ap": same})


if __name__ == "__main__":
    main()

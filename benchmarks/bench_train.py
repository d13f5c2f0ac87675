"""DETR-R50 training step (batch 2 at 512x512, 3 boxes per image, backbone stages 2-4 trainable, AdamW, clip 0.1):
detrax against HF transformers' DETR in PyTorch, each in its own subprocess, same machine, same run; the workers
alternate over `--rounds`. `detrax` runs as the `detrax` command does (CPU convolutions through Eigen:
devices.prefer_eigen_convolutions), `detrax_ynn` with XLA's default flags (YNNPACK convolutions).

    .venv/bin/python benchmarks/bench_train.py [--iters 5] [--size 512] [--rounds 2]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import record

B, NBOX = 2, 3
KINDS = ("detrax", "detrax_ynn", "torch")  # detrax as the `detrax` command runs it; with XLA's default flags; HF


def batch(size, seed=0):
    rs = np.random.default_rng(seed)
    pixels = rs.integers(0, 256, (B, size, size, 3)).astype(np.uint8)
    boxes = np.concatenate([rs.uniform(0.3, 0.7, (B, NBOX, 2)), rs.uniform(0.1, 0.3, (B, NBOX, 2))], -1)
    return pixels, boxes.astype(np.float32), rs.integers(1, 91, (B, NBOX))


def worker_detrax(size, iters):
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from detrax.config import presets
    from detrax.config.overrides import override
    from detrax.criterion.loss import set_loss
    from detrax.models.detr import DETR
    from detrax.training.optim import learning_rates, optimizer
    from detrax.training.step import make_train_step

    cfg = override(presets.get("detr_r50"), ["model.num_classes=91"])  # COCO
    model = DETR(cfg.model, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optimizer(cfg.train), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    step = make_train_step(graphdef, lambda o, t: set_loss(o, t, cfg.loss, mesh=mesh),
                           learning_rates(cfg.train, 10**6, 10**6))
    pixels, boxes, labels = batch(size)
    m = 100
    b = {"pixels": pixels, "mask": np.ones(pixels.shape[:3], bool), "labels": np.zeros((B, m), np.int32),
         "boxes": np.tile(np.array([0.5, 0.5, 1, 1], np.float32), (B, m, 1)), "valid": np.zeros((B, m), bool)}
    b["labels"][:, :NBOX], b["boxes"][:, :NBOX], b["valid"][:, :NBOX] = labels, boxes, True
    t0 = time.perf_counter()
    state, terms = step(state, b, 0)  # the first call traces, lowers and compiles: the wait a user sees
    jax.block_until_ready(terms)
    first_s = time.perf_counter() - t0
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        state, terms = step(state, b, i + 1)
        jax.block_until_ready(terms)
        times.append(time.perf_counter() - t0)
    compile_s = first_s - statistics.median(times)  # the first call less one step
    trainable = sum(v.size for v in jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[0].backbone, nnx.Param)))
    return {"compile_s": compile_s, "times": times, "loss": float(terms["loss"]), "backbone_trainable": int(trainable),
            "loss_times": loss_times(cfg, nnx.merge(graphdef, state)[0], b, iters)}


def loss_times(cfg, model, b, iters):
    """Matching and the set loss with their backward pass, on the model's outputs for this batch: what the
    step spends on them (the step's matcher, host round trip included)."""
    import jax

    from detrax.criterion.loss import set_loss

    model.eval()
    outputs = jax.jit(lambda m, x, mask: m(x, mask))(model, b["pixels"].astype("float32"), b["mask"])
    targets = {k: b[k] for k in ("labels", "boxes", "valid")}
    fn = jax.jit(jax.value_and_grad(lambda o: set_loss(o, targets, cfg.loss)["loss"]))
    jax.block_until_ready(fn(outputs))
    times = []
    for _ in range(max(iters, 5)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(outputs))
        times.append(time.perf_counter() - t0)
    return times


def worker_torch(size, iters):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DetrConfig(use_timm_backbone=False, num_labels=91, auxiliary_loss=True,
                                  backbone_config=transformers.ResNetConfig(depths=[3, 4, 6, 3],
                                                                            out_features=["stage4"]))
    model = transformers.DetrForObjectDetection(cfg).train()
    # HF's freezing rule looks for timm's names (layer2..4) and so freezes this ResNet's whole backbone; train
    # stages 2-4 (torchvision's layer2..4) as the official DETR does, and as detrax does
    for name, param in model.named_parameters():
        if "backbone" in name and any(f"encoder.stages.{i}." in name for i in (1, 2, 3)):
            param.requires_grad_(True)
    trainable = sum(p.numel() for n, p in model.named_parameters() if "backbone" in n and p.requires_grad)
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    opt = torch.optim.AdamW([{"params": rest}, {"params": backbone, "lr": 1e-5}], lr=1e-4, weight_decay=1e-4)
    pixels, boxes, labels = batch(size)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.225
    targets = [{"class_labels": torch.from_numpy(labels[i]), "boxes": torch.from_numpy(boxes[i])} for i in range(B)]

    def step():
        out = model(pixel_values=x, pixel_mask=torch.ones((B, size, size), dtype=torch.long), labels=targets)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        return out.loss

    step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"times": times, "backbone_trainable": int(trainable)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2, help="each worker this many times, alternating")
    p.add_argument("--worker", choices=KINDS)
    args = p.parse_args()
    if args.worker:
        if args.worker == "detrax":  # as the `detrax` command runs: CPU convolutions through Eigen
            from detrax.training.devices import prefer_eigen_convolutions

            prefer_eigen_convolutions()
        fn = worker_torch if args.worker == "torch" else worker_detrax
        res = fn(args.size, args.iters)
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    print(record.cpu(), flush=True)
    runs: dict[str, list] = {kind: [] for kind in KINDS}
    for _ in range(args.rounds):  # alternating, so that a noisy spell of the machine hits every worker
        for kind in KINDS:
            out = subprocess.run([sys.executable, __file__, "--worker", kind, "--size", str(args.size), "--iters",
                                  str(args.iters)], capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    figures = {}
    for kind, rs in runs.items():
        r = rs[-1]
        f = figures[kind] = {"median_s": round(statistics.median(t for x in rs for t in x["times"]), 3),
                             "round_medians_s": [round(statistics.median(x["times"]), 3) for x in rs],
                             "peak_rss_mib": round(max(x["peak_rss_mib"] for x in rs)),
                             "backbone_trainable": r["backbone_trainable"]}
        if "compile_s" in r:
            f["compile_s"] = round(statistics.median(x["compile_s"] for x in rs), 1)
            f["matching_loss_s"] = round(statistics.median(t for x in rs for t in x["loss_times"]), 4)
            f["matching_loss_share"] = round(f["matching_loss_s"] / f["median_s"], 4)
        print(f"{kind:10s} step median {f['median_s']:.3f} s (rounds {f['round_medians_s']})  peak RSS "
              f"{f['peak_rss_mib']} MiB" + (f"  compile {f['compile_s']} s  matching+loss {f['matching_loss_s']:.4f} s"
                                            f" ({100 * f['matching_loss_share']:.1f}% of the step)"
                                            if "compile_s" in f else ""), flush=True)
    if figures["detrax"]["backbone_trainable"] != figures["torch"]["backbone_trainable"]:
        raise SystemExit(f"unequal work: trainable backbone weights {figures['detrax']['backbone_trainable']} (detrax) "
                         f"vs {figures['torch']['backbone_trainable']} (torch)")
    figures["ratio_detrax_vs_torch"] = round(figures["detrax"]["median_s"] / figures["torch"]["median_s"], 3)
    figures["ratio_eigen_vs_ynnpack_convolutions"] = round(
        figures["detrax"]["median_s"] / figures["detrax_ynn"]["median_s"], 3)
    print(f"ratio detrax / torch: {figures['ratio_detrax_vs_torch']}; detrax's CPU convolutions through Eigen / "
          f"XLA's default (YNNPACK): {figures['ratio_eigen_vs_ynnpack_convolutions']}")
    record.finish(figures)


if __name__ == "__main__":
    main()

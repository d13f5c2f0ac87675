"""DETR-R50 training step (batch 2 at 512x512, 3 boxes per image, backbone stages 2-4 trainable, AdamW, clip 0.1):
detrax against HF transformers' DETR in PyTorch, each in its own subprocess, same machine, same run.

    .venv/bin/python benchmarks/bench_train.py [--iters 5] [--size 512]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

B, NBOX = 2, 3


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

    from detrax import configs
    from detrax.loss import set_loss
    from detrax.model import DETR
    from detrax.optim import optimizer
    from detrax.train_step import make_train_step

    cfg = configs.override(configs.get("detr_r50"), ["model.num_classes=91"])  # COCO
    model = DETR(cfg.model, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optimizer(cfg.train, 10**6, 10**6), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    step = make_train_step(graphdef, lambda o, t: set_loss(o, t, cfg.loss, mesh=mesh))
    pixels, boxes, labels = batch(size)
    m = 100
    b = {"pixels": pixels, "mask": np.ones(pixels.shape[:3], bool), "labels": np.zeros((B, m), np.int32),
         "boxes": np.tile(np.array([0.5, 0.5, 1, 1], np.float32), (B, m, 1)), "valid": np.zeros((B, m), bool)}
    b["labels"][:, :NBOX], b["boxes"][:, :NBOX], b["valid"][:, :NBOX] = labels, boxes, True
    t0 = time.perf_counter()
    step = step.trace(state, b, 0).lower().compile()  # trace, lower and compile: the compile time a user waits
    compile_s = time.perf_counter() - t0
    state, terms = step(state, b, 0)
    jax.block_until_ready(terms)
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        state, terms = step(state, b, i + 1)
        jax.block_until_ready(terms)
        times.append(time.perf_counter() - t0)
    trainable = sum(v.size for v in jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[0].backbone, nnx.Param)))
    return {"compile_s": compile_s, "times": times, "loss": float(terms["loss"]), "backbone_trainable": int(trainable),
            "loss_times": loss_times(cfg, nnx.merge(graphdef, state)[0], b, iters)}


def loss_times(cfg, model, b, iters):
    """Matching and the set loss with their backward pass, on the model's outputs for this batch: what the
    step spends on them (the step's matcher, host round trip included)."""
    import jax

    from detrax.loss import set_loss

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
    p.add_argument("--worker", choices=["detrax", "torch"])
    args = p.parse_args()
    if args.worker:
        fn = worker_detrax if args.worker == "detrax" else worker_torch
        res = fn(args.size, args.iters)
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    figures = {}
    for kind in ("detrax", "torch"):
        out = subprocess.run([sys.executable, __file__, "--worker", kind, "--size", str(args.size), "--iters",
                              str(args.iters)], capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        figures[kind] = {"median_s": round(statistics.median(r["times"]), 3), "peak_rss_mib": round(r["peak_rss_mib"]),
                         "backbone_trainable": r["backbone_trainable"]}
        if "compile_s" in r:
            f = figures[kind]
            f["compile_s"] = round(r["compile_s"], 1)
            f["matching_loss_s"] = round(statistics.median(r["loss_times"]), 4)
            f["matching_loss_share"] = round(f["matching_loss_s"] / f["median_s"], 4)
        print(f"{kind:7s} step median {figures[kind]['median_s']:.3f} s  peak RSS {figures[kind]['peak_rss_mib']} MiB"
              + (f"  compile {figures[kind]['compile_s']} s  matching+loss {figures[kind]['matching_loss_s']:.4f} s"
                 f" ({100 * figures[kind]['matching_loss_share']:.1f}% of the step)" if "compile_s" in r else ""),
              flush=True)
    if figures["detrax"]["backbone_trainable"] != figures["torch"]["backbone_trainable"]:
        raise SystemExit(f"unequal work: trainable backbone weights {figures['detrax']['backbone_trainable']} (detrax) "
                         f"vs {figures['torch']['backbone_trainable']} (torch)")
    figures["ratio_detrax_vs_torch"] = round(figures["detrax"]["median_s"] / figures["torch"]["median_s"], 3)
    print(f"ratio detrax / torch: {figures['ratio_detrax_vs_torch']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

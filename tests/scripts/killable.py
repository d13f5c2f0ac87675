"""`detrax train --resume` of a tiny DETR, for the kill and signal tests (tests/test_reliability.py):
argv = data_dir workdir steps [key=value ...]. One batch shape and an on-device matcher, so that JAX's persistent
compilation cache spares every relaunch its compile."""

import sys

from detrax import cli

if __name__ == "__main__":
    data, workdir, steps, *extra = sys.argv[1:]
    sys.exit(cli.main(["train", "--config", "tiny", "--data", data, "--workdir", workdir, "--resume",
                       f"train.steps={steps}", "train.batch_size=2", "train.ckpt_every=2", "train.keep=2",
                       "train.log_every=1", "train.eval_every=0", "data.workers=0", "model.dropout=0.1",
                       "data.scales=64,80", "data.max_size=96", "data.crop_scales=48,64", "data.crop_size=32,48",
                       "data.val_size=64", "data.max_targets=8", "data.bucket_step=96",
                       "loss.matcher=hungarian_jax", *extra]))  # no host callback: the compilation cache holds it

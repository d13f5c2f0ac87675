"""One of two processes of a multi-host run on localhost with CPU collectives (run by tests/test_distributed.py):
argv = process_id port data_dir workdir steps [resume]. Trains (or resumes) a tiny DETR for `steps` steps,
prints the digest of its final parameters and how it ended; exits 128 + the signal that stopped it, if one did."""

import json
import os
import signal
import sys
from pathlib import Path

if os.environ.get("DETRAX_SUITE_CPUS"):  # every CPU of the run, not the share of the test worker that started it
    os.sched_setaffinity(0, [int(c) for c in os.environ["DETRAX_SUITE_CPUS"].split(",")])

import jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: digests


def every_process_writes_the_compilation_cache():
    """JAX writes its persistent compilation cache from process 0 alone (many hosts, one shared folder); process
    1's programs run on its own device, under keys of their own, and it compiled them again at every launch of
    the tests. Here each process writes its own (a test's speed, not the run's behaviour)."""
    from jax._src import compiler, distributed

    write = compiler._cache_write

    def as_process_zero(*args, **kwargs):
        process_id, distributed.global_state.process_id = distributed.global_state.process_id, 0
        try:
            return write(*args, **kwargs)
        finally:
            distributed.global_state.process_id = process_id

    compiler._cache_write = as_process_zero


def main(process_id, port, data_dir, workdir, steps, resume):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    every_process_writes_the_compilation_cache()
    from digests import params_digest

    from detrax.config import presets
    from detrax.config.overrides import override
    from detrax.training.loop import Run, fit

    cfg = override(presets.get("tiny"), [  # one batch shape: one compile; one layer each (a cheaper step)
        "model.enc_layers=1", "model.dec_layers=1", f"train.steps={steps}", "train.batch_size=4", "train.ckpt_every=2",
        "train.log_every=1", "data.workers=0", "data.scales=64,80", "data.max_size=96", "data.crop_scales=48,64",
        "data.crop_size=32,48", "data.max_targets=8", "data.bucket_step=96", "data.val_split=none",
        "loss.matcher=hungarian_jax"])
    from detrax.training import loop

    seen = []  # the images this process read, in order: each host reads its own shard

    class Recording(loop.Loader):
        def __next__(self):
            batch = super().__next__()
            seen.extend(int(i) for i in batch["image_id"][batch["real"]])
            return batch

    loop.Loader = Recording
    summary = fit(cfg, Run(data_dir, workdir, quiet=True, resume=resume))
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "digest": params_digest(summary["params"]),
                      "step": summary["step"], "stopped": summary["stopped"], "images": seen,
                      "torch": "torch" in sys.modules}), flush=True)
    jax.distributed.shutdown()
    return 128 + signal.Signals[summary["stopped"]].value if summary["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]),
                  sys.argv[6:] == ["resume"]))

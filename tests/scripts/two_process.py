"""One of two processes of a multi-host run on localhost with CPU collectives (run by tests/test_distributed.py):
argv = process_id port data_dir workdir. Trains a few steps, prints the digest of its final parameters."""

import json
import sys

import jax


def main(process_id, port, data_dir, workdir):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    from detrax import configs
    from detrax.train import Run, fit, params_digest

    cfg = configs.override(configs.get("demo"), ["train.steps=3", "train.batch_size=4", "train.eval_every=0",
                                                 "train.log_every=1", "model.dropout=0.1"])
    summary = fit(cfg, Run(data_dir, workdir, quiet=True))
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "digest": params_digest(summary["params"]),
                      "loss": summary["train"]["loss"]}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])

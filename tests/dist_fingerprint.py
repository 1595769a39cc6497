"""Launched by tests/test_train.py under torchrun: train with train.main(argv), then print this rank's fingerprint of
the trained network's full weights (one float: equal on every rank when data parallelism is right).

    torchrun --standalone --nproc_per_node=2 tests/dist_fingerprint.py --stage=ode --prompts=... (train.py settings)

The process group is started here, not by train.main, so it outlives training: gathering FSDP shards is a collective.
"""

import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import plumbing  # noqa: E402
import train  # noqa: E402


def fingerprint(model):
    sd = plumbing.full_state_dict(model, all_ranks=True)
    return sum(float(v.double().sum()) + 1e-3 * float(v.double().abs().sum()) for v in sd.values())


def main(argv):
    proc = plumbing.Proc.setup()  # the same device rule as train.py's default --device=auto
    try:
        net = train.main(argv)
        print(f"rank {proc.rank} student fingerprint {fingerprint(net):.10e}", flush=True)
        del net  # freed (cycles too) while the group lives: gloo work freed at interpreter exit can abort the process
        gc.collect()
        proc.barrier()
    finally:
        proc.close()


if __name__ == "__main__":
    main(sys.argv[1:])

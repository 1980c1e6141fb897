"""The algorithm cases every backend runs under mpirun (tests/mpi/train_driver.py)."""

from __future__ import annotations

STEPS = 12

# A tiny learnable problem with BatchNorm, so that BN averaging crosses real ranks too.
BASE = [
    "seed=3",
    "model.name=smallcnn",
    "model.width=4",
    "data.name=synthetic",
    "data.synthetic.train_samples=512",
    "data.synthetic.test_samples=64",
    "data.synthetic.shape=[1, 8, 8]",
    "data.synthetic.num_classes=4",
    "data.batch_size=8",
    "data.eval_batch_size=32",
    "optim.lr_per_256=3.2",
    "optim.momentum=0.9",
    "optim.weight_decay=0.001",
    "optim.warmup_epochs=0.25",
    "optim.schedule=cosine",
    f"train.max_steps={STEPS}",
    "train.epochs=10",
    "train.eval_every_epochs=100",
    "train.threads=1",
    "output.metrics_flush_seconds=0",
]

CASES: dict[str, list[str]] = {
    "allreduce": ["algorithm.method=allreduce"],
    "local_H1": ["algorithm.method=local_sgd", "algorithm.sync_period=1", "algorithm.average_bn_buffers=false"],
    "local_H4": ["algorithm.method=local_sgd", "algorithm.sync_period=4"],
    "local_H3_avg_momentum": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=3",
        "algorithm.momentum_buffers=average",
    ],
    "post_local_H3": ["algorithm.method=post_local_sgd", "algorithm.sync_period=3", "algorithm.switch_step=6"],
    "slowmo_a1_b0_H4": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=4",
        "algorithm.outer=slowmo",
        "algorithm.slow_lr=1.0",
        "algorithm.slow_momentum=0.0",
    ],
    "slowmo_H4": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=4",
        "algorithm.outer=slowmo",
        "algorithm.slow_momentum=0.5",
    ],
    # Evaluating every 3 steps (between syncs) must not change the trajectory of local_H4.
    "local_H4_evaluated": ["algorithm.method=local_sgd", "algorithm.sync_period=4", "train.eval_every_epochs=0.1"],
    "nesterov_H4": ["algorithm.method=local_sgd", "algorithm.sync_period=4", "algorithm.outer=nesterov"],
}

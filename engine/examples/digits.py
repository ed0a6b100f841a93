"""The main job: an MLP on the built-in 8x8 digits, on the best available device.

    python -m engine.examples.digits [--epochs 40] [--device cuda] [--out runs/digits]
    mpiexec -n 2 python -m engine.examples.digits --distributed     # data parallel over 2 ranks

Standardises the pixels (fitted on the training split only), trains with AdamW, validation,
early stopping and atomic checkpoints, then reports test accuracy, macro precision/recall/F1 and
time per epoch. On a CPU the Linear+ReLU pairs and the loss run the fused numba kernels; on a GPU
the CUDA ones.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import engine
from engine.examples import DEVICE_HELP, argument_parser, chosen_device
from engine import metrics, nn, optim
from engine.data import DataLoader, StandardScaler, TensorDataset, load_digits, train_val_test_split
from engine.train import EarlyStopping, ModelCheckpoint, Trainer


def build_model(hidden: int = 256, dropout: float = 0.1, device=None) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden, device=device), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden // 2, device=device), nn.ReLU(),
        nn.Linear(hidden // 2, 10, device=device),
    )


def prepare(seed: int = 0):
    """Stratified 70/15/15 split of the digits, standardised with train statistics only."""
    x, y = load_digits()
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = train_val_test_split(
        x, y, val=0.15, test=0.15, stratify=True, seed=seed)
    scaler = StandardScaler().fit(x_train)
    return [(scaler.transform(a).astype(np.float32), b) for a, b in
            ((x_train, y_train), (x_val, y_val), (x_test, y_test))]


def main(argv=None) -> dict:
    args = _parse(argv)
    engine.manual_seed(args.seed)
    device = chosen_device(args.device)
    world, main_rank, batch_size = 1, True, args.batch_size
    if args.distributed:  # one rank per process of mpiexec; each reads 1/world of every batch
        import engine.distributed as dist

        if device.type == "cuda":
            device = engine.device(f"cuda:{dist_local_rank() % engine.cuda_device_count()}")
            engine.set_default_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "mpi")
        world, main_rank = dist.get_world_size(), dist.get_rank() == 0
        batch_size = max(1, args.batch_size // world)
    say = print if main_rank else (lambda *a, **k: None)
    train, val, test = prepare(args.seed)
    model = build_model(device=device)
    optimizer = optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    checkpoints = ModelCheckpoint(Path(args.out), monitor="val_accuracy")
    trainer = Trainer(model, optimizer, metrics=["accuracy"], verbose=0 if args.quiet else 1,
                      distributed=args.distributed,
                      scheduler=optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs),
                      callbacks=[EarlyStopping(monitor="val_loss", patience=8), checkpoints])
    loader = DataLoader(TensorDataset(engine.tensor(train[0]), engine.tensor(train[1])),
                        batch_size=batch_size, shuffle=True)
    say(f"training a {model.num_parameters():,}-parameter MLP on {len(train[0])} digits, device {device}")
    if args.distributed:
        say(f"data parallel on {world} rank(s) ({dist.get_backend()}): batch {batch_size} per rank, "
            f"{batch_size * world} in all")
    start = time.perf_counter()
    history = trainer.fit(loader, epochs=args.epochs, val_data=val, batch_size=512)
    seconds = time.perf_counter() - start

    logits = trainer.predict(engine.tensor(test[0]))
    predicted, truth = logits.argmax(axis=1).numpy(), test[1]
    report = {
        "device": str(device),
        "world_size": world,
        "epochs": len(history),
        "seconds": seconds,
        # median: the first epoch also compiles (or loads from cache) the numba kernels
        "seconds_per_epoch": float(np.median(history["epoch_time"])),
        "test_accuracy": metrics.accuracy(predicted, truth),
        "test_precision": metrics.precision(predicted, truth, average="macro"),
        "test_recall": metrics.recall(predicted, truth, average="macro"),
        "test_f1": metrics.f1_score(predicted, truth, average="macro"),
        "best_checkpoint": str(checkpoints.best_path),
    }
    say(f"test accuracy {report['test_accuracy']:.4f}  precision {report['test_precision']:.4f}  "
          f"recall {report['test_recall']:.4f}  F1 {report['test_f1']:.4f}")
    say(f"{report['epochs']} epochs in {seconds:.1f}s (median {report['seconds_per_epoch'] * 1000:.0f} ms per epoch) "
          f"on {device}{f' x {world} ranks' if world > 1 else ''}; best checkpoint: {report['best_checkpoint']}")
    return report


def _parse(argv):
    parser = argument_parser("digits", __doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per optimizer step")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (cosine annealed over the epochs)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--out", default="runs/digits", help="checkpoint directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (weights, shuffling)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    parser.add_argument("--distributed", action="store_true",
                        help="data parallel over the ranks of mpiexec (mpiexec -n 2 python -m engine.examples.digits "
                             "--distributed); --batch-size stays the global batch")
    return parser.parse_args(argv)


def dist_local_rank() -> int:
    """This process's rank among those on its node, before any process group exists (picks its GPU)."""
    from mpi4py import MPI

    shared = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    rank = shared.Get_rank()
    shared.Free()
    return rank


if __name__ == "__main__":
    main()

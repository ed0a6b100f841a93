"""Trainer(distributed=True) under mpiexec: rank 0 alone logs and writes checkpoints, figures are
the ranks' combined ones (identical on every rank), the checkpoint loads without DDP, and a run
resumed from a checkpoint ends with the parameters of an uninterrupted one. Arg: a scratch dir."""

import sys
from pathlib import Path

import numpy as np

import engine
import engine.distributed as dist
from engine import nn, optim
from engine.data import DataLoader, DistributedSampler, TensorDataset
from engine.nn.parallel import DistributedDataParallel
from engine.train import ModelCheckpoint, Trainer

out = Path(sys.argv[1])
dist.init_process_group()
r, w = dist.get_rank(), dist.get_world_size()
rng = np.random.default_rng(0)
x = rng.standard_normal((90, 6)).astype(np.float32)
y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)


def make(seed=0):
    engine.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
    return model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def run(epochs, directory=None, resume=None):
    model, opt = make()
    lines = []
    callbacks = [ModelCheckpoint(directory, monitor=None)] if directory else []
    trainer = Trainer(model, opt, metrics=["accuracy"], callbacks=callbacks, log=lines.append, distributed=True)
    assert isinstance(trainer.model, DistributedDataParallel)
    if resume:
        trainer.load_checkpoint(resume)
    loader = DataLoader(TensorDataset(engine.tensor(x), engine.tensor(y)), batch_size=8, shuffle=True)
    history = trainer.fit(loader, epochs=epochs, val_data=(x, y))
    assert isinstance(trainer.train_loader.sampler, DistributedSampler)
    return trainer, history, lines, model


trainer, history, lines, model = run(4)
assert (len(lines) == 4) if r == 0 else (lines == []), lines  # only rank 0 logs
figures = np.array([history["loss"], history["accuracy"], history["val_loss"]])
gathered = [engine.zeros(*figures.shape, dtype=engine.float64) for _ in range(w)]
dist.all_gather(gathered, engine.tensor(figures))
assert all(np.array_equal(g.numpy(), figures) for g in gathered), "ranks report different figures"
final = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])

# checkpoints: written by rank 0, readable by every rank after fit returns, loadable without DDP
_, _, _, _ = run(2, directory=out / "ckpt")
assert (out / "ckpt" / "last.ckpt").exists()
state = engine.load(out / "ckpt" / "last.ckpt")
assert all(not k.startswith("module.") for k in state["model"]), list(state["model"])
plain, _ = make()
plain.load_state_dict(state["model"])

# resume from epoch 2 to 4 == the uninterrupted 4 epochs
_, resumed_history, _, resumed = run(4, resume=out / "ckpt" / "last.ckpt")
np.testing.assert_allclose(np.concatenate([p.detach().numpy().ravel() for p in resumed.parameters()]), final,
                           rtol=1e-6, atol=1e-7)
assert len(resumed_history) == 4

# a ZeRO-sharded optimizer: the checkpoint gathers its state onto rank 0's file, which a plain
# single-process Adam loads (the optimizer state every rank kept only a shard of)
def run_zero(epochs, directory):
    engine.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
    opt = dist.optim.ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optim.Adam, lr=0.01)
    trainer = Trainer(model, opt, callbacks=[ModelCheckpoint(directory, monitor=None)], log=lambda _: None,
                      distributed=True)
    trainer.fit(DataLoader(TensorDataset(engine.tensor(x), engine.tensor(y)), batch_size=8), epochs=epochs)
    return model, opt


zero_model, zero_opt = run_zero(2, out / "zero")
zero_state = engine.load(out / "zero" / "last.ckpt")
single = optim.Adam(make()[0].parameters(), lr=0.01)
single.load_state_dict(zero_state["optimizer"])  # the whole state, as one process's Adam keeps it
kept = sum(v.numel() for st in single.state.values() for v in st.values() if hasattr(v, "numel"))
params = sum(p.numel() for p in zero_model.parameters())
assert kept >= 2 * params, (kept, params)  # exp_avg and exp_avg_sq of every parameter
dist.barrier()
if r == 0:
    print("trainer ok", w)

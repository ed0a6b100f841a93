"""Rank 1 raises while rank 0 waits in an all_reduce: the job must end, non-zero, naming rank 1."""

import time

import engine
import engine.distributed as dist

dist.init_process_group()
if dist.get_rank() == 1:
    time.sleep(0.2)
    raise RuntimeError("rank one fails on purpose")
dist.all_reduce(engine.ones(4))
print("rank 0 passed the all_reduce: the fault was not detected")

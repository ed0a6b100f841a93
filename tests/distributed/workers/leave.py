"""Ways a rank leaves while the other ranks wait for it, and clean ends. Arg: the way.

Leaving while rank 0 waits in all_reduce (the job must end, non-zero, naming rank 1):
  exit0, exit2 (sys.exit), destroy_exit0 (destroy_process_group() then sys.exit(0)),
  interrupt (KeyboardInterrupt), thread_then_exit (an exception kills a thread, then the script ends).
Clean ends (exit status 0, nothing aborted, every rank prints "rank R done"):
  clean (no destroy_process_group), clean_destroy, late (rank 0 ends 3 s after rank 1),
  destroy_then_work (every rank destroys the group, then rank 0 works 1 s more on its own).
"""

import sys
import threading
import time

import engine
import engine.distributed as dist

way = sys.argv[1]
dist.init_process_group()
r = dist.get_rank()

if way in ("clean", "clean_destroy", "late", "destroy_then_work"):
    t = engine.ones(3)
    dist.all_reduce(t)
    assert t.tolist() == [dist.get_world_size()] * 3
    if way in ("clean_destroy", "destroy_then_work"):
        dist.destroy_process_group()
    if way in ("late", "destroy_then_work") and r == 0:
        time.sleep(3 if way == "late" else 1)
    print(f"rank {r} done", flush=True)
    sys.exit(0)

if r == 1:
    time.sleep(0.2)
    if way == "exit0":
        sys.exit(0)
    if way == "exit2":
        sys.exit(2)
    if way == "destroy_exit0":
        dist.destroy_process_group()
        sys.exit(0)
    if way == "interrupt":
        raise KeyboardInterrupt
    if way == "thread_then_exit":
        worker = threading.Thread(target=lambda: 1 / 0)
        worker.start()
        worker.join()
        sys.exit(0)
    raise SystemExit(f"unknown way {way!r}")
dist.all_reduce(engine.ones(4))
print("rank 0 passed the all_reduce: rank 1 leaving was not detected", flush=True)

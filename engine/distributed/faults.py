"""A rank that leaves ends the job, whatever the way it leaves: no rank waits forever for a peer that is gone.

- An exception escapes the script (``KeyboardInterrupt`` included): the ``sys.excepthook`` that
  ``init_process_group`` installs prints ``engine.distributed: rank R failed: ...`` and the
  traceback, then aborts the job (``MPI_Abort``: mpiexec ends every rank, exit status 1).
- The process exits (its script ends, or ``sys.exit(n)`` with any n, 0 included): at exit the rank
  sends an exit notice to every other rank, on a communicator of its own, holding how many MPI
  collectives it started; then it waits until every rank has reached its exit (an exit barrier).
  A rank waiting in a collective polls for notices (:func:`wait`): a peer that left before starting
  the collective being waited for will never join it, so the rank aborts the job naming that peer.
  A peer that left after starting it has sent all it had to send, so the wait goes on. When every
  rank ends normally, with or without ``destroy_process_group()``, they all meet at the exit
  barrier and the job exits 0 (or with the ranks' own exit statuses).
- ``os._exit``, a signal, being killed: no Python code runs; mpiexec sees the process end without
  finalizing MPI and ends the job itself, with that process's status.

The exit communicator is made at the first ``init_process_group`` and lives until the process
exits, so a rank that destroyed its process group still takes part in the exit barrier.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
import traceback

import numpy as np

# Tags of the exit notice: whether the leaving rank had destroyed its process group.
_TAG_DESTROYED, _TAG_NOT_DESTROYED = 1, 2
# How long a failing rank waits between writing its report and aborting: MPI_Abort makes the
# launcher kill every process at once, and output still in flight through the launcher's pipes
# is lost (seen: a traceback cut after its first line).
_ABORT_GRACE_S = 0.5
# While waiting at the exit barrier, sleep between tests (a rank may wait minutes for a peer
# writing its checkpoints).
_EXIT_POLL_S = 0.002


class _State:
    comm = None  # COMM_WORLD duplicated at the first init_process_group: exit notices only
    group_alive = False  # a process group is initialized (and not destroyed)
    previous_excepthook = None
    started = 0  # MPI collectives this rank has started (every rank starts the same, in order)
    gone: dict = {}  # rank -> (collectives it had started, destroyed its group) from its exit notice


_state = _State()


def _rank() -> str:
    try:
        from mpi4py import MPI

        return str(MPI.COMM_WORLD.Get_rank())
    except Exception:  # noqa: BLE001 - a rank label for a message; MPI may be finalized or broken by now
        return "?"


# ---- the process group's life ------------------------------------------------------------------

def group_started() -> None:
    """Called by init_process_group: exit notices from now on, and the abort-on-exception hook."""
    from mpi4py import MPI

    if _state.comm is None:
        _state.comm = MPI.COMM_WORLD.Dup()
        atexit.register(_at_exit)  # runs before mpi4py finalizes MPI (registered earlier)
    _state.group_alive = True
    if sys.excepthook is not _excepthook:
        _state.previous_excepthook = sys.excepthook
        sys.excepthook = _excepthook


def group_destroyed() -> None:
    """Called by destroy_process_group (and a failed init): the previous excepthook is back."""
    _state.group_alive = False
    if sys.excepthook is _excepthook:
        sys.excepthook = _state.previous_excepthook or sys.__excepthook__
    _state.previous_excepthook = None


# ---- waiting in a collective -------------------------------------------------------------------

def started() -> int:
    """Count one more MPI collective started by this rank; returns its number."""
    _state.started += 1
    return _state.started


def wait(request, op: str, number: int) -> None:
    """``request.Wait()`` for this rank's collective ``number``, but abort the job when a peer has
    exited without starting it (that peer will never join)."""
    comm = _state.comm
    if comm is None or comm.Get_size() == 1:
        request.Wait()
        return
    while not request.Test():
        _receive_notices(comm)
        for rank, (count, destroyed) in _state.gone.items():
            if count < number:
                how = "after destroy_process_group()" if destroyed else "without destroy_process_group()"
                abort(f"rank {rank} exited (its script ended or called sys.exit(), {how}) while rank "
                      f"{comm.Get_rank()} waits for it in {op}")


def _receive_notices(comm) -> None:
    from mpi4py import MPI

    status = MPI.Status()
    while comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
        count = np.zeros(1, np.int64)
        comm.Recv(count, source=status.Get_source(), tag=status.Get_tag())
        _state.gone[status.Get_source()] = (int(count[0]), status.Get_tag() == _TAG_DESTROYED)


def _at_exit() -> None:
    """Tell every peer that this rank is leaving, then wait for all of them to leave too."""
    comm = _state.comm
    if comm is None or comm.Get_size() == 1:
        return
    try:
        from mpi4py import MPI

        tag = _TAG_NOT_DESTROYED if _state.group_alive else _TAG_DESTROYED
        me, size = comm.Get_rank(), comm.Get_size()
        count = np.array([_state.started], np.int64)
        sends = [comm.Issend(count, dest=peer, tag=tag) for peer in range(size) if peer != me]
        barrier = comm.Ibarrier()
        while not barrier.Test():
            time.sleep(_EXIT_POLL_S)
        _receive_notices(comm)  # every peer sent its notice before entering the barrier
        MPI.Request.Waitall(sends)
    except BaseException as e:  # noqa: BLE001 - Ctrl-C while waiting for the others: end the job now
        abort(f"rank {_rank()} was interrupted while waiting at exit for the other ranks "
              f"({type(e).__name__}: {e})")


# ---- ending the job ----------------------------------------------------------------------------

def abort(message: str) -> None:
    """Print ``engine.distributed: <message>; aborting the job`` and end every rank (MPI_Abort)."""
    _write(f"engine.distributed: {message}; aborting the job\n")
    _abort_now()


def _write(text: str) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.write(text)
        sys.stderr.flush()
    except Exception:  # noqa: BLE001, S110 - stderr may be closed; the job is aborting anyway
        pass


def _abort_now() -> None:
    time.sleep(_ABORT_GRACE_S)
    from mpi4py import MPI

    MPI.COMM_WORLD.Abort(1)
    os._exit(1)  # MPICH's MPI_Abort has been seen to return while the launcher ends the job


def _excepthook(exc_type, exc, tb):
    """An exception (KeyboardInterrupt too) escaped the script: report it naming the rank, abort."""
    _write(f"engine.distributed: rank {_rank()} failed: {exc_type.__name__}: {exc}; aborting the job\n")
    hook = _state.previous_excepthook or sys.__excepthook__
    try:
        hook(exc_type, exc, tb)
    except Exception:  # noqa: BLE001 - a broken excepthook must not hide the original error
        traceback.print_exception(exc_type, exc, tb)
    if os.environ.get("ENGINE_DISTRIBUTED_NO_ABORT"):
        return  # the process exits normally; its exit notice still ends a job that waits for it
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001, S110 - stderr may be closed; the job is aborting anyway
        pass
    _abort_now()

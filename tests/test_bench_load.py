"""``python -m bench --load N``: busy neighbour processes, and training-step rows with and without them."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import __main__ as cli
from bench.load import Neighbours

ROOT = Path(__file__).resolve().parents[1]


def test_neighbours_run_inside_the_block_and_stop_after():
    with Neighbours(2) as neighbours:
        processes = list(neighbours.processes)
        assert neighbours.running() == 2
    assert all(p.poll() is not None for p in processes)  # terminated and reaped
    with Neighbours(0) as none:
        assert none.running() == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_neighbours_refuse_bad_counts(bad):
    with pytest.raises(ValueError, match="--load"):
        Neighbours(bad)


def test_cli_refuses_negative_load():
    with pytest.raises(SystemExit, match="--load"):
        cli.main(["--tiny", "--device", "cpu", "--load", "-1"])


def test_load_rows_side_by_side_with_quiet_rows(tmp_path):
    out = tmp_path / "r.json"
    cli.main(["--tiny", "--device", "cpu", "--quiet", "--skip-kernels", "--no-torch", "--load", "1",
              "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["kernels"] == []
    assert saved["settings"]["load"]["neighbours"] == 1
    rows = saved["end_to_end"]
    quiet = {r["impl"]: r for r in rows if r["load"] == 0}
    loaded = {r["impl"]: r for r in rows if r["load"] == 1}
    assert set(quiet) == set(loaded) and quiet
    for impl, row in loaded.items():
        if row["status"] == "ok":
            assert row["slowdown"] == pytest.approx(row["median_s"] / quiet[impl]["median_s"])
        assert quiet[impl]["slowdown"] is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_neighbours_die_with_a_killed_benchmark():
    """A benchmark killed by SIGKILL runs no cleanup: its neighbours still stop (exited, or a zombie
    waiting for init to reap it), none keeps spinning."""
    code = ("from bench.load import Neighbours\nimport time\nwith Neighbours(1) as n:\n"
            "    print(n.processes[0].pid, flush=True)\n    time.sleep(120)\n")
    bench = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    neighbour = int(bench.stdout.readline())
    bench.kill()
    bench.wait()
    stat = Path(f"/proc/{neighbour}/stat")
    deadline = time.monotonic() + 10
    while stat.exists() and stat.read_text().split()[2] not in ("Z", "X") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stat.exists() or stat.read_text().split()[2] in ("Z", "X")

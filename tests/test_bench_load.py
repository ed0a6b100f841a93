"""``python -m bench --load N``: busy neighbour processes, and training-step rows with and without them."""

import json

import pytest

from bench import __main__ as cli
from bench.load import Neighbours


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

"""Every example runs end to end on small settings; the main job meets its accuracy target."""

import gzip
import struct

import numpy as np
import pytest


def test_main_job_digits_reaches_95_percent(tmp_path):
    from engine.examples import digits

    report = digits.main(["--out", str(tmp_path / "ckpt"), "--quiet"])
    assert report["test_accuracy"] >= 0.95
    assert report["test_f1"] >= 0.94
    assert (tmp_path / "ckpt" / "best.ckpt").exists()


def test_transfer_example_freezes_then_fine_tunes():
    from engine.examples import transfer

    report = transfer.main(["--epochs", "10", "--quiet"])
    assert report["frozen_unchanged"] is True
    # features learnt on 0-4 carry over to 5-9; fine-tuning the whole network then adds more
    assert report["head_only_accuracy"] > 0.7
    assert report["fine_tuned_accuracy"] > max(0.9, report["head_only_accuracy"])


@pytest.mark.slow
def test_distillation_example_beats_student_alone():
    from engine.examples import distillation

    report = distillation.main(["--teacher-epochs", "15", "--quiet"])
    assert report["teacher"] > 0.95
    assert report["student_distilled"] > report["student_alone"] + 0.02


def test_regression_example_explains_the_variance():
    from engine.examples import regression

    report = regression.main(["--epochs", "15", "--quiet"])
    assert report["r2"] > 0.8


def test_search_example(capsys):
    from engine.examples import search

    report = search.main(["--trials", "2", "--epochs", "3"])
    assert report["trials"] == 2 and report["test_accuracy"] > 0.8
    assert "score" in capsys.readouterr().out


def _write_idx(path, array, gz):
    dims = array.shape
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_example_on_small_idx_files(tmp_path):
    from engine.examples import mnist

    rng = np.random.default_rng(0)
    for kind, n in (("train", 300), ("t10k", 100)):
        labels = rng.integers(0, 10, n)
        images = np.zeros((n, 28, 28), np.uint8)
        for i, label in enumerate(labels):  # a learnable pattern: a bright column at the label's place
            images[i, :, 2 + 2 * label] = 255
        images = np.clip(images + rng.integers(0, 40, images.shape), 0, 255)
        _write_idx(tmp_path / f"{kind}-images-idx3-ubyte.gz", images, gz=True)
        _write_idx(tmp_path / f"{kind}-labels-idx1-ubyte", labels, gz=False)
    result = mnist.main(["--root", str(tmp_path), "--epochs", "4", "--quiet"])
    assert result["accuracy"] > 0.9


def test_quickstart_example_runs(capsys):
    from engine.examples import quickstart

    assert quickstart.main(steps=60) < 0.6
    assert "device" in capsys.readouterr().out

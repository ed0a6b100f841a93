"""More of the third round: public PyTorch programs of the kinds users try first (Karpathy's GPT
lecture and training repositories, PyTorch's examples and tutorials), each run as a user runs it
(its own process, its own command line) with only the import, dataset and launcher lines changed
(each script's header names its source, the commit and every changed line).

The figures PyTorch 2.13 (CPU, one thread) reaches with the same scripts, flags and data (run once
with the import lines changed back) are in each test's comment; the engine must learn comparably.
Tests that take more than a few seconds on a busy 2-core machine are marked slow.
"""

from __future__ import annotations

import re
import shutil

import pytest

import engine
from tests.compat.datasets import write_names, write_tiny_shakespeare
from tests.compat.test_scripts_round3 import SCRIPTS, run


def _eval_lines(out: str) -> list[tuple[float, float]]:
    """(train, val) of each "step N: train loss T, val loss V" line (Karpathy's estimate_loss)."""
    return [(float(t), float(v)) for t, v in re.findall(r"step \d+: train loss ([0-9.]+), val loss ([0-9.]+)", out)]


def test_lecture_bigram(tmp_path):
    # karpathy/ng-video-lecture bigram.py on the generated text (26 characters, ln 26 = 3.26).
    # PyTorch 2.13: val loss 3.83 (step 0), 2.60, 1.89, 1.56, 1.43, 1.36 (step 500); the engine:
    # 3.51, 2.29, 1.71, 1.47, 1.37, 1.35. (The initial losses differ: the embedding's N(0, 1) draws do.)
    write_tiny_shakespeare(tmp_path / "input.txt")
    out = run("lecture_bigram.py", [], tmp_path)
    losses = _eval_lines(out)
    assert len(losses) == 6
    assert losses[-1][1] < 1.6 and losses[-1][1] < 0.5 * losses[0][1], losses
    assert len(out.strip().splitlines()[-1]) > 0          # the generated sample was printed


@pytest.mark.slow
def test_lecture_gpt(tmp_path):
    # karpathy/ng-video-lecture gpt.py (hyperparameters CPU-sized in the header). PyTorch 2.13:
    # val loss 3.28 -> 0.91 (step 100) -> 0.39 -> 0.31 (step 299); the engine: 3.27 -> 0.82 -> 0.36 -> 0.33.
    write_tiny_shakespeare(tmp_path / "input.txt")
    out = run("lecture_gpt.py", [], tmp_path)
    losses = _eval_lines(out)
    assert len(losses) == 4
    assert losses[-1][1] < 0.5 and losses[0][1] > 3.0, losses
    assert "M parameters" in out


def test_nanogpt_shakespeare_char_on_the_cpu(tmp_path):
    # nanoGPT's README CPU command (train.py config/train_shakespeare_char.py --device=cpu
    # --compile=False ...), smaller and shorter; data prepared by its own prepare.py. PyTorch 2.13:
    # val loss 3.29 -> 1.53 (step 100) -> 1.01 (step 200); the engine: 3.31 -> 1.55 -> 1.07.
    work = tmp_path / "nanogpt"
    shutil.copytree(SCRIPTS / "nanogpt", work)
    write_tiny_shakespeare(work / "data" / "shakespeare_char" / "input.txt")
    run(str(work / "data" / "shakespeare_char" / "prepare.py"), [], work)  # the copy: it writes beside itself
    flags = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=5",
             "--log_interval=20", "--block_size=32", "--batch_size=12", "--n_layer=2", "--n_head=4", "--n_embd=64",
             "--max_iters=200", "--lr_decay_iters=200", "--dropout=0.0", "--eval_interval=100"]
    out = run(str(work / "train.py"), flags, work)
    losses = _eval_lines(out)
    assert len(losses) == 3 and losses[-1][1] < 1.3 and losses[0][1] > 3.0, losses
    assert (work / "out-shakespeare-char" / "ckpt.pt").is_file()
    # resume from the checkpoint it wrote, as nanoGPT's --init_from=resume does
    out = run(str(work / "train.py"), flags[:-4] + ["--max_iters=220", "--lr_decay_iters=200", "--dropout=0.0",
                                                   "--eval_interval=10", "--init_from=resume"], work)
    assert "Resuming training" in out
    resumed = _eval_lines(out)
    assert resumed and resumed[0][1] < 1.3, resumed


@pytest.mark.slow
def test_mingpt_chargpt(tmp_path):
    # minGPT's projects/chargpt with its own overrides (gpt-nano, block 32, batch 16, 201 iterations);
    # it samples 500 characters from "O God, O God!" at iteration 0 and saves the model.
    # PyTorch 2.13: train loss 3.42 (iter 0) -> 1.97 (80) -> 1.36 (160) -> 1.32 (200); the engine:
    # 3.41 -> 2.02 (70) -> 1.45 (150) -> 1.29 (190).
    write_tiny_shakespeare(tmp_path / "input.txt", first_line="O God, O God!")
    flags = ["--model.model_type=gpt-nano", "--data.block_size=32", "--trainer.max_iters=201",
             "--trainer.num_workers=0", "--trainer.batch_size=16"]
    out = run("mingpt_chargpt.py", flags, tmp_path)
    losses = [float(v) for v in re.findall(r"iter \d+: train loss ([0-9.]+)", out)]
    assert len(losses) == 21 and losses[0] > 3.0 and losses[-1] < 1.6, losses
    assert (tmp_path / "out" / "chargpt" / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("model_type, max_test_loss", [("gru", 2.1), ("transformer", 2.1)])
def test_makemore(tmp_path, model_type, max_test_loss):
    # karpathy/makemore with its own flags (--type, --max-steps 501, 2 layers of 32) on 2,000 generated
    # names (uniform guessing: ln 27 = 3.3). PyTorch 2.13 at step 500: GRU train/test loss 1.940/1.963,
    # transformer 1.884/1.910; the engine: GRU 1.936/1.947, transformer 1.887/1.918.
    write_names(tmp_path / "names.txt")
    flags = ["--type", model_type, "--max-steps", "501", "--num-workers", "0", "--n-layer", "2", "--n-embd", "32",
             "--n-embd2", "32", "-o", "out"]
    out = run("makemore.py", flags, tmp_path)
    (train, test), = [(float(a), float(b)) for a, b in re.findall(r"step 500 train loss: ([0-9.]+) test loss: ([0-9.]+)", out)]
    first = float(re.search(r"step 0 \| loss ([0-9.]+)", out).group(1))
    assert first > 2.9 and test < max_test_loss and train < max_test_loss, (first, train, test)
    assert (tmp_path / "out" / "model.pt").is_file()


def test_pytorch_examples_regression(tmp_path):
    # pytorch/examples regression: one Linear fits a random degree-4 polynomial with smooth_l1_loss and
    # a hand-written SGD step (param.data.add_(-0.1 * param.grad)) until the loss is below 1e-3.
    # PyTorch 2.13 stops after ~400 batches with the coefficients within ~0.15; the engine the same.
    out = run("examples_regression.py", [], tmp_path)
    loss, batches = re.search(r"Loss: ([0-9.]+) after (\d+) batches", out).groups()
    assert float(loss) < 1e-3 and int(batches) < 20000
    coefficients = [[float(v) for v in re.findall(r"([+-][0-9.]+)", line.split("y =")[1])]
                    for line in out.splitlines() if "function:" in line]
    learned, actual = coefficients
    assert max(abs(a - b) for a, b in zip(learned, actual)) < 0.5, (learned, actual)


def test_pytorch_examples_vae(tmp_path):
    # pytorch/examples vae on the digits drawn as 28x28 MNIST images, 3 epochs; the device comes from
    # engine.accelerator (cpu here). PyTorch 2.13 (same data, seed 1): test loss 302.7, 263.7, 253.7;
    # the engine: 294.5, 262.3, 254.2.
    (tmp_path / "results").mkdir()
    out = run("examples_vae.py", ["--epochs", "3"], tmp_path)
    test_losses = [float(v) for v in re.findall(r"Test set loss: ([0-9.]+)", out)]
    assert "Using device: cpu" in out or "Using device: cuda" in out
    assert len(test_losses) == 3 and test_losses[0] > test_losses[1] > test_losses[2], test_losses
    assert test_losses[-1] < 275, test_losses
    assert (tmp_path / "results" / "sample_3.png").is_file()
    assert (tmp_path / "results" / "reconstruction_3.png").is_file()


def _printed_matrices(out: str) -> list[list[list[float]]]:
    """Every ``tensor([[...]], ...)`` printed, as nested lists of floats (rows of a 2-d tensor)."""
    blocks = re.findall(r"tensor\(\[(\[.*?\])\]", out, flags=re.S)
    return [[[float(v) for v in re.findall(r"-?\d+\.?\d*(?:e[-+]?\d+)?", row)] for row in re.findall(r"\[([^\[\]]*)\]", b)]
            for b in blocks]


def test_tutorial_sequence_models_lstm_tagger(tmp_path):
    # The LSTM part-of-speech tagger (autograd.Variable, LongTensor, log_softmax without dim). The
    # tutorial says the trained tagger gives DET NN V DET NN (0 1 2 0 1) for "The dog ate the apple";
    # PyTorch 2.13 and the engine both do, each word's best log-probability above -0.2.
    out = run("nlp_sequence_models_tutorial.py", [], tmp_path)
    scores = _printed_matrices(out)[-1]
    assert [row.index(max(row)) for row in scores] == [0, 1, 2, 0, 1], scores
    assert min(max(row) for row in scores) > -0.3, scores


def test_tutorial_bag_of_words_classifier(tmp_path):
    # The bag-of-words logistic regression (make_bow_vector's vec[ix] += 1). After training, the Spanish
    # test sentence gets log P(SPANISH) > log P(ENGLISH) and the English one the reverse, and the weight
    # of "creo" rises for SPANISH and falls for ENGLISH. PyTorch 2.13: [-0.21, -1.67], [-2.53, -0.08],
    # creo [0.28, -0.56]; the engine: [-0.16, -1.91], [-2.85, -0.06], creo [0.37, -0.32].
    out = run("nlp_deep_learning_tutorial.py", [], tmp_path)
    spanish, english = _printed_matrices(out)[-2:]
    assert spanish[0][0] > -0.5 > spanish[0][1] and english[0][1] > -0.5 > english[0][0], (spanish, english)
    creo = [float(v) for v in re.findall(r"-?\d+\.?\d*", out.strip().splitlines()[-1].split("grad_fn")[0])]
    assert creo[0] > 0 > creo[1], creo


def test_recipe_saving_and_loading_a_general_checkpoint(tmp_path):
    # The recipe saves {'epoch', 'model_state_dict', 'optimizer_state_dict', 'loss'} with torch.save and
    # loads it back into a fresh Net and SGD. The checkpoint it wrote must hold what PyTorch's would:
    # the same keys, shapes and optimizer state layout as the same Net and SGD built with torch.
    out = run("recipe_general_checkpoint.py", [], tmp_path)
    assert "(fc3): Linear(in_features=84, out_features=10, bias=True)" in out
    checkpoint = engine.load(tmp_path / "model.pt")
    assert (checkpoint["epoch"], checkpoint["loss"]) == (5, 0.4)
    torch = pytest.importorskip("torch")
    t_net = torch.nn.Sequential()
    for name, layer in (("conv1", torch.nn.Conv2d(3, 6, 5)), ("pool", torch.nn.MaxPool2d(2, 2)),
                        ("conv2", torch.nn.Conv2d(6, 16, 5)), ("fc1", torch.nn.Linear(400, 120)),
                        ("fc2", torch.nn.Linear(120, 84)), ("fc3", torch.nn.Linear(84, 10))):
        t_net.add_module(name, layer)
    expected = {k: tuple(v.shape) for k, v in t_net.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in checkpoint["model_state_dict"].items()} == expected
    t_opt = torch.optim.SGD(t_net.parameters(), lr=0.001, momentum=0.9).state_dict()
    saved = checkpoint["optimizer_state_dict"]
    assert saved["param_groups"][0]["params"] == t_opt["param_groups"][0]["params"]
    assert {k: v for k, v in saved["param_groups"][0].items() if k in ("lr", "momentum", "dampening", "nesterov")} == \
        {k: v for k, v in t_opt["param_groups"][0].items() if k in ("lr", "momentum", "dampening", "nesterov")}
    t_net.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in checkpoint["model_state_dict"].items()})


def test_tutorial_word_embeddings_ngram_model(tmp_path):
    # The N-gram language model on Sonnet 2 (torch.Tensor([0]) running total, total_loss += loss.data,
    # Variable, LongTensor). The tutorial: "The loss decreased every iteration over the training data!"
    # PyTorch 2.13: 519.60 -> 495.58 over the 10 epochs; the engine: 520.91 -> 500.56.
    out = run("nlp_word_embeddings_tutorial.py", [], tmp_path)
    line = next(line for line in out.splitlines() if line.startswith("[tensor("))
    losses = [float(v) for v in re.findall(r"tensor\(\[([0-9.]+)\]\)", line)]
    assert len(losses) == 10 and all(a > b for a, b in zip(losses, losses[1:])), losses
    assert 480 < losses[-1] < losses[0] - 10, losses


def test_tutorial_introduction_to_pytorch(tmp_path):
    # The NLP tutorials' introduction (torch.Tensor(list), indexing, cat, view, autograd.Variable with
    # requires_grad, .data, grad_fn, Variable(var_z.data) cut from the graph). PyTorch 2.13 prints the
    # same values: z.data [5, 7, 9], s = 21, x.grad [1, 1, 1], and None for the re-wrapped tensor's grad_fn.
    out = run("nlp_pytorch_tutorial.py", [], tmp_path)
    lines = out.strip().splitlines()
    assert lines[:1] == ["tensor([1., 2., 3.])"]
    assert "tensor([5., 7., 9.])" in out and "tensor(21., grad_fn=<SumBackward>)" in out
    assert lines[-3:] == ["tensor([1., 1., 1.])", "<AddBackward>", "None"], lines[-3:]

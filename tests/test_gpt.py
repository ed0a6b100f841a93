"""The GPT example (engine/examples/gpt.py): it learns, its key/value cache is exact, it resumes."""

import numpy as np
import pytest

import engine
from engine.examples import gpt

TINY = ["--block-size", "32", "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--batch-size", "16",
        "--lr", "1e-2", "--warmup", "5", "--val-windows", "16", "--sample-tokens", "20", "--quiet"]


def _corpus(path, lines=400):
    """Python-like lines with strong local structure (a model beats the unigram baseline quickly)."""
    rng = np.random.default_rng(0)
    names = ["alpha", "beta", "gamma", "delta"]
    text = "".join(f"def {names[k % 4]}_{k}(x):\n    return x + {k % 10}\n\n"
                   for k in rng.integers(0, 1000, lines))
    path.write_text(text)
    return path


def test_tiny_gpt_beats_the_unigram_baseline(tmp_path):
    data = _corpus(tmp_path / "corpus.txt")
    report = gpt.main(["--data", str(data), "--out", str(tmp_path / "run"), "--steps", "60", "--eval-every", "30",
                       *TINY])
    assert report["steps"] == 60
    assert report["val_loss"] < report["unigram_cross_entropy"] - 1.0, report  # measured: 0.80 vs 3.01
    assert report["perplexity"] == pytest.approx(np.exp(report["val_loss"]))
    assert isinstance(report["sample"], str) and report["sample"].startswith("def ")
    assert (tmp_path / "run" / "last.ckpt").exists() and (tmp_path / "run" / "best.ckpt").exists()


def _model(block=16):
    engine.manual_seed(0)
    model = gpt.GPT(vocab_size=50, block_size=block, d_model=32, n_layers=2, n_heads=4)
    # a trained model's logits are far from uniform; scale the head so argmax ties cannot happen
    model.tok_emb.weight.data.normal_(0.0, 1.0)
    return model.eval()


def test_incremental_decoding_gives_the_full_forward_logits():
    model = _model()
    ids = engine.tensor(np.random.default_rng(1).integers(0, 50, (3, 16)))
    with engine.no_grad():
        full = model(ids).numpy()
        first, past = model(ids[:, :5], use_cache=True)  # a prompt
        chunk, past = model(ids[:, 5:9], past, use_cache=True)  # several new positions after a cache
        steps = [first.numpy(), chunk.numpy()]
        for t in range(9, 16):  # then one position at a time
            logits, past = model(ids[:, t:t + 1], past, use_cache=True)
            steps.append(logits.numpy())
            assert past[0][0].shape == (3, 4, t + 1, 8)  # (batch, heads, cached positions, head dim)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceed block_size=16"):
        model(ids[:, :1], past, use_cache=True)


def test_cached_generation_equals_generation_without_cache():
    model = _model(block=16)
    prompt = [3, 1, 4, 1, 5]
    cached = gpt.generate(model, prompt, 40, temperature=0)  # passes block_size: the window restarts
    plain = gpt.generate(model, prompt, 40, temperature=0, use_cache=False)
    assert cached == plain and len(cached) == 45
    # sampling with the same generator state draws the same tokens either way
    sampled = [gpt.generate(model, prompt, 30, temperature=5.0, top_k=5, use_cache=use,
                            generator=np.random.default_rng(7)) for use in (True, False)]
    assert sampled[0] == sampled[1]
    other = gpt.generate(model, prompt, 30, temperature=5.0, top_k=5, generator=np.random.default_rng(8))
    assert other != sampled[0]  # the draws do come from the generator


def test_top_k_keeps_only_the_k_most_likely():
    logits = np.array([0.0, 5.0, 4.0, -1.0, 3.0], np.float32)
    picks = {gpt._pick(logits, 1.0, 2, np.random.default_rng(s)) for s in range(200)}
    assert picks == {1, 2}
    assert gpt._pick(logits, 0, None, None) == 1


def test_generate_with_block_size_1_keeps_the_last_id():
    # the restarted window kept block_size // 2 = 0 ids: an empty forward crashed at the second token
    model = _model(block=1)
    cached = gpt.generate(model, [3], 6, temperature=0)
    assert cached == gpt.generate(model, [3], 6, temperature=0, use_cache=False) and len(cached) == 7
    with engine.no_grad():  # with a one-id context each id follows from the one before it alone
        assert all(cached[t + 1] == int(model(engine.tensor([[cached[t]]])).numpy()[0, -1].argmax())
                   for t in range(6))


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=-1), "top_k must be None .* or an int >= 1, got -1"),
    (dict(top_k=0), "top_k must be None .* or an int >= 1, got 0"),
    (dict(top_k=2.5), "top_k must be None .* or an int >= 1, got 2.5"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0 .*, got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0 .*, got inf"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0 .*, got -1.0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0, got -1"),
    (dict(prompt=[]), "the prompt needs at least one token"),
    (dict(prompt=[1, 50]), "prompt id 50 at position 1 is outside the model's vocabulary"),
])
def test_generate_checks_its_arguments_before_running(kwargs, message):
    model = _model().train()
    args = dict(prompt=[1, 2], max_new_tokens=3, temperature=1.0)
    with pytest.raises(ValueError, match=message):
        gpt.generate(model, **{**args, **kwargs})
    assert model.training  # left as it was
    with pytest.raises(TypeError, match="generator must be a numpy.random.Generator"):
        gpt.generate(model, [1], 3, generator=7)
    assert gpt.generate(model, np.array([1, 2]), 0) == [1, 2]  # no new tokens is a valid request


def test_generate_restores_the_training_mode_on_every_exit(monkeypatch):
    model = _model().train()
    assert len(gpt.generate(model, [1], 3)) == 4 and model.training
    model.ln_f.weight.data.fill_(float("nan"))  # diverged weights: every logit NaN
    with pytest.raises(ValueError, match="the model's logits hold NaN"):
        gpt.generate(model, [1], 3, temperature=0)  # argmax picked token 0 silently
    assert model.training
    model.eval()
    monkeypatch.setattr(gpt, "_pick", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))  # Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        gpt.generate(model, [1], 3)
    assert not model.training


def test_sampling_at_a_tiny_temperature_is_greedy():
    model = _model()
    greedy = gpt.generate(model, [3, 1], 10, temperature=0)
    assert gpt.generate(model, [3, 1], 10, temperature=1e-310, generator=np.random.default_rng(0)) == greedy


def test_weight_decay_groups_and_schedule():
    model = _model()
    decay, no_decay = gpt.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and "emb" not in names[id(p)] and "ln" not in names[id(p)]
               for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"tok_emb.weight", "pos_emb.weight", "ln_f.weight",
                                                           "ln_f.bias", "blocks.0.attn.qkv.bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    factor = gpt.warmup_cosine(10, 110, min_ratio=0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.55) and factor(110) == pytest.approx(0.1)


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
@pytest.mark.slow
def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch, dtype):
    data = _corpus(tmp_path / "corpus.txt", lines=200)
    args = ["--data", str(data), "--steps", "30", "--eval-every", "10", *TINY, "--dtype", dtype]
    whole = gpt.main(args + ["--out", str(tmp_path / "whole")])

    real_loss, calls = gpt.lm_loss, []

    def interrupt_in_step_15(logits, targets):
        if logits.requires_grad:  # a training step, not validation
            calls.append(1)
            if len(calls) == 15:
                raise KeyboardInterrupt
        return real_loss(logits, targets)

    monkeypatch.setattr(gpt, "lm_loss", interrupt_in_step_15)
    with pytest.raises(KeyboardInterrupt):
        gpt.main(args + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(gpt, "lm_loss", real_loss)
    resumed = gpt.main(args + ["--out", str(tmp_path / "cut"), "--resume"])
    for key in ("train_loss", "val_loss", "sample"):
        assert resumed[key] == whole[key], key
    with pytest.raises(ValueError, match="pass the same model arguments"):
        gpt.main(args + ["--out", str(tmp_path / "cut"), "--resume", "--d-model", "16"])


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.slow
def test_mixed_precision_reaches_the_float32_validation_loss(tmp_path, dtype):
    """The issue's check, on a small config (seconds): at the same step count the validation loss
    of a mixed-precision run is within 2 % of the float32 run's (measured at 200 steps: bf16
    0.3474 vs float32 0.3482, 0.2 %; docs/precision.md has the longer runs)."""
    data = _corpus(tmp_path / "corpus.txt")
    args = ["--data", str(data), "--steps", "200", "--eval-every", "100", *TINY, "--sample-tokens", "0"]
    fp32 = gpt.main(args + ["--out", str(tmp_path / "fp32")])
    mixed = gpt.main(args + ["--out", str(tmp_path / dtype), "--dtype", dtype])
    assert fp32["precision"] == "32-true" and mixed["precision"] == gpt.PRECISION[dtype]
    assert mixed["val_loss"] != fp32["val_loss"]  # it did run in 16 bits
    assert abs(mixed["val_loss"] - fp32["val_loss"]) <= 0.02 * fp32["val_loss"], (mixed["val_loss"], fp32["val_loss"])
    assert mixed["val_loss"] < mixed["unigram_cross_entropy"] - 2.0



def _tiny_run(tmp_path, *extra, steps="4"):
    data = tmp_path / "corpus.txt"
    if not data.exists():
        _corpus(data, lines=60)
    return gpt.main(["--data", str(data), "--out", str(tmp_path / "run"), "--steps", steps, "--eval-every", "2",
                     *TINY, "--block-size", "16", "--sample-tokens", "4", *extra])


def _exit_code(capsys, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        gpt.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_a_bad_argument_leaves_the_run_directory_and_its_resume_intact(tmp_path, capsys):
    _tiny_run(tmp_path)
    run = tmp_path / "run"
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    # --n-heads 3 does not divide --d-model 32: config.json was overwritten before the model failed to build
    code, err = _exit_code(capsys, ["--data", str(tmp_path / "corpus.txt"), "--out", str(run), "--resume",
                                    *TINY, "--n-heads", "3"])
    assert code == 2 and "--d-model (32) must be a multiple of --n-heads (3)" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files
    resumed = _tiny_run(tmp_path, "--resume", steps="6")  # the right arguments still resume
    assert resumed["steps"] == 6
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.parametrize("argument, value, message", [
    ("--eval-every", "0", "must be >= 1, got 0"),  # was a bare ZeroDivisionError
    ("--steps", "0", "must be >= 1, got 0"),  # was a KeyError once training did nothing
    ("--steps", "-2", "must be >= 1, got -2"),
    ("--batch-size", "0", "must be >= 1"),
    ("--block-size", "0", "must be >= 1"),
    ("--d-model", "0", "must be >= 1"),
    ("--n-layers", "0", "must be >= 1"),
    ("--n-heads", "0", "must be >= 1"),
    ("--val-windows", "0", "must be >= 1"),
    ("--max-bytes", "0", "must be >= 1"),
    ("--vocab-size", "100", "must be >= 256"),
    ("--warmup", "-1", "must be >= 0"),
    ("--sample-tokens", "-1", "must be >= 0"),
    ("--top-k", "-1", "must be >= 0"),
    ("--seed", "-1", "must be >= 0"),
    ("--lr", "nan", "must be a finite number in [0.0, inf]"),
    ("--lr", "-1e-3", "must be a finite number in [0.0, inf]"),
    ("--temperature", "inf", "must be a finite number"),
    ("--clip", "-1", "must be a finite number"),
    ("--weight-decay", "-0.1", "must be a finite number"),
    ("--dropout", "1", "must be a finite number in [0.0, 1.0)"),
    ("--val-fraction", "0", "must be a finite number in (0.0, 1.0)"),
    ("--steps", "ten", "expected an int, got 'ten'"),
    ("--steps", "10", "--steps (10) must be a multiple of --eval-every (4)"),
    ("--data", "missing.txt", "--data 'missing.txt' is not a file"),
    ("--device", "gpu", "--device 'gpu': device: cannot parse 'gpu'"),
    ("--dtype", "fp8", "invalid choice: 'fp8'"),
])
def test_cli_refuses_bad_numbers_before_writing_anything(tmp_path, capsys, argument, value, message):
    data = _corpus(tmp_path / "corpus.txt", lines=20)
    argv = ["--data", str(data), "--out", str(tmp_path / "run"), "--steps", "8", "--eval-every", "4", *TINY]
    code, err = _exit_code(capsys, argv + [f"{argument}={value}"])
    assert code == 2 and message in err, err
    assert argument in err  # argparse names the argument
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_cli_errors_found_after_parsing_still_write_nothing(tmp_path, capsys, tokenizer):
    if tokenizer == "bpe":
        pytest.importorskip("tokenizers")
    short = tmp_path / "short.txt"
    short.write_text("def f(x): return x\n" * 3)  # too short for a validation window of 32
    with pytest.raises(ValueError, match="holds no window"):  # the BPE trained in memory is not saved either
        gpt.main(["--data", str(short), "--out", str(tmp_path / "run"), "--steps", "2", "--eval-every", "2", *TINY,
                  "--tokenizer", tokenizer, "--vocab-size", "260"])
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("")
    code, err = _exit_code(capsys, ["--out", str(tmp_path / "file"), "--max-bytes", "1000"])
    assert code == 2 and "exists and is not a directory" in err


def test_cli_zero_means_none_for_top_k_clip_warmup_and_sample_tokens(tmp_path):
    report = _tiny_run(tmp_path, "--top-k", "0", "--clip", "0", "--warmup", "0", "--sample-tokens", "0",
                       "--prompt", "def ")
    assert report["sample"] == "def " and report["steps"] == 4  # no new tokens: the prompt itself
    assert np.isfinite(report["val_loss"])

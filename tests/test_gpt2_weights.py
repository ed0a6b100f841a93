"""Hugging Face GPT-2 weights in the example GPT: same logits as GPT-2's own math.

The oracle is GPT-2's forward written in torch over the Hugging Face state dict (Conv1D weights
``(in, out)``, ``x @ W + b``), and, where ``transformers`` is installed, ``GPT2LMHeadModel`` itself
saved locally by ``save_pretrained`` (no network).
"""

import json
import math

import numpy as np
import pytest

import engine
from engine.examples import gpt, gpt2_weights
from engine.safetensors import save_file

torch = pytest.importorskip("torch")

CONFIG = {"model_type": "gpt2", "vocab_size": 97, "n_positions": 32, "n_embd": 24, "n_layer": 2, "n_head": 3,
          "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "n_inner": None, "tie_word_embeddings": True}


def _hf_state(config=CONFIG, seed=0):
    """A random GPT-2 state dict under Hugging Face's GPT2LMHeadModel names and layouts."""
    g = torch.Generator().manual_seed(seed)
    d, state = config["n_embd"], {}

    def rand(*shape, scale=0.2, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    state["transformer.wte.weight"] = rand(config["vocab_size"], d)
    state["transformer.wpe.weight"] = rand(config["n_positions"], d)
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            state[p + ln + ".weight"], state[p + ln + ".bias"] = rand(d, shift=1.0), rand(d)
        for name, (n_in, n_out) in {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, 4 * d),
                                    "mlp.c_proj": (4 * d, d)}.items():
            state[p + name + ".weight"], state[p + name + ".bias"] = rand(n_in, n_out), rand(n_out)
        state[p + "attn.bias"] = torch.tril(torch.ones(1, 1, config["n_positions"], config["n_positions"]))
    state["transformer.ln_f.weight"], state["transformer.ln_f.bias"] = rand(d, shift=1.0), rand(d)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _reference_logits(state, ids, config=CONFIG):
    """GPT-2's forward (Hugging Face's math) in torch, float64."""
    s = {k: v.double() for k, v in state.items()}
    d, H = config["n_embd"], config["n_head"]
    ids = torch.as_tensor(ids)
    B, T = ids.shape
    x = s["transformer.wte.weight"][ids] + s["transformer.wpe.weight"][:T]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."

        def ln(x, name):
            return torch.nn.functional.layer_norm(x, (d,), s[p + name + ".weight"], s[p + name + ".bias"], 1e-5)

        def conv1d(x, name):
            return x @ s[p + name + ".weight"] + s[p + name + ".bias"]

        q, k, v = (t.reshape(B, T, H, d // H).transpose(1, 2) for t in conv1d(ln(x, "ln_1"), "attn.c_attn").split(d, 2))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d // H)).masked_fill(~mask, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d)
        x = x + conv1d(y, "attn.c_proj")
        h = torch.nn.functional.gelu(conv1d(ln(x, "ln_2"), "mlp.c_fc"), approximate="tanh")
        x = x + conv1d(h, "mlp.c_proj")
    x = torch.nn.functional.layer_norm(x, (d,), s["transformer.ln_f.weight"], s["transformer.ln_f.bias"], 1e-5)
    return (x @ s["transformer.wte.weight"].T).numpy()


IDS = np.array([[5, 17, 3, 96, 0, 41, 41, 8], [1, 2, 3, 4, 5, 6, 7, 8]])


def _directory(tmp_path, state, fmt="safetensors", config=CONFIG):
    directory = tmp_path / "gpt2"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        tied = {k: v for k, v in state.items() if k != "lm_head.weight"}  # transformers drops the tied head too
        save_file({k: v.contiguous() for k, v in tied.items()}, directory / "model.safetensors",
                  metadata={"format": "pt"})
    else:
        torch.save(state, directory / "pytorch_model.bin")
    return directory


def test_converted_state_dict_gives_gpt2s_logits():
    state = _hf_state()
    model = gpt.GPT(**gpt2_weights.gpt_config(CONFIG))
    model.load_state_dict(gpt2_weights.convert_state_dict(state, CONFIG["n_layer"]))
    ours = model(engine.tensor(IDS)).detach().numpy()
    np.testing.assert_allclose(ours, _reference_logits(state, IDS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_from_pretrained_reads_both_weight_files(tmp_path, fmt):
    state = _hf_state(seed=1)
    model = gpt2_weights.from_pretrained(_directory(tmp_path, state, fmt))
    assert not model.training
    np.testing.assert_allclose(model(engine.tensor(IDS)).detach().numpy(), _reference_logits(state, IDS),
                               rtol=1e-4, atol=1e-4)


def test_init_from_samples_greedily_as_gpt2_would(tmp_path, capsys):
    state = _hf_state(seed=2)
    directory = _directory(tmp_path, state)
    report = gpt.main(["--init-from", str(directory), "--prompt", "5 17 3", "--sample-tokens", "6",
                       "--temperature", "0", "--device", "cpu"])
    ids = [5, 17, 3]
    for _ in range(6):  # greedy decoding with the reference forward
        ids.append(int(_reference_logits(state, np.array([ids]))[0, -1].argmax()))
    assert report["ids"] == ids
    assert "5 17 3" in capsys.readouterr().out
    with pytest.raises(ValueError, match="tokenizer.json.*token ids"):
        gpt.main(["--init-from", str(directory), "--prompt", "def ", "--device", "cpu"])


def test_init_from_needs_a_gpt2_directory(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        gpt.main(["--init-from", str(tmp_path)])
    assert info.value.code == 2 and "config.json" in capsys.readouterr().err


def test_what_does_not_fit_is_named(tmp_path):
    with pytest.raises(ValueError, match="n_inner=100"):
        gpt2_weights.gpt_config({**CONFIG, "n_inner": 100})
    with pytest.raises(ValueError, match="activation_function='relu'"):
        gpt2_weights.gpt_config({**CONFIG, "activation_function": "relu"})
    state = _hf_state()
    del state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(KeyError, match="h.1.mlp.c_fc.bias"):
        gpt2_weights.convert_state_dict(state, CONFIG["n_layer"])
    state = _hf_state()
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        gpt2_weights.convert_state_dict(state, CONFIG["n_layer"])
    state = _hf_state()
    state["transformer.wte.weight"] = state["transformer.wte.weight"][:, :20]
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model = gpt.GPT(**gpt2_weights.gpt_config(CONFIG))
    with pytest.raises(engine.ShapeError, match=r"'tok_emb.weight'.*\(97, 20\).*\(97, 24\)"):
        model.load_state_dict(gpt2_weights.convert_state_dict(state, CONFIG["n_layer"]))


@pytest.mark.parametrize("safe", [True, False])
def test_transformers_gpt2_gives_the_same_logits(tmp_path, safe):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=24, n_layer=2, n_head=3,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=safe)
    model = gpt2_weights.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = reference(torch.as_tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(model(engine.tensor(IDS)).detach().numpy(), expected, rtol=1e-4, atol=1e-4)

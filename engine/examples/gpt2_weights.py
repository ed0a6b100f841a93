"""Hugging Face GPT-2 weights in the example GPT (engine/examples/gpt.py).

The example's GPT is GPT-2's architecture (pre-norm blocks, packed q/k/v projection with biases,
tanh GELU, learned positions, the head tied to the token embedding), so a GPT-2 checkpoint maps
onto it name by name. GPT-2 stores its projections as ``Conv1D`` layers, whose weight is
``(in, out)``: the transpose of a Linear's ``(out, in)``; they are transposed here, as nanoGPT's
``from_pretrained`` does.

    model = from_pretrained("path/to/gpt2")      # config.json + model.safetensors or pytorch_model.bin
    python -m engine.examples.gpt --init-from path/to/gpt2 --prompt "Hello"

Nothing is downloaded: the directory is a local copy (``save_pretrained`` of a transformers model,
or a snapshot of a hub repository). Its weights are read by ``engine.load`` (safetensors, or a
torch.save file through the restricted unpickler), so neither torch nor transformers is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import engine
from engine.examples.gpt import GPT

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_PER_LAYER = {"ln_1": "ln1", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "ln_2": "ln2",
              "mlp.c_fc": "mlp.0", "mlp.c_proj": "mlp.2"}
# GPT-2's causal-mask buffers (older checkpoints save them); the engine's attention needs none
_BUFFERS = ("attn.bias", "attn.masked_bias")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


def gpt_config(config: dict) -> dict:
    """The example GPT's arguments for a Hugging Face ``GPT2Config`` dict; ValueError naming any
    setting the example's architecture does not have."""
    if config.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"gpt2_weights: model_type {config.get('model_type')!r}; only GPT-2 checkpoints map onto "
                         "the example GPT")
    d_model = config["n_embd"]
    unsupported = {
        "activation_function": (config.get("activation_function", "gelu_new") not in _GELU_TANH,
                                f"must be one of {_GELU_TANH} (the tanh GELU the example uses)"),
        "n_inner": (config.get("n_inner") not in (None, 4 * d_model), f"must be None or 4 * n_embd = {4 * d_model}"),
        "scale_attn_weights": (config.get("scale_attn_weights", True) is not True, "must be true"),
        "scale_attn_by_inverse_layer_idx": (bool(config.get("scale_attn_by_inverse_layer_idx")), "must be false"),
        "tie_word_embeddings": (config.get("tie_word_embeddings", True) is not True, "must be true (the head "
                                                                                      "is the token embedding)"),
    }
    problems = [f"{key}={config.get(key)!r} {why}" for key, (bad, why) in unsupported.items() if bad]
    if problems:
        raise ValueError("gpt2_weights: this GPT-2 config does not fit the example GPT: " + "; ".join(problems))
    return {"vocab_size": config["vocab_size"], "block_size": config["n_positions"], "d_model": d_model,
            "n_layers": config["n_layer"], "n_heads": config["n_head"], "dropout": 0.0}


def convert_state_dict(state: dict, n_layers: int) -> dict:
    """A GPT-2 state dict (``GPT2LMHeadModel`` or ``GPT2Model`` names, values Tensors, arrays or
    torch tensors) under the example GPT's names, Conv1D weights transposed.

    Raises:
        KeyError: a GPT-2 name is missing (named), or an unknown one is present.
        ValueError: ``lm_head.weight`` differs from the token embedding (an untied head).
    """
    state = {key.removeprefix("transformer."): value for key, value in state.items()}
    head = state.pop("lm_head.weight", None)
    out = {"tok_emb.weight": _take(state, "wte.weight"), "pos_emb.weight": _take(state, "wpe.weight"),
           "ln_f.weight": _take(state, "ln_f.weight"), "ln_f.bias": _take(state, "ln_f.bias")}
    for i in range(n_layers):
        for theirs, ours in _PER_LAYER.items():
            for kind in ("weight", "bias"):
                value = _take(state, f"h.{i}.{theirs}.{kind}")
                out[f"blocks.{i}.{ours}.{kind}"] = value.t() if f"{theirs}.{kind}" in _CONV1D else value
        for buffer in _BUFFERS:
            state.pop(f"h.{i}.{buffer}", None)
    if state:
        raise KeyError(f"gpt2_weights: unexpected GPT-2 key(s) {sorted(state)[:8]} (more layers than the config says?)")
    if head is not None and not np.array_equal(engine.as_tensor(head).numpy(), out["tok_emb.weight"].numpy()):
        raise ValueError("gpt2_weights: lm_head.weight differs from transformer.wte.weight; the example GPT ties its "
                         "head to the token embedding")
    return out


def _take(state: dict, key: str):
    if key not in state:
        raise KeyError(f"gpt2_weights: the checkpoint has no {key!r} (is it a GPT-2 checkpoint?)")
    return engine.as_tensor(state.pop(key))


def from_pretrained(directory, device=None) -> GPT:
    """The example GPT with the weights of a local Hugging Face GPT-2 directory.

    Args:
        directory: holds ``config.json`` and ``model.safetensors`` (preferred) or ``pytorch_model.bin``.
        device: where the model goes (default: the engine's default device).

    Raises:
        FileNotFoundError: no ``config.json``, or neither weights file.
        ValueError / KeyError: a config or a state dict that does not fit (see :func:`gpt_config`,
            :func:`convert_state_dict`); a CheckpointError for an unreadable weights file.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"gpt2_weights: no config.json in {str(directory)!r}; expected a local Hugging Face "
                                "GPT-2 directory (save_pretrained's output)")
    arguments = gpt_config(json.loads(config_path.read_text(encoding="utf-8")))
    weights = next((directory / name for name in ("model.safetensors", "pytorch_model.bin")
                    if (directory / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"gpt2_weights: {str(directory)!r} has neither model.safetensors nor "
                                "pytorch_model.bin (sharded checkpoints are not read)")
    model = GPT(**arguments)
    eps = json.loads(config_path.read_text(encoding="utf-8")).get("layer_norm_epsilon", 1e-5)
    for module in model.modules():
        if isinstance(module, engine.nn.LayerNorm):
            module.eps = float(eps)
    model.load_state_dict(convert_state_dict(engine.load(weights, map_location="cpu"), arguments["n_layers"]))
    model.eval()
    return model.to(device) if device is not None else model


def sample(directory, prompt: str, max_new_tokens: int, temperature: float, top_k, device) -> dict:
    """What ``python -m engine.examples.gpt --init-from DIR`` does: load, encode, generate, decode.

    The prompt is encoded with the directory's ``tokenizer.json`` (Hugging Face ``tokenizers``,
    the ``text`` extra). Without one, the prompt must be token ids separated by spaces and the
    sample is printed as ids.
    """
    from engine.examples.gpt import generate
    from engine.text import BPETokenizer

    model = from_pretrained(directory, device)
    tokenizer_path = Path(directory) / "tokenizer.json"
    tokenizer = BPETokenizer.from_file(tokenizer_path) if tokenizer_path.is_file() else None
    if tokenizer is not None:
        ids = tokenizer.encode(prompt)
    else:
        try:
            ids = [int(word) for word in prompt.split()]
        except ValueError:
            raise ValueError(f"--init-from {str(directory)!r}: it has no tokenizer.json, so --prompt must be token "
                             f"ids separated by spaces, got {prompt!r}") from None
    out = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k)
    text = tokenizer.decode(out) if tokenizer is not None else " ".join(map(str, out))
    print(f"GPT-2 from {directory}: {model.num_parameters():,} parameters")
    print(f"sample (temperature {temperature}, top-k {top_k}):\n{text}")
    return {"ids": out, "sample": text, "parameters": model.num_parameters()}

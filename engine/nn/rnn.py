"""Recurrent layers with PyTorch's names, parameters and semantics: ``RNN``, ``LSTM``, ``GRU`` and
their cells ``RNNCell``, ``LSTMCell``, ``GRUCell``.

Parameter names, shapes, gate order and initialisation are PyTorch's (``weight_ih_l0``,
``bias_hh_l1_reverse`` ...; LSTM gates i, f, g, o; GRU gates r, z, n with ``b_hn`` inside the
reset product), so a PyTorch state dict loads and gives the same outputs.

One direction of one layer over a whole sequence is one graph node (:class:`RecurrentLayer`):
its forward runs the time loop on raw arrays and keeps the gate activations; its backward runs
backpropagation through time on them. The input projection ``x @ W_ih^T`` of every step is one
matrix product before the loop, and the weight gradients are summed inside the backward loop,
so a sequence of T steps costs one node instead of ~10 T.

Variable lengths (a :class:`~engine.nn.utils.rnn.PackedSequence`) run on the time-major padded
batch sorted by decreasing length: at step t only the first ``batch_sizes[t]`` rows advance; the
others keep their state, so each sequence's final state is its own last step's (and, in the
reverse direction, each sequence starts from its initial state at its own last step).
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

from engine import dtypes, functional as F, ops
from engine.autograd import Function
from engine.backend import array_module, matmul
from engine.errors import ShapeError, describe
from engine.indexing import index_select
from engine.nn import init
from engine.nn.module import Module, Parameter
from engine.nn.utils.rnn import PackedSequence, _index_on, _packed_positions
from engine.tensor import Tensor, empty, zeros

__all__ = ["RNNBase", "RNN", "LSTM", "GRU", "RNNCellBase", "RNNCell", "LSTMCell", "GRUCell"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


# ---- one layer, one direction, a whole sequence ---------------------------------------------------------

def _sigmoid(xp, a):
    return 0.5 * (xp.tanh(0.5 * a) + 1)  # overflow-free for large |a|


class RecurrentLayer(Function):
    """``(output, h_n[, c_n])`` of one direction of one recurrent layer (a PyTorch-style Function).

    Args of ``apply``: x (T, B, I) time-major; h0 (B, P); c0 (B, H) or None; w_ih (G*H, I);
    w_hh (G*H, P); b_ih, b_hh (G*H,) or None; w_hr (P, H) the LSTM projection or None (then P = H);
    mode ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"); reverse (run from the last step to the first);
    batch_sizes (T,) host ints or None (all B).
    Rows past ``batch_sizes[t]`` are padding at step t: their output is 0 and their state holds.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse, batch_sizes):
        raw = [None if t is None else t._data for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)]
        low = dtypes.low_precision_of([a for a in raw if a is not None])
        if low is not None:  # 16-bit storage computes in float32, as every engine op does
            raw = [None if a is None else dtypes.upcast(a) for a in raw]
        xa, h, c, wi, wh, bi, bh, whr = raw
        xp = array_module(xa)
        steps, batch = xa.shape[:2]
        sizes = batch_sizes if batch_sizes is not None else np.full(steps, batch, np.int64)
        xw = matmul(xa, wi.T, "rnn")
        if bi is not None:
            xw = xw + bi
        h, c = h.copy(), None if c is None else c.copy()
        out = xp.zeros((steps, batch, wh.shape[1]), dtype=xw.dtype)
        cells = xp.zeros((steps, batch, wh.shape[0] // _GATES[mode]), dtype=xw.dtype)  # H wide (P = H unprojected)
        saved = {"h_prev": xp.zeros_like(out), "acts": xp.zeros_like(xw)}
        if mode == "LSTM":
            saved["c_prev"], saved["tanh_c"] = xp.zeros_like(cells), xp.zeros_like(cells)
        if whr is not None:
            saved["h_full"] = cells
        if mode == "GRU":
            saved["hn"] = xp.zeros_like(out)
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        for t in order:
            n = int(sizes[t])
            if n == 0:
                continue
            saved["h_prev"][t, :n] = h[:n]
            hw = matmul(h[:n], wh.T, "rnn")
            if bh is not None:
                hw = hw + bh
            h_new = _step(xp, mode, xw[t, :n], hw, h[:n], None if c is None else c[:n], t, n, saved)
            if whr is not None:  # LSTM projection: h_t = W_hr (o_t * tanh(c_t))
                saved["h_full"][t, :n] = h_new
                h_new = matmul(h_new, whr.T, "rnn")
            h[:n] = h_new
            out[t, :n] = h_new
        ctx.mode, ctx.order, ctx.sizes, ctx.low = mode, list(order), sizes, low
        ctx.saved = saved
        ctx.save_for_backward(x, w_ih, w_hh, w_hr)
        results = [out, h] + ([c] if mode == "LSTM" else [])
        return tuple(Tensor._from_op(r if low is None else dtypes.round_to(r, low), None) for r in results)

    @staticmethod
    def backward(ctx, grad_out, grad_h, *grad_c):
        x, w_ih, w_hh, w_hr = ctx.saved_tensors
        xa, wi, wh = (dtypes.upcast(t._data) if ctx.low is not None else t._data for t in (x, w_ih, w_hh))
        whr = None if w_hr is None else (dtypes.upcast(w_hr._data) if ctx.low is not None else w_hr._data)
        xp, saved, mode = array_module(xa), ctx.saved, ctx.mode
        g_out = dtypes.upcast(grad_out._data) if ctx.low is not None else grad_out._data
        dh = (dtypes.upcast(grad_h._data) if ctx.low is not None else grad_h._data).copy()
        dc = (dtypes.upcast(grad_c[0]._data) if ctx.low is not None else grad_c[0]._data).copy() if grad_c else None
        dxw = xp.zeros_like(saved["acts"])
        d_wh = xp.zeros_like(wh)
        d_bh = xp.zeros(wh.shape[0], dtype=wh.dtype)
        d_whr = None if whr is None else xp.zeros_like(whr)
        for t in reversed(ctx.order):
            n = int(ctx.sizes[t])
            if n == 0:
                continue
            dh[:n] += g_out[t, :n]
            dh_cell = dh[:n]
            if whr is not None:
                d_whr += matmul(dh_cell.T, saved["h_full"][t, :n], "rnn")
                dh_cell = matmul(dh_cell, whr, "rnn")
            d_xpart, d_hpart, dh_direct = _step_backward(xp, mode, t, n, dh_cell, dc, saved)
            dxw[t, :n] = d_xpart
            d_wh += matmul(d_hpart.T, saved["h_prev"][t, :n], "rnn")
            d_bh += d_hpart.sum(axis=0)
            dh[:n] = matmul(d_hpart, wh, "rnn") + (0 if dh_direct is None else dh_direct)
        flat = dxw.reshape(-1, dxw.shape[-1])
        grads = [lambda: matmul(dxw, wi, "rnn"), lambda: dh, lambda: dc,
                 lambda: matmul(flat.T, xa.reshape(-1, xa.shape[-1]), "rnn"),
                 lambda: d_wh, lambda: flat.sum(axis=0), lambda: d_bh, lambda: d_whr]
        out = []
        for needed, grad in zip(ctx.needs_input_grad, grads):
            g = grad() if needed else None
            out.append(None if g is None else Tensor._from_op(g.astype(ctx.low) if ctx.low is not None else g, None))
        return (*out, None, None, None)


def _step(xp, mode, xw, hw, h, c, t, n, saved):
    """One time step for the first ``n`` rows; saves what backward needs; returns the new h (and
    updates ``c`` in place for LSTM)."""
    size = xw.shape[1] // _GATES[mode]  # H (h itself is P wide under an LSTM projection)
    if mode == "LSTM":
        gates = xw + hw
        i, f = _sigmoid(xp, gates[:, :size]), _sigmoid(xp, gates[:, size:2 * size])
        g, o = xp.tanh(gates[:, 2 * size:3 * size]), _sigmoid(xp, gates[:, 3 * size:])
        saved["c_prev"][t, :n] = c
        c_new = f * c + i * g
        tanh_c = xp.tanh(c_new)
        saved["acts"][t, :n] = xp.concatenate([i, f, g, o], axis=1)
        saved["tanh_c"][t, :n] = tanh_c
        c[...] = c_new
        return o * tanh_c
    if mode == "GRU":
        r = _sigmoid(xp, xw[:, :size] + hw[:, :size])
        z = _sigmoid(xp, xw[:, size:2 * size] + hw[:, size:2 * size])
        hn = hw[:, 2 * size:]
        cand = xp.tanh(xw[:, 2 * size:] + r * hn)
        saved["acts"][t, :n] = xp.concatenate([r, z, cand], axis=1)
        saved["hn"][t, :n] = hn
        return (1 - z) * cand + z * h
    pre = xw + hw
    h_new = xp.tanh(pre) if mode == "RNN_TANH" else xp.maximum(pre, 0)
    saved["acts"][t, :n] = h_new
    return h_new


def _step_backward(xp, mode, t, n, dh, dc, saved):
    """Gradients of one step: (d input-projection part, d hidden-projection part, d h_prev directly)."""
    acts = saved["acts"][t, :n]
    size = dh.shape[1]
    if mode == "LSTM":
        i, f, g, o = (acts[:, k * size:(k + 1) * size] for k in range(4))
        tanh_c = saved["tanh_c"][t, :n]
        dc_total = dc[:n] + dh * o * (1 - tanh_c * tanh_c)
        d_gates = xp.concatenate([dc_total * g * i * (1 - i), dc_total * saved["c_prev"][t, :n] * f * (1 - f),
                                  dc_total * i * (1 - g * g), dh * tanh_c * o * (1 - o)], axis=1)
        dc[:n] = dc_total * f
        return d_gates, d_gates, None
    if mode == "GRU":
        r, z, cand = (acts[:, k * size:(k + 1) * size] for k in range(3))
        d_cand = dh * (1 - z) * (1 - cand * cand)
        d_r = d_cand * saved["hn"][t, :n] * r * (1 - r)
        d_z = dh * (saved["h_prev"][t, :n] - cand) * z * (1 - z)
        return (xp.concatenate([d_r, d_z, d_cand], axis=1), xp.concatenate([d_r, d_z, d_cand * r], axis=1), dh * z)
    slope = (1 - acts * acts) if mode == "RNN_TANH" else (acts > 0)
    d_pre = dh * slope
    return d_pre, d_pre, None


# ---- the multi-layer modules ----------------------------------------------------------------------------

def _check_sizes(name: str, **sizes) -> None:
    for arg, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")


class RNNBase(Module):
    """What ``RNN``, ``LSTM`` and ``GRU`` share (PyTorch's ``nn.RNNBase``): the per-layer parameters
    and the multi-layer, bidirectional forward over a padded or packed batch.

    Args:
        mode: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU".
        input_size: features of each input step.
        hidden_size: features of the hidden state.
        num_layers: stacked layers (each reads the previous one's output).
        bias: learn ``b_ih`` and ``b_hh``.
        batch_first: input and output are (B, T, *) instead of (T, B, *) (not the states).
        dropout: dropout on each layer's output except the last, in training mode.
        bidirectional: a second direction per layer, run from the last step to the first; the
            outputs of both are concatenated.
        proj_size: LSTM only: > 0 projects each step's hidden state to ``proj_size`` features with
            ``weight_hr_l{k}`` (proj_size, hidden_size); h and the output are then proj_size wide.
    """

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        _check_sizes(name, input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout <= 1:
            raise ValueError(f"{name}: dropout should be a number in range [0, 1] representing the probability of an "
                             f"element being zeroed, got {dropout!r}")
        if isinstance(proj_size, bool) or not isinstance(proj_size, numbers.Integral) or proj_size < 0:
            raise ValueError(f"{name}: proj_size should be a positive integer or zero to disable projections, got "
                             f"{proj_size!r}")
        if proj_size and mode != "LSTM":
            raise ValueError(f"{name}: proj_size argument is only supported for LSTM, not RNN or GRU")
        if proj_size >= hidden_size:
            raise ValueError(f"{name}: proj_size has to be smaller than hidden_size, got proj_size={proj_size} and "
                             f"hidden_size={hidden_size}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                          UserWarning, stacklevel=3)
        self.mode, self.input_size, self.hidden_size = mode, int(input_size), int(hidden_size)
        self.num_layers, self.bias, self.batch_first = int(num_layers), bool(bias), bool(batch_first)
        self.dropout, self.bidirectional, self.proj_size = float(dropout), bool(bidirectional), int(proj_size)
        gate_size = _GATES[mode] * self.hidden_size
        real_hidden = self.proj_size or self.hidden_size  # the width of h and of each direction's output
        self._flat_weights_names = []
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                layer_input = self.input_size if layer == 0 else real_hidden * self.num_directions
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                shapes = {"weight_ih": (gate_size, layer_input), "weight_hh": (gate_size, real_hidden)}
                if self.bias:
                    shapes.update(bias_ih=(gate_size,), bias_hh=(gate_size,))
                if self.proj_size:
                    shapes["weight_hr"] = (self.proj_size, self.hidden_size)
                for kind, shape in shapes.items():
                    self.register_parameter(kind + suffix, Parameter(empty(*shape, dtype=dtype, device=device)))
                    self._flat_weights_names.append(kind + suffix)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """PyTorch's initialisation: every weight and bias from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """Nothing to do: PyTorch packs the weights into one cuDNN buffer here; the engine's layers read
        each parameter directly. Kept so scripts that call it after loading run unchanged."""

    @property
    def _flat_weights(self) -> list:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list:
        """The parameters per layer and direction: ``[[w_ih, w_hh, b_ih, b_hh(, w_hr)], ...]``, as PyTorch's."""
        per = (4 if self.bias else 2) + (1 if self.proj_size else 0)
        flat = self._flat_weights
        return [flat[i:i + per] for i in range(0, len(flat), per)]

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        for flag, default in (("bias", True), ("batch_first", False), ("bidirectional", False)):
            if getattr(self, flag) != default:
                text += f", {flag}={getattr(self, flag)}"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.proj_size:
            text += f", proj_size={self.proj_size}"
        return text

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, input, hx=None):
        """Run the layers over ``input``: (T, B, I) or (B, T, I) with ``batch_first``, (T, I) unbatched, or a
        PackedSequence. ``hx`` is the initial state (num_layers * num_directions, B, H) (a pair (h0, c0)
        for LSTM), zeros when None. Returns ``(output, h_n)`` (``(output, (h_n, c_n))`` for LSTM)."""
        name = type(self).__name__
        packed = isinstance(input, PackedSequence)
        batch_sizes = sorted_indices = unsorted_indices = None
        unbatched = False
        if packed:
            data, sizes_tensor, sorted_indices, unsorted_indices = input
            batch_sizes = sizes_tensor.numpy().astype(np.int64)
            x = _padded_time_major(data, batch_sizes)
        else:
            if not isinstance(input, Tensor) or input.ndim not in (2, 3):
                raise ShapeError(f"{name}: expected a 2-d (unbatched) or 3-d input, got {describe(input)}")
            unbatched = input.ndim == 2
            x = ops.unsqueeze(input, 1) if unbatched else (ops.transpose(input, 0, 1) if self.batch_first else input)
        if x.shape[-1] != self.input_size:
            raise ShapeError(f"{name}: input.size(-1) must be equal to input_size. Expected {self.input_size}, got "
                             f"{x.shape[-1]} ({describe(x)})")
        h0, c0 = self._initial_state(hx, x, unbatched, sorted_indices)
        h_list, c_list, layer_input = [], [], x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                params = [getattr(self, name + suffix) if self.bias or name.startswith("weight") else None
                          for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                params.append(getattr(self, "weight_hr" + suffix) if self.proj_size else None)
                result = RecurrentLayer.apply(layer_input, h0[k], None if c0 is None else c0[k], *params, self.mode,
                                              bool(direction), batch_sizes)
                outputs.append(result[0])
                h_list.append(result[1])
                if c0 is not None:
                    c_list.append(result[2])
            layer_input = outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, 2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        h_n = ops.stack(h_list, 0)
        c_n = ops.stack(c_list, 0) if c0 is not None else None
        if packed:
            output = PackedSequence(_packed_rows(layer_input, batch_sizes), input.batch_sizes, sorted_indices,
                                    unsorted_indices)
            if unsorted_indices is not None:
                h_n = index_select(h_n, 1, unsorted_indices)
                c_n = None if c_n is None else index_select(c_n, 1, unsorted_indices)
        elif unbatched:
            output, h_n = ops.squeeze(layer_input, 1), ops.squeeze(h_n, 1)
            c_n = None if c_n is None else ops.squeeze(c_n, 1)
        else:
            output = ops.transpose(layer_input, 0, 1) if self.batch_first else layer_input
        return output, ((h_n, c_n) if self.mode == "LSTM" else h_n)

    def _initial_state(self, hx, x: Tensor, unbatched: bool, sorted_indices):
        name = type(self).__name__
        shape = (self.num_layers * self.num_directions, x.shape[1], self.hidden_size)
        h_shape = shape[:2] + (self.proj_size or self.hidden_size,)
        lstm = self.mode == "LSTM"
        if hx is None:
            h0 = zeros(*h_shape, dtype=x.dtype, device=x.device)
            return h0, (zeros(*shape, dtype=x.dtype, device=x.device) if lstm else None)
        if lstm != isinstance(hx, (tuple, list)):
            raise TypeError(f"{name}: hx must be " + ("a tuple (h_0, c_0)" if lstm else "a Tensor") +
                            f", got {type(hx).__name__}")
        states = list(hx) if lstm else [hx]
        for i, state in enumerate(states):
            if unbatched:
                if state.ndim != 2:
                    raise ShapeError(f"{name}: for unbatched 2-D input, hx should also be 2-D but got "
                                     f"{describe(state)}")
                state = ops.unsqueeze(state, 1)
            elif sorted_indices is not None:
                state = index_select(state, 1, sorted_indices)  # the caller's order -> the packed (sorted) one
            expected = h_shape if i == 0 else shape
            if state.shape != expected:
                raise ShapeError(f"{name}: expected hidden size {expected}, got {state.shape}")
            states[i] = state
        return states[0], (states[1] if lstm else None)


def _padded_time_major(data: Tensor, batch_sizes: np.ndarray) -> Tensor:
    """The (T, B, *) zero-padded batch of packed ``data`` (differentiable)."""
    from engine.indexing import index_put

    steps, batch = len(batch_sizes), int(batch_sizes[0])
    base = zeros(steps * batch, *data.shape[1:], dtype=data.dtype, device=data.device)
    positions = _index_on(_packed_positions(batch_sizes, batch), data)
    return ops.reshape(index_put(base, positions, data), (steps, batch) + data.shape[1:])


def _packed_rows(padded: Tensor, batch_sizes: np.ndarray) -> Tensor:
    """The packed rows of a (T, B, *) time-major batch (differentiable)."""
    flat = ops.reshape(padded, (-1,) + padded.shape[2:])
    return ops.getitem(flat, _index_on(_packed_positions(batch_sizes, padded.shape[1]), padded))


class RNN(RNNBase):
    """Elman RNN, ``h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)`` (or relu), as ``torch.nn.RNN``.

    Args: as :class:`RNNBase`, plus ``nonlinearity`` ("tanh" or "relu"). Positional order is
    PyTorch's: ``RNN(input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout,
    bidirectional)``.

    Example:
        >>> rnn = nn.RNN(10, 20, 2)                                       # doctest: +SKIP
        >>> output, h_n = rnn(engine.randn(5, 3, 10), engine.randn(2, 3, 20))   # doctest: +SKIP
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: unknown nonlinearity {nonlinearity!r}; select from 'tanh' or 'relu'")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size, num_layers,
                         bias, batch_first, dropout, bidirectional, 0, device, dtype)


class LSTM(RNNBase):
    """Long short-term memory, as ``torch.nn.LSTM`` (gates i, f, g, o in the weights' rows).

    Returns ``(output, (h_n, c_n))``. See :class:`RNNBase` for the arguments (``proj_size`` > 0 adds
    the projections ``weight_hr_l{k}``; h_n and the output are then proj_size wide, c_n hidden_size).

    Example:
        >>> lstm = nn.LSTM(10, 20, num_layers=2, batch_first=True)        # doctest: +SKIP
        >>> output, (h_n, c_n) = lstm(engine.randn(3, 5, 10))             # doctest: +SKIP
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype)


class GRU(RNNBase):
    """Gated recurrent unit, as ``torch.nn.GRU`` (gates r, z, n; ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``).

    See :class:`RNNBase` for the arguments.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0,
                         device, dtype)


# ---- cells: one step --------------------------------------------------------------------------------------

class RNNCellBase(Module):
    """What the cells share: ``weight_ih`` (G*H, I), ``weight_hh`` (G*H, H), ``bias_ih``, ``bias_hh``,
    PyTorch's names, shapes and U(-1/sqrt(H), 1/sqrt(H)) initialisation. One step runs the same
    :class:`RecurrentLayer` as the multi-layer modules, over a sequence of length 1."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, bias: bool, device=None, dtype=None):
        super().__init__()
        _check_sizes(type(self).__name__, input_size=input_size, hidden_size=hidden_size)
        self.mode, self.input_size, self.hidden_size, self.bias = mode, int(input_size), int(hidden_size), bool(bias)
        gate_size = _GATES[mode] * self.hidden_size
        self.weight_ih = Parameter(empty(gate_size, self.input_size, dtype=dtype, device=device))
        self.weight_hh = Parameter(empty(gate_size, self.hidden_size, dtype=dtype, device=device))
        if self.bias:
            self.bias_ih = Parameter(empty(gate_size, dtype=dtype, device=device))
            self.bias_hh = Parameter(empty(gate_size, dtype=dtype, device=device))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            text += ", bias=False"
        if self.mode == "RNN_RELU":
            text += ", nonlinearity=relu"
        return text

    def _step(self, input: Tensor, hx):
        name = type(self).__name__
        if not isinstance(input, Tensor) or input.ndim not in (1, 2):
            raise ShapeError(f"{name}: expected input to be 1-D or 2-D, got {describe(input)}")
        if input.shape[-1] != self.input_size:
            raise ShapeError(f"{name}: input has {input.shape[-1]} features, expected input_size={self.input_size}")
        unbatched = input.ndim == 1
        x = ops.reshape(input, (1, 1, -1)) if unbatched else ops.unsqueeze(input, 0)
        batch = x.shape[1]
        lstm = self.mode == "LSTM"
        if hx is None:
            states = [zeros(batch, self.hidden_size, dtype=input.dtype, device=input.device)] * (2 if lstm else 1)
        else:
            states = list(hx) if lstm else [hx]
            states = [ops.unsqueeze(s, 0) if unbatched else s for s in states]
            for s in states:
                if s.shape != (batch, self.hidden_size):
                    raise ShapeError(f"{name}: expected hidden state of shape {(batch, self.hidden_size)}, got "
                                     f"{describe(s)}")
        result = RecurrentLayer.apply(x, states[0], states[1] if lstm else None, self.weight_ih, self.weight_hh,
                                      self.bias_ih, self.bias_hh, None, self.mode, False, None)
        finals = [result[1]] + ([result[2]] if lstm else [])
        if unbatched:
            finals = [ops.squeeze(f, 0) for f in finals]
        return tuple(finals) if lstm else finals[0]


class RNNCell(RNNCellBase):
    """One Elman step, ``h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)`` (or relu), as ``torch.nn.RNNCell``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNNCell: unknown nonlinearity {nonlinearity!r}; select from 'tanh' or 'relu'")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size, bias,
                         device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """The next hidden state (B, H) from input (B, I) (or (I,) unbatched) and ``hx`` (zeros if None)."""
        return self._step(input, hx)


class LSTMCell(RNNCellBase):
    """One LSTM step, as ``torch.nn.LSTMCell``: returns ``(h', c')``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx=None):
        """``(h', c')`` from input (B, I) and ``hx = (h, c)`` (zeros if None)."""
        return self._step(input, hx)


class GRUCell(RNNCellBase):
    """One GRU step, as ``torch.nn.GRUCell``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__("GRU", input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        return self._step(input, hx)

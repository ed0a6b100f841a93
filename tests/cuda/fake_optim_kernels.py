"""The optim.cu kernels as launches on the fake stream-capture layer (tests/cuda/fake_capture.py).

The cupy impls of adam_step / sgd_step (kernels/cuda/optim.py) build their argument tuple and
launch ``function("optim", name)``. On the fake GPU there is no NVRTC module to launch, so
:func:`install` replaces ``function`` with a numpy transcription of the float32 kernels that
takes the same tuple (parameter names parsed from optim.cu) and runs as one fake operation: at
once, and, while capturing, recorded so that a replay runs it again and reads ``device_scalars``,
``found_inf`` and ``inv_scale`` afresh from their memory, as the GPU kernel does. So the tests
check the wrapper's wiring (which slot of device_scalars holds what) end to end under capture.
"""

from __future__ import annotations

import re

import numpy as np

from engine import kernels
from engine.kernels.cuda import optim as cupy_optim
from engine.kernels.cuda.module import source
from tests.cuda.fake_capture import FakeArray

MAXIMIZE, WEIGHT_DECAY, DECOUPLED, AMSGRAD = 1, 2, 4, 8
MOMENTUM, NESTEROV, FIRST_STEP = 16, 32, 64
FOUND_INF, UNSCALE, DEVICE_SCALARS = 256, 512, 1024


def _signatures() -> dict:
    return {name: [p.split()[-1] for p in params.split(",")]
            for name, params in re.findall(r"OPT_ENTRY (\w+)\(([^)]*)\)", source("optim"))}


def _adam(a, flags):
    if flags & DEVICE_SCALARS:
        a["step_size"], a["bc2_sqrt"], a["decay_factor"] = a["device_scalars"][:3]
    p, g, m, v = a["param"], a["grad"], a["exp_avg"], a["exp_avg_sq"]
    if flags & MAXIMIZE:
        g = -g
    if flags & WEIGHT_DECAY:
        if flags & DECOUPLED:
            p *= a["decay_factor"]
        else:
            g = g + a["weight_decay"] * p
    m *= a["beta1"]
    m += a["one_minus_beta1"] * g
    v *= a["beta2"]
    v += a["one_minus_beta2"] * (g * g)
    second = v
    if flags & AMSGRAD:
        np.maximum(a["max_exp_avg_sq"], v, out=a["max_exp_avg_sq"])
        second = a["max_exp_avg_sq"]
    p -= a["step_size"] * (m / (np.sqrt(second) / a["bc2_sqrt"] + a["eps"]))


def _sgd(a, flags):
    lr = a["lr"]
    if flags & DEVICE_SCALARS:
        flags = flags | FIRST_STEP if a["device_scalars"][0] != 0 else flags & ~FIRST_STEP
        lr = a["device_scalars"][1]
    p, g = a["param"], a["grad"]
    if flags & MAXIMIZE:
        g = -g
    if flags & WEIGHT_DECAY:
        g = g + a["weight_decay"] * p
    if flags & MOMENTUM:
        buf = a["momentum_buf"]
        if flags & FIRST_STEP:
            buf[...] = g
        else:
            buf *= a["momentum"]
            buf += a["one_minus_dampening"] * g
        g = g + a["momentum"] * buf if flags & NESTEROV else buf
    p -= lr * g


UPDATES = {"adam_step_f32": _adam, "sgd_step_f32": _sgd}


def install(monkeypatch, fake) -> list:
    """Route the cupy optim impls' launches on ``fake`` to the transcriptions; returns the list the
    launched kernel names are appended to."""
    signatures, launched = _signatures(), []

    def function(module, name):
        assert module == "optim" and name in UPDATES, f"no fake for optim kernel {name}"
        names = signatures[name]

        def launch(grid, block, args):
            launched.append(name)
            arrays = [x for x in args if hasattr(x, "host")]

            def run(*hosts):
                a = dict(zip(names, hosts + tuple(x for x in args if not hasattr(x, "host"))))
                flags = int(a["flags"])
                if flags & FOUND_INF and a["found_inf"].reshape(-1)[0] != 0:
                    return
                if flags & UNSCALE:
                    a["grad"] *= a["inv_scale"].reshape(-1)[0]
                UPDATES[name](a, flags)
            # Every pointer argument comes first in the .cu signatures, so `hosts` line up with `names`.
            fake._multi_write(run, tuple(arrays), {}, arrays)
        return launch

    monkeypatch.setattr(cupy_optim, "function", function)
    monkeypatch.setattr(cupy_optim, "_resident_blocks", lambda name, device_id: 4)
    registry_call = kernels.call

    def call(kernel, *args, impl=None, **kwargs):  # the registry sees no array in a FakeArray: send it to cupy's impl
        if isinstance(args[0], FakeArray) and kernel in ("adam_step", "sgd_step"):
            return getattr(cupy_optim, kernel)(*args, **kwargs)
        return registry_call(kernel, *args, impl=impl, **kwargs)

    monkeypatch.setattr(kernels, "call", call)
    return launched

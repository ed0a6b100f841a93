"""Learning-rate schedulers with PyTorch's semantics (``torch.optim.lr_scheduler``).

A scheduler is stepped once per epoch, after the optimizer's step, and writes each param
group's ``"lr"``. ``last_epoch`` counts the steps taken (construction takes the first one, so it
is 0 right after). Each scheduler updates the learning rate *relative to its current value*
(PyTorch's chainable form), so that :class:`ChainedScheduler` can compose several; where a
closed form exists (``base_lr * f(epoch)``) it is used to jump to an epoch (what
:class:`SequentialLR` does at a milestone), and the tests check the chainable sequence
against it.

State dicts hold plain numbers, strings and lists only (never the optimizer or a callable), so
they can be stored with :func:`engine.save`.

Example:
    >>> warmup = LinearLR(opt, start_factor=0.1, total_iters=5)               # doctest: +SKIP
    >>> cosine = CosineAnnealingLR(opt, T_max=95)                             # doctest: +SKIP
    >>> sched = SequentialLR(opt, [warmup, cosine], milestones=[5])           # doctest: +SKIP
    >>> for epoch in range(100):                                              # doctest: +SKIP
    ...     train_one_epoch(); sched.step()
"""

from __future__ import annotations

import math
import numbers
from bisect import bisect_right

from engine.errors import EngineError

__all__ = ["LRScheduler", "LambdaLR", "StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR",
           "LinearLR", "SequentialLR", "ChainedScheduler", "ReduceLROnPlateau", "OneCycleLR"]


class _StateDictMixin:
    """state_dict / load_state_dict over the scheduler's attributes (minus ``_not_saved``)."""

    _not_saved: tuple[str, ...] = ("optimizer",)

    def state_dict(self) -> dict:
        """The scheduler's state: plain numbers, strings and lists (no optimizer, no callables)."""
        return self._own_state()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`. The optimizer's learning rates are not touched: restore
        them with the optimizer's own ``load_state_dict``."""
        self._load_own(state_dict)

    def _own_state(self) -> dict:
        return {key: _copy(value) for key, value in vars(self).items() if key not in self._not_saved}

    def _load_own(self, state_dict: dict) -> None:
        name = f"{type(self).__name__}.load_state_dict"
        current = self._own_state()
        if not isinstance(state_dict, dict):
            raise EngineError(f"{name}: expected a dict, got {type(state_dict).__name__}")
        missing, unexpected = set(current) - set(state_dict), set(state_dict) - set(current)
        if missing or unexpected:
            raise EngineError(f"{name}: the state dict does not belong to a {type(self).__name__}: missing keys "
                              f"{sorted(missing)}, unexpected keys {sorted(unexpected)}")
        for key, value in current.items():
            loaded = state_dict[key]
            if isinstance(value, list) and (not isinstance(loaded, (list, tuple)) or len(loaded) != len(value)):
                raise EngineError(f"{name}: {key!r} must be a list of {len(value)} value(s), as in this "
                                  f"scheduler (built for the same optimizer and settings), got {loaded!r}")
        self.__dict__.update({key: _copy(state_dict[key]) for key in current})


class LRScheduler(_StateDictMixin):
    """Base class: subclasses define ``get_lr`` (chainable) and optionally ``_closed_form_lr``.

    Args:
        optimizer: the optimizer whose param groups' ``"lr"`` this scheduler sets.
        last_epoch: index of the last epoch when resuming; -1 (default) starts fresh and records
            each group's current lr as its ``"initial_lr"``.
    """

    def __init__(self, optimizer, last_epoch: int = -1):
        self.optimizer = optimizer
        groups = _param_groups(type(self).__name__, optimizer)
        if last_epoch == -1:
            for group in groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for i, group in enumerate(groups):
                if "initial_lr" not in group:
                    raise EngineError(f"{type(self).__name__}: resuming with last_epoch={last_epoch} needs "
                                      f"'initial_lr' in param_groups[{i}]; load the optimizer's state dict first "
                                      "or start with last_epoch=-1")
        self.base_lrs = [group["initial_lr"] for group in groups]
        self.last_epoch = last_epoch
        self._initial_step()

    def _initial_step(self) -> None:
        self._step_count = 0
        self.step()

    def get_lr(self) -> list[float]:
        """The learning rates for ``last_epoch``, computed from the current ones (chainable)."""
        raise NotImplementedError

    def get_last_lr(self) -> list[float]:
        """The learning rate of each param group as last set by this scheduler."""
        return list(self._last_lr)

    def step(self) -> None:
        """Advance one epoch and set each param group's learning rate."""
        self._step_count += 1
        self.last_epoch += 1
        self._apply(self.get_lr())

    def _jump_to(self, epoch: int) -> None:
        """Set the learning rates for ``epoch`` directly (closed form when there is one)."""
        self._step_count += 1
        self.last_epoch = epoch
        closed = getattr(self, "_closed_form_lr", None)
        self._apply(closed() if closed is not None else self.get_lr())

    def _apply(self, values) -> None:
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class LambdaLR(LRScheduler):
    """``lr = base_lr * lr_lambda(epoch)``.

    Args:
        optimizer: the optimizer.
        lr_lambda: a function of the epoch, or a list of them (one per param group). Functions
            are not saved in the state dict: rebuild the scheduler with them, then load.
        last_epoch: see :class:`LRScheduler`.
    """

    _not_saved = ("optimizer", "lr_lambdas")

    def __init__(self, optimizer, lr_lambda, last_epoch: int = -1):
        groups = _param_groups("LambdaLR", optimizer)
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != len(groups):
                raise EngineError(f"LambdaLR: got {len(lr_lambda)} lr_lambda(s) for {len(groups)} param group(s)")
            self.lr_lambdas = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * len(groups)
        if not all(callable(f) for f in self.lr_lambdas):
            raise EngineError("LambdaLR: lr_lambda must be a function of the epoch (or a list of them)")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [base_lr * f(self.last_epoch) for f, base_lr in zip(self.lr_lambdas, self.base_lrs)]


class StepLR(LRScheduler):
    """Multiply the lr by ``gamma`` every ``step_size`` epochs: ``base_lr * gamma ** (epoch // step_size)``.

    ``step_size`` may be a float, as PyTorch takes it (``StepLR(optimizer, 1.0)``): the lr decays at
    the epochs where ``epoch % step_size == 0``, Python's arithmetic on the value as given.
    """

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1):
        _check_real("StepLR", "step_size", step_size)
        if step_size <= 0:
            raise EngineError(f"StepLR: step_size must be > 0, got {step_size!r}")
        _check_real("StepLR", "gamma", gamma)
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        lrs = _current_lrs(self)
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return lrs
        return [lr * self.gamma for lr in lrs]

    def _closed_form_lr(self) -> list[float]:
        return [base_lr * self.gamma ** (self.last_epoch // self.step_size) for base_lr in self.base_lrs]


class MultiStepLR(LRScheduler):
    """Multiply the lr by ``gamma`` at each milestone epoch (a repeated milestone multiplies again)."""

    def __init__(self, optimizer, milestones, gamma: float = 0.1, last_epoch: int = -1):
        milestones = list(milestones)
        for m in milestones:
            _check_int("MultiStepLR", "milestones", m, low=0)
        _check_real("MultiStepLR", "gamma", gamma)
        self.milestones, self.gamma = sorted(int(m) for m in milestones), gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        hits = self.milestones.count(self.last_epoch)
        return [lr * self.gamma ** hits if hits else lr for lr in _current_lrs(self)]

    def _closed_form_lr(self) -> list[float]:
        passed = bisect_right(self.milestones, self.last_epoch)
        return [base_lr * self.gamma ** passed for base_lr in self.base_lrs]


class ExponentialLR(LRScheduler):
    """Multiply the lr by ``gamma`` every epoch: ``base_lr * gamma ** epoch``."""

    def __init__(self, optimizer, gamma: float, last_epoch: int = -1):
        _check_real("ExponentialLR", "gamma", gamma)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        lrs = _current_lrs(self)
        return lrs if self.last_epoch == 0 else [lr * self.gamma for lr in lrs]

    def _closed_form_lr(self) -> list[float]:
        return [base_lr * self.gamma ** self.last_epoch for base_lr in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    r"""Cosine annealing from ``base_lr`` down to ``eta_min`` over ``T_max`` epochs (SGDR without restarts).

    Closed form: :math:`\eta_{min} + (\eta_{base} - \eta_{min})\,(1 + \cos(\pi\,t / T_{max})) / 2`;
    past ``T_max`` the lr rises again along the same cosine, as in PyTorch.
    """

    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1):  # noqa: N803 (PyTorch name)
        _check_int("CosineAnnealingLR", "T_max", T_max, low=1)
        _check_real("CosineAnnealingLR", "eta_min", eta_min)
        self.T_max, self.eta_min = int(T_max), eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        t, t_max, eta_min = self.last_epoch, self.T_max, self.eta_min
        lrs = _current_lrs(self)
        if t == 0:
            return lrs
        if self._step_count == 1 and t > 0:  # resumed at construction: nothing to be relative to
            return self._closed_form_lr()
        if (t - 1 - t_max) % (2 * t_max) == 0:  # leaving the minimum: the ratio below would be 0/0
            return [lr + (base_lr - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
                    for lr, base_lr in zip(lrs, self.base_lrs)]
        ratio = (1 + math.cos(math.pi * t / t_max)) / (1 + math.cos(math.pi * (t - 1) / t_max))
        return [ratio * (lr - eta_min) + eta_min for lr in lrs]

    def _closed_form_lr(self) -> list[float]:
        cosine = (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
        return [self.eta_min + (base_lr - self.eta_min) * cosine for base_lr in self.base_lrs]


class LinearLR(LRScheduler):
    """Scale the lr linearly from ``start_factor`` to ``end_factor`` over ``total_iters`` epochs (warm-up).

    Closed form: ``base_lr * (start + (end - start) * min(epoch, total_iters) / total_iters)``.
    """

    def __init__(self, optimizer, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5,
                 last_epoch: int = -1):
        if not isinstance(start_factor, numbers.Real) or not 0 < start_factor <= 1:
            raise EngineError(f"LinearLR: start_factor must be in (0, 1], got {start_factor!r}")
        if not isinstance(end_factor, numbers.Real) or not 0 <= end_factor <= 1:
            raise EngineError(f"LinearLR: end_factor must be in [0, 1], got {end_factor!r}")
        _check_int("LinearLR", "total_iters", total_iters, low=1)
        self.start_factor, self.end_factor, self.total_iters = start_factor, end_factor, int(total_iters)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        lrs = _current_lrs(self)
        if self.last_epoch == 0:
            return [lr * self.start_factor for lr in lrs]
        if self.last_epoch > self.total_iters:
            return lrs
        change = self.end_factor - self.start_factor
        factor = 1.0 + change / (self.total_iters * self.start_factor + (self.last_epoch - 1) * change)
        return [lr * factor for lr in lrs]

    def _closed_form_lr(self) -> list[float]:
        progress = min(self.total_iters, self.last_epoch) / self.total_iters
        factor = self.start_factor + (self.end_factor - self.start_factor) * progress
        return [base_lr * factor for base_lr in self.base_lrs]


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topor, 2017), as ``torch.optim.lr_scheduler.OneCycleLR``: the lr rises
    from ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of the steps, then falls to
    ``initial_lr / final_div_factor``; with ``cycle_momentum`` the momentum (SGD's ``momentum``, or
    Adam's ``betas[0]``) moves inversely between ``max_momentum`` and ``base_momentum``. Stepped after
    every batch (not every epoch); stepping past ``total_steps`` raises, as in PyTorch.

    Args:
        optimizer: the optimizer.
        max_lr: the peak lr (a number, or one per param group).
        total_steps: steps in the cycle; or give ``epochs`` and ``steps_per_epoch``.
        epochs, steps_per_epoch: ``total_steps = epochs * steps_per_epoch``.
        pct_start: fraction of the cycle spent increasing the lr.
        anneal_strategy: "cos" or "linear".
        cycle_momentum: also cycle the momentum.
        base_momentum, max_momentum: the momentum's bounds (numbers or one per group).
        div_factor: ``initial_lr = max_lr / div_factor``.
        final_div_factor: ``min_lr = initial_lr / final_div_factor``.
        three_phase: a third phase anneals from ``initial_lr`` to ``min_lr`` (fast.ai's schedule).
        last_epoch: the index of the last step when resuming (-1 starts fresh).
    """

    def __init__(self, optimizer, max_lr, total_steps: int | None = None, epochs: int | None = None,
                 steps_per_epoch: int | None = None, pct_start: float = 0.3, anneal_strategy: str = "cos",
                 cycle_momentum: bool = True, base_momentum=0.85, max_momentum=0.95, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False, last_epoch: int = -1):
        name = "OneCycleLR"
        groups = _param_groups(name, optimizer)
        if total_steps is not None:
            _check_int(name, "total_steps", total_steps, low=1)
            self.total_steps = int(total_steps)
        elif epochs is not None and steps_per_epoch is not None:
            _check_int(name, "epochs", epochs, low=1)
            _check_int(name, "steps_per_epoch", steps_per_epoch, low=1)
            self.total_steps = int(epochs) * int(steps_per_epoch)
        else:
            raise EngineError(f"{name}: you must define either total_steps OR (epochs AND steps_per_epoch)")
        if not isinstance(pct_start, numbers.Real) or not 0 <= pct_start <= 1:
            raise EngineError(f"{name}: expected a float between 0 and 1 for pct_start, got {pct_start!r}")
        if anneal_strategy not in ("cos", "linear"):
            raise EngineError(f"{name}: anneal_strategy must be one of 'cos' or 'linear', got {anneal_strategy!r}")
        for arg, value in (("div_factor", div_factor), ("final_div_factor", final_div_factor)):
            _check_real(name, arg, value)
        self.anneal_strategy, self.cycle_momentum = anneal_strategy, bool(cycle_momentum)
        steps = self.total_steps
        if three_phase:
            self._schedule_phases = [
                dict(end_step=float(pct_start * steps) - 1, start_lr="initial_lr", end_lr="max_lr",
                     start_momentum="max_momentum", end_momentum="base_momentum"),
                dict(end_step=float(2 * pct_start * steps) - 2, start_lr="max_lr", end_lr="initial_lr",
                     start_momentum="base_momentum", end_momentum="max_momentum"),
                dict(end_step=steps - 1, start_lr="initial_lr", end_lr="min_lr",
                     start_momentum="max_momentum", end_momentum="max_momentum")]
        else:
            self._schedule_phases = [
                dict(end_step=float(pct_start * steps) - 1, start_lr="initial_lr", end_lr="max_lr",
                     start_momentum="max_momentum", end_momentum="base_momentum"),
                dict(end_step=steps - 1, start_lr="max_lr", end_lr="min_lr",
                     start_momentum="base_momentum", end_momentum="max_momentum")]
        max_lrs = _per_group(name, "max_lr", max_lr, groups)
        if last_epoch == -1:
            for group, peak in zip(groups, max_lrs):
                group["initial_lr"] = peak / div_factor
                group["max_lr"] = peak
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.use_beta1 = False
        if self.cycle_momentum:
            defaults = getattr(optimizer, "defaults", {})
            if "momentum" not in defaults and "betas" not in defaults:
                raise EngineError(f"{name}: optimizer must support momentum or beta1 with the cycle_momentum option "
                                  f"enabled ({type(optimizer).__name__} has neither); pass cycle_momentum=False")
            self.use_beta1 = "betas" in defaults
            highs = _per_group(name, "max_momentum", max_momentum, groups)
            lows = _per_group(name, "base_momentum", base_momentum, groups)
            if last_epoch == -1:
                for group, high, low in zip(groups, highs, lows):
                    self._set_momentum(group, high)
                    group["max_momentum"], group["base_momentum"] = high, low
        super().__init__(optimizer, last_epoch)

    def _set_momentum(self, group: dict, value: float) -> None:
        if self.use_beta1:
            group["betas"] = (value, *group["betas"][1:])
        else:
            group["momentum"] = value

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        if step > self.total_steps:
            raise EngineError(f"OneCycleLR: tried to step {step} times; the specified number of total steps is "
                              f"{self.total_steps}")
        lrs = []
        for group in self.optimizer.param_groups:
            start = 0.0
            for i, phase in enumerate(self._schedule_phases):
                end = phase["end_step"]
                if step <= end or i == len(self._schedule_phases) - 1:
                    pct = (step - start) / (end - start)
                    lrs.append(self._anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct))
                    if self.cycle_momentum:
                        self._set_momentum(group, self._anneal(group[phase["start_momentum"]],
                                                               group[phase["end_momentum"]], pct))
                    break
                start = end
        return lrs


def _per_group(name: str, arg: str, value, groups: list) -> list[float]:
    """A hyperparameter given once or once per param group, as a list with one value per group."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise EngineError(f"{name}: expected {len(groups)} values for {arg}, got {len(value)}")
        values = list(value)
    else:
        values = [value] * len(groups)
    for v in values:
        _check_real(name, arg, v)
    return values


class _CombinesSchedulers:
    """state_dict / load_state_dict of a scheduler made of others (``self._schedulers``): its own
    state plus each part's; loading is all or nothing."""

    _not_saved = ("optimizer", "_schedulers")

    def state_dict(self) -> dict:
        state = self._own_state()
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        name = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict) or "_schedulers" not in state_dict:
            raise EngineError(f"{name}: expected a state dict with a '_schedulers' list")
        children = state_dict["_schedulers"]
        if not isinstance(children, (list, tuple)) or len(children) != len(self._schedulers):
            count = len(children) if isinstance(children, (list, tuple)) else "no list of"
            raise EngineError(f"{name}: the state dict holds {count} scheduler state(s) but this one combines "
                              f"{len(self._schedulers)}")
        own = {k: v for k, v in state_dict.items() if k != "_schedulers"}
        # Load every part, and restore them all if one fails, so a bad state dict changes nothing.
        backups = [s.state_dict() for s in self._schedulers] + [self._own_state()]
        try:
            for child, child_state in zip(self._schedulers, children):
                child.load_state_dict(child_state)
            self._load_own(own)
        except EngineError:
            for child, backup in zip(self._schedulers, backups):
                child.load_state_dict(backup)
            self._load_own(backups[-1])
            raise


class SequentialLR(_CombinesSchedulers, LRScheduler):
    """Run ``schedulers`` one after another, switching at the ``milestones`` epochs.

    Each scheduler starts from its own epoch 0 at its milestone (closed form), e.g. a linear
    warm-up for 5 epochs then cosine annealing: ``SequentialLR(opt, [LinearLR(opt, 0.1,
    total_iters=5), CosineAnnealingLR(opt, T_max=95)], milestones=[5])``.

    Args:
        optimizer: the optimizer every scheduler drives.
        schedulers: the schedulers, in order (already built on ``optimizer``).
        milestones: ``len(schedulers) - 1`` increasing epochs at which the next one takes over.
        last_epoch: see :class:`LRScheduler`.
    """

    def __init__(self, optimizer, schedulers, milestones, last_epoch: int = -1):
        schedulers = list(schedulers)
        _check_members("SequentialLR", optimizer, schedulers)
        milestones = [int(m) for m in milestones]
        if len(milestones) != len(schedulers) - 1:
            raise EngineError(f"SequentialLR: expected {len(schedulers) - 1} milestone(s) for {len(schedulers)} "
                              f"schedulers, got {milestones}")
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise EngineError(f"SequentialLR: milestones must increase, got {milestones}")
        self.optimizer, self._schedulers, self._milestones = optimizer, schedulers, milestones
        self.last_epoch = last_epoch + 1
        # Building each scheduler took a step; undo them and start the first one afresh.
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        for scheduler in schedulers:
            scheduler.last_epoch -= 1
        schedulers[0]._initial_step()
        self._last_lr = schedulers[0].get_last_lr()

    def step(self) -> None:
        self.last_epoch += 1
        index = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[index]
        if index > 0 and self._milestones[index - 1] == self.last_epoch:
            scheduler._jump_to(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()



class ChainedScheduler(_CombinesSchedulers, LRScheduler):
    """Step several schedulers together each epoch; their multiplicative effects compose.

    Example: ``ChainedScheduler([LinearLR(opt, 0.1, total_iters=5), CosineAnnealingLR(opt, T_max=100)])``
    warms up while annealing.

    Args:
        schedulers: the schedulers to step, in order (all on one optimizer).
        optimizer: that optimizer (default: the first scheduler's).
    """

    def __init__(self, schedulers, optimizer=None):
        schedulers = list(schedulers)
        if not schedulers:
            raise EngineError("ChainedScheduler: expected at least one scheduler")
        optimizer = optimizer if optimizer is not None else getattr(schedulers[0], "optimizer", None)
        _check_members("ChainedScheduler", optimizer, schedulers)
        self.optimizer, self._schedulers = optimizer, schedulers
        self._last_lr = [group["lr"] for group in optimizer.param_groups]

    def step(self) -> None:
        for scheduler in self._schedulers:
            scheduler.step()
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]



class ReduceLROnPlateau(_StateDictMixin):
    """Reduce the lr by ``factor`` when a metric has stopped improving for ``patience`` epochs.

    Call ``step(metric)`` once per epoch with the validation metric.

    Args:
        optimizer: the optimizer.
        mode: "min" (lower is better, e.g. a loss) or "max" (e.g. accuracy).
        factor: multiply the lr by this (< 1) on a plateau.
        patience: epochs without improvement tolerated before reducing.
        threshold: how much better counts as an improvement.
        threshold_mode: "rel" (better than ``best * (1 -/+ threshold)``) or "abs" (``best -/+ threshold``).
        cooldown: epochs to wait after a reduction before counting bad epochs again.
        min_lr: lower bound on the lr, one number or one per param group.
        eps: reductions smaller than this are skipped.
    """

    def __init__(self, optimizer, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0, min_lr=0.0,
                 eps: float = 1e-8):
        groups = _param_groups("ReduceLROnPlateau", optimizer)
        if not isinstance(factor, numbers.Real) or not 0 <= factor < 1:
            raise EngineError(f"ReduceLROnPlateau: factor must be in [0, 1), got {factor!r}")
        if mode not in ("min", "max"):
            raise EngineError(f"ReduceLROnPlateau: mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise EngineError(f"ReduceLROnPlateau: threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        _check_int("ReduceLROnPlateau", "patience", patience, low=0)
        _check_int("ReduceLROnPlateau", "cooldown", cooldown, low=0)
        _check_real("ReduceLROnPlateau", "threshold", threshold)
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != len(groups):
                raise EngineError(f"ReduceLROnPlateau: got {len(min_lr)} min_lr(s) for {len(groups)} param group(s)")
            self.min_lrs = list(min_lr)
        else:
            self.min_lrs = [min_lr] * len(groups)
        self.optimizer = optimizer
        self.mode, self.factor, self.patience, self.threshold = mode, factor, int(patience), threshold
        self.threshold_mode, self.cooldown, self.eps = threshold_mode, int(cooldown), eps
        self.cooldown_counter = 0
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self.best = self.mode_worse
        self.num_bad_epochs = 0
        self.last_epoch = 0
        self._last_lr = [group["lr"] for group in groups]

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def step(self, metrics) -> None:
        """Record this epoch's metric (a number or one-element Tensor); reduce the lr on a plateau."""
        try:
            current = float(metrics)
        except (TypeError, ValueError):
            raise EngineError(f"ReduceLROnPlateau.step: metrics must be a number, got {metrics!r}") from None
        self.last_epoch += 1
        if self._is_better(current):
            self.best, self.num_bad_epochs = current, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs during cooldown do not count
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _reduce_lr(self) -> None:
        for group, min_lr in zip(self.optimizer.param_groups, self.min_lrs):
            old = float(group["lr"])
            new = max(old * self.factor, min_lr)
            if old - new > self.eps:
                group["lr"] = new

    def _is_better(self, current: float) -> bool:
        if self.mode == "min":
            bound = self.best * (1 - self.threshold) if self.threshold_mode == "rel" else self.best - self.threshold
            return current < bound
        bound = self.best * (1 + self.threshold) if self.threshold_mode == "rel" else self.best + self.threshold
        return current > bound


# ---- helpers -----------------------------------------------------------------------------------

def _param_groups(name: str, optimizer) -> list[dict]:
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "lr" in g for g in groups):
        raise EngineError(f"{name}: expected an optimizer (with param_groups holding 'lr'), got "
                          f"{type(optimizer).__name__}")
    return groups


def _current_lrs(scheduler) -> list[float]:
    return [group["lr"] for group in scheduler.optimizer.param_groups]


def _check_members(name: str, optimizer, schedulers) -> None:
    _param_groups(name, optimizer)
    if not schedulers:
        raise EngineError(f"{name}: expected at least one scheduler")
    for i, scheduler in enumerate(schedulers):
        if isinstance(scheduler, ReduceLROnPlateau) or not isinstance(scheduler, LRScheduler):
            raise EngineError(f"{name}: schedulers[{i}] is a {type(scheduler).__name__}; only epoch-based "
                              "schedulers (not ReduceLROnPlateau) can be combined")
        if scheduler.optimizer is not optimizer:
            raise EngineError(f"{name}: schedulers[{i}] drives a different optimizer; all must share one")




def _check_int(name: str, arg: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise EngineError(f"{name}: {arg} must be an integer >= {low}, got {value!r}")


def _check_real(name: str, arg: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise EngineError(f"{name}: {arg} must be a finite real number, got {value!r}")


def _copy(value):
    return list(value) if isinstance(value, (list, tuple)) and not isinstance(value, str) else value

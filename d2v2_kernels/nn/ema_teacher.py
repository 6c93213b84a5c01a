"""EMATeacher: the data2vec 2.0 teacher, an exponential moving average of the student (data2vec2.md §5).

The teacher is a deep copy of the student module, kept in eval mode with requires_grad off and its
parameters in `dtype` (fp32 by default: the reference keeps an fp32 shadow even when training in
bf16/fp16). Each `step(student)` applies one fused `ema_update_` over all tracked parameters, with the
decay annealed linearly from `decay_start` to `decay_end` over `anneal_steps` updates and constant
after; once the decay reaches 1.0 the teacher is frozen (nothing is updated; the step still counts).

`exclude` names submodules (prefixes such as "decoder") whose parameters are not averaged: as fairseq's
EMA `skip_keys`, the teacher's copy of them follows the student, copied each step. Buffers (e.g.
normalisation statistics) are copied from the student each step too.
"""

from __future__ import annotations

import copy
import numbers
from typing import Iterable

import torch
from torch import nn

from ..ops.ema import ema_update_


def _check_decay(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1], got {value}")
    return value


def _check_names(kind: str, student_names: Iterable[str], teacher_names: Iterable[str]) -> None:
    student_names, teacher_names = set(student_names), set(teacher_names)
    if student_names != teacher_names:
        missing = sorted(teacher_names - student_names)
        unexpected = sorted(student_names - teacher_names)
        raise ValueError(
            f"student_module: its {kind}s differ from the teacher's: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )


class EMATeacher(nn.Module):
    """An EMA copy of `student_module`, updated in place by `step(student_module)` once per update.

    Args:
        student_module: the module to copy and track (parameters are matched by name at every step).
        decay_start, decay_end: the decay τ0 at step 0 and τe from `anneal_steps` on (in [0, 1]).
        anneal_steps: updates over which the decay goes linearly from τ0 to τe (0: τe from the start).
        exclude: submodule names (prefixes) whose parameters are copied from the student, not averaged.
        dtype: the dtype of the teacher's floating-point parameters and buffers (fp32 by default).

    `forward` runs the teacher copy under no_grad; `module` is that copy. `state_dict()` holds the
    teacher weights and, as extra state, the step count and the schedule, so a resumed run continues
    exactly where it stopped.
    """

    def __init__(
        self,
        student_module: nn.Module,
        *,
        decay_start: float = 0.9998,
        decay_end: float = 0.99999,
        anneal_steps: int = 100_000,
        exclude: str | Iterable[str] = (),
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not isinstance(student_module, nn.Module):
            raise TypeError(f"student_module: expected a torch.nn.Module, got {type(student_module).__name__}")
        if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, numbers.Integral) or anneal_steps < 0:
            raise ValueError(f"anneal_steps: expected an int >= 0, got {anneal_steps!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
        self.decay_start = _check_decay("decay_start", decay_start)
        self.decay_end = _check_decay("decay_end", decay_end)
        self.anneal_steps = int(anneal_steps)
        self.exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        module_names = {name for name, _ in student_module.named_modules()}
        param_names = {name for name, _ in student_module.named_parameters()}
        for prefix in self.exclude:
            if not isinstance(prefix, str) or (prefix not in module_names and prefix not in param_names):
                raise ValueError(f"exclude: {prefix!r} names no submodule or parameter of student_module")
        self.num_updates = 0

        self.module = copy.deepcopy(student_module).to(dtype=dtype)
        self.module.requires_grad_(False)
        self.module.eval()

    # --- schedule --------------------------------------------------------------------------------

    @property
    def decay(self) -> float:
        """The decay of the next update: τ0 + (τe - τ0) * step / anneal_steps, then τe."""
        if self.num_updates >= self.anneal_steps:
            return self.decay_end
        return self.decay_start + (self.decay_end - self.decay_start) * self.num_updates / self.anneal_steps

    @property
    def frozen(self) -> bool:
        return self.decay >= 1.0

    def _is_excluded(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.exclude)

    # --- update ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, student_module: nn.Module) -> None:
        """One EMA update from `student_module` (same parameter names and shapes as the teacher)."""
        decay = self.decay
        if decay < 1.0:
            teacher_params = dict(self.module.named_parameters())
            student_params = dict(student_module.named_parameters())
            _check_names("parameter", student_params, teacher_params)
            tracked_teacher, tracked_student = [], []
            for name, t in teacher_params.items():
                s = student_params[name]
                if s.shape != t.shape:
                    raise ValueError(
                        f"student_module: parameter {name!r} has shape {tuple(s.shape)}, the teacher's {tuple(t.shape)}"
                    )
                if self._is_excluded(name):
                    t.copy_(s)
                else:
                    tracked_teacher.append(t)
                    tracked_student.append(s)
            ema_update_(tracked_teacher, tracked_student, decay)

            teacher_buffers = dict(self.module.named_buffers())
            student_buffers = dict(student_module.named_buffers())
            _check_names("buffer", student_buffers, teacher_buffers)
            for name, t in teacher_buffers.items():
                t.copy_(student_buffers[name])
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "EMATeacher":
        # The teacher copy stays in eval mode (no dropout) whatever its parent's mode.
        self.training = mode
        return self

    # --- checkpoints -----------------------------------------------------------------------------

    def get_extra_state(self) -> dict:
        return {
            "num_updates": self.num_updates,
            "decay_start": self.decay_start,
            "decay_end": self.decay_end,
            "anneal_steps": self.anneal_steps,
            "exclude": list(self.exclude),
        }

    def set_extra_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        self.decay_start = _check_decay("decay_start", state["decay_start"])
        self.decay_end = _check_decay("decay_end", state["decay_end"])
        self.anneal_steps = int(state["anneal_steps"])
        self.exclude = tuple(state["exclude"])

    def extra_repr(self) -> str:
        return (
            f"decay_start={self.decay_start}, decay_end={self.decay_end}, anneal_steps={self.anneal_steps}, "
            f"exclude={self.exclude}, num_updates={self.num_updates}"
        )

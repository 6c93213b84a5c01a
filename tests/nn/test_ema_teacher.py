"""EMATeacher: the decay schedule, the update against a manual EMA, the frozen teacher, `exclude`,
bf16 students, buffers, checkpoint round trips and mismatched students."""

import io

import pytest
import torch
from conftest import TOL, fused_backends
from torch import nn

import d2v2_kernels as dk
from d2v2_kernels.nn import EMATeacher

BACKENDS = ["reference"] + fused_backends()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Dropout(0.5))
        self.norm = nn.BatchNorm1d(8)
        self.decoder = nn.Linear(8, 4)

    def forward(self, x):
        return self.decoder(self.norm(self.encoder(x)))


def perturb(module, seed):
    """A stand-in for an optimizer step: new parameter values and new BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
        module.train()
        module.norm(torch.randn(16, 8, generator=g).to(module.norm.weight.dtype))


def test_copy_is_fp32_eval_and_frozen_for_autograd():
    student = Tiny().to(torch.bfloat16)
    teacher = EMATeacher(student)
    assert isinstance(teacher.module, Tiny) and teacher.module is not student
    for (name, t), (_, s) in zip(teacher.module.named_parameters(), student.named_parameters()):
        assert t.dtype == torch.float32 and not t.requires_grad, name
        assert t.data_ptr() != s.data_ptr()
        assert torch.equal(t, s.float())
    assert torch.equal(teacher.module.norm.running_mean, student.norm.running_mean.float())
    assert not teacher.module.training
    teacher.train()  # a parent's train() leaves the teacher copy in eval mode
    assert not teacher.module.training
    x = torch.randn(3, 4)
    out = teacher(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, teacher.module(x))  # eval mode: no dropout, deterministic


def test_schedule():
    teacher = EMATeacher(Tiny(), decay_start=0.99, decay_end=0.999, anneal_steps=10)
    assert teacher.decay == 0.99
    teacher.num_updates = 5
    assert teacher.decay == pytest.approx(0.9945)
    teacher.num_updates = 10
    assert teacher.decay == 0.999
    teacher.num_updates = 1000
    assert teacher.decay == 0.999
    assert EMATeacher(Tiny(), anneal_steps=0).decay == 0.99999  # no anneal: τe from the start


def test_defaults_are_the_image_base_schedule():
    teacher = EMATeacher(Tiny())
    assert (teacher.decay_start, teacher.decay_end, teacher.anneal_steps) == (0.9998, 0.99999, 100_000)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
def test_step_matches_manual_ema(backend, student_dtype):
    student = Tiny().to(student_dtype)
    teacher = EMATeacher(student, decay_start=0.9, decay_end=0.99, anneal_steps=4)
    expected = {n: p.detach().float().clone() for n, p in student.named_parameters()}
    with dk.use_backend(backend):
        for k in range(6):
            perturb(student, k)
            decay = 0.9 + 0.09 * min(k, 4) / 4
            assert teacher.decay == pytest.approx(decay)
            for n, p in student.named_parameters():
                expected[n] = decay * expected[n] + (1 - decay) * p.detach().float()
            teacher.step(student)
    assert teacher.num_updates == 6
    for n, t in teacher.module.named_parameters():
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, expected[n], **TOL[torch.float32], msg=n)
    # buffers follow the student
    torch.testing.assert_close(teacher.module.norm.running_var, student.norm.running_var.float())


def test_frozen_at_decay_one():
    student = Tiny()
    teacher = EMATeacher(student, decay_start=0.5, decay_end=1.0, anneal_steps=2)
    assert not teacher.frozen
    teacher.step(student)  # decay 0.5
    teacher.step(student)  # decay 0.75
    assert teacher.decay == 1.0 and teacher.frozen
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    perturb(student, 1)
    teacher.step(student)
    teacher.step(student)
    assert teacher.num_updates == 4
    for k, v in teacher.module.state_dict().items():
        assert torch.equal(v, before[k]), k  # parameters and buffers untouched


def test_exclude_copies_instead_of_averaging():
    student = Tiny()
    teacher = EMATeacher(student, decay_start=0.5, decay_end=0.5, anneal_steps=0, exclude=("decoder",))
    encoder_before = teacher.module.encoder[0].weight.clone()
    perturb(student, 3)
    teacher.step(student)
    torch.testing.assert_close(teacher.module.decoder.weight, student.decoder.weight)  # followed, not averaged
    torch.testing.assert_close(teacher.module.encoder[0].weight, 0.5 * encoder_before + 0.5 * student.encoder[0].weight)
    assert EMATeacher(student, exclude="decoder").exclude == ("decoder",)
    with pytest.raises(ValueError, match="exclude: 'dekoder' names no submodule"):
        EMATeacher(student, exclude=("dekoder",))


def test_state_dict_round_trip_resumes_identically(tmp_path):
    torch.manual_seed(1)
    student = Tiny()
    teacher = EMATeacher(student, decay_start=0.9, decay_end=0.99, anneal_steps=10, exclude=("decoder",))
    for k in range(3):
        perturb(student, k)
        teacher.step(student)
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)

    resumed = EMATeacher(Tiny(), decay_start=0.1, decay_end=0.2, anneal_steps=5)  # schedule from the checkpoint
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert resumed.num_updates == 3 and resumed.decay == teacher.decay
    assert (resumed.decay_start, resumed.decay_end, resumed.anneal_steps) == (0.9, 0.99, 10)
    assert resumed.exclude == ("decoder",)
    for k in range(3, 8):
        perturb(student, k)
        teacher.step(student)
        resumed.step(student)
    for (name, a), (_, b) in zip(teacher.state_dict().items(), resumed.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
        else:
            assert a == b, name


def test_state_dict_holds_weights_step_and_schedule():
    teacher = EMATeacher(Tiny())
    teacher.step(Tiny())
    state = teacher.state_dict()
    assert "module.encoder.0.weight" in state and "module.norm.running_mean" in state
    extra = state["_extra_state"]
    assert extra["num_updates"] == 1 and extra["anneal_steps"] == 100_000
    buffer = io.BytesIO()
    torch.save(state, buffer)  # plain Python values: loadable with weights_only
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


def test_mismatched_student_raises():
    teacher = EMATeacher(Tiny())
    other = nn.Sequential(nn.Linear(4, 8))
    with pytest.raises(ValueError, match=r"student_module: its parameters differ .*missing \['decoder.bias'"):
        teacher.step(other)
    wider = Tiny()
    wider.decoder = nn.Linear(8, 5)
    with pytest.raises(ValueError, match=r"student_module: parameter 'decoder.weight' has shape \(5, 8\)"):
        teacher.step(wider)
    assert teacher.num_updates == 0


def test_bad_arguments():
    with pytest.raises(TypeError, match="student_module: expected a torch.nn.Module"):
        EMATeacher(torch.randn(3))
    with pytest.raises(ValueError, match=r"decay_start: expected a float in \[0, 1\]"):
        EMATeacher(Tiny(), decay_start=1.5)
    with pytest.raises(ValueError, match="decay_end: expected a float"):
        EMATeacher(Tiny(), decay_end=float("nan"))
    with pytest.raises(ValueError, match="anneal_steps: expected an int >= 0"):
        EMATeacher(Tiny(), anneal_steps=-1)
    with pytest.raises(TypeError, match="dtype: expected a floating-point torch.dtype"):
        EMATeacher(Tiny(), dtype=torch.int32)

"""GPU correctness that a CPU can check: where optimizer state lives after a resume, and fp16 loss scaling.

The device is abstracted: "meta" stands in for the GPU. It is a real torch device distinct from the CPU, so a
resume that loaded AdamW's moments before moving the model would leave them on the CPU and fail here, just as
it would leave them on the CPU of a GPU worker.
"""

from pathlib import Path

import torch
from tests.unit.test_train_loop import Toy  # a linear toy over batch["image"]: (B, 4) -> (B, 3)
from torch import nn

from mmfusion.train.checkpoint import LoopState, resume, save_checkpoint
from mmfusion.train.loop import build_optimizer, build_scheduler, grad_scaler, train_one_epoch


def _batches(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 4, generator=g)
        out.append({"image": x, "label": x[:, :3].argmax(-1)})
    return out


def _to_meta(m: nn.Module) -> nn.Module:
    """Move to the stand-in device keeping each Parameter object, as `.to("cuda")` does (the optimizer holds
    the Parameter objects); CPU -> meta would otherwise make new ones."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        return m.to(torch.device("meta"))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def _trained_checkpoint(d: Path, precision: str = "fp32") -> torch.amp.GradScaler:
    torch.manual_seed(0)
    model = Toy()
    opt = build_optimizer(model.parameters(), "adamw", 0.01, 0.01)
    sched = build_scheduler(opt, "cosine", total_steps=40)
    scaler = grad_scaler(torch.device("cpu"), precision)
    train_one_epoch(model, _batches(), opt, sched, torch.device("cpu"), precision, scaler=scaler)
    if scaler.is_enabled():
        scaler.update(new_scale=512.0)  # as if overflows had lowered it from the initial 65536
    save_checkpoint(d, model.state_dict(), {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                            "scaler": scaler.state_dict()}, LoopState(epoch=0))
    return scaler


def test_optimizer_state_follows_the_parameters_device_after_resume(tmp_path: Path) -> None:
    _trained_checkpoint(tmp_path)
    model = Toy()
    opt = build_optimizer(model.parameters(), "adamw", 0.01, 0.01)
    sched = build_scheduler(opt, "cosine", total_steps=40)
    target = torch.device("meta")  # stands in for cuda:N
    placed, state = resume(tmp_path, model, opt, sched, None, place=_to_meta)
    assert state.epoch == 0
    assert all(p.device == target for p in placed.parameters())
    moments = [(name, t) for p in placed.parameters() for name, t in opt.state[p].items() if t.ndim > 0]
    assert {name for name, _ in moments} == {"exp_avg", "exp_avg_sq"}
    # AdamW keeps the scalar `step` on the CPU by design (non-capturable); each moment sits with its param
    assert all(t.device == target for _, t in moments), [(n, t.device) for n, t in moments]
    assert sched.last_epoch == 4  # the schedule resumed too (4 steps taken)


def test_resume_restores_weights_before_placement(tmp_path: Path) -> None:
    _trained_checkpoint(tmp_path)
    saved = torch.load(tmp_path / "optim.pt", weights_only=True)
    model = Toy()
    opt = build_optimizer(model.parameters(), "adamw", 0.01, 0.01)
    sched = build_scheduler(opt, "cosine", total_steps=40)
    seen: dict[str, torch.Tensor] = {}

    def place(m: nn.Module) -> nn.Module:
        seen["w"] = m.lin.weight.detach().clone()
        return m

    resume(tmp_path, model, opt, sched, None, place=place)
    torch.manual_seed(0)
    assert not torch.equal(seen["w"], Toy().lin.weight)  # the trained weights, not a fresh init
    assert saved["optimizer"]["state"]  # the checkpoint carried optimizer state


def test_fp16_uses_a_grad_scaler_and_its_scale_resumes(tmp_path: Path) -> None:
    scaler = _trained_checkpoint(tmp_path, precision="fp16")
    assert scaler.is_enabled() and scaler.get_scale() == 512.0
    assert not grad_scaler(torch.device("cpu"), "bf16").is_enabled()
    assert not grad_scaler(torch.device("cpu"), "fp32").is_enabled()
    model = Toy()
    opt = build_optimizer(model.parameters(), "adamw", 0.01, 0.01)
    sched = build_scheduler(opt, "cosine", total_steps=40)
    fresh = grad_scaler(torch.device("cpu"), "fp16")
    resume(tmp_path, model, opt, sched, fresh, place=lambda m: m)
    assert fresh.get_scale() == 512.0  # not the initial 65536


def test_fp16_training_still_learns_and_clips_unscaled_gradients() -> None:
    torch.manual_seed(0)
    model = Toy()
    opt = build_optimizer(model.parameters(), "adamw", 0.05, 0.0)
    cpu = torch.device("cpu")
    scaler = grad_scaler(cpu, "fp16")
    first = train_one_epoch(model, _batches(8), opt, None, cpu, "fp16", grad_clip=1.0, scaler=scaler)
    for _ in range(10):
        last = train_one_epoch(model, _batches(8), opt, None, cpu, "fp16", grad_clip=1.0, scaler=scaler)
    assert last.loss < first.loss and last.accuracy > 0.8

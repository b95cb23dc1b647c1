"""The pure-torch training pieces, on a toy dict-batch model (no Ray)."""

import torch
from torch import nn

from mmfusion.train.checkpoint import LoopState, load_checkpoint, save_checkpoint
from mmfusion.train.loop import build_optimizer, build_scheduler, evaluate, predict_proba, train_one_epoch


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, batch):
        return self.lin(batch["image"])


def _batches(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        out.append({"image": x, "label": x[:, :3].argmax(-1)})
    return out


def test_training_learns_a_separable_toy_problem():
    torch.manual_seed(0)
    model = Toy()
    opt = build_optimizer(model.parameters(), "adamw", 0.05, 0.0)
    sched = build_scheduler(opt, "cosine", total_steps=8 * 20)
    first = evaluate(model, _batches(), torch.device("cpu"))
    for _ in range(20):
        stats = train_one_epoch(model, _batches(), opt, sched, torch.device("cpu"), grad_clip=1.0)
    last = evaluate(model, _batches(seed=1), torch.device("cpu"))
    assert stats.samples == 128
    assert last.loss < first.loss
    assert last.accuracy > 0.9
    probs, labels = predict_proba(model, _batches(2), torch.device("cpu"))
    assert probs.shape == (32, 3) and labels.shape == (32,)
    assert torch.allclose(probs.sum(-1), torch.ones(32))


def test_scheduler_warmup_then_cosine_to_zero():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "cosine", total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.5 and lrs[1] == 1.0
    assert lrs[2] == 1.0 and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))


def test_checkpoint_roundtrip_restores_optimizer_and_progress(tmp_path):
    model = Toy()
    opt = build_optimizer(model.parameters(), "adamw", 0.01, 0.0)
    sched = build_scheduler(opt, "cosine", 100)
    train_one_epoch(model, _batches(2), opt, sched, torch.device("cpu"))
    state = LoopState(epoch=3, best_metric=0.7, best_epoch=2, history=[{"epoch": 0}], starts=[0])
    save_checkpoint(tmp_path, model.state_dict(), {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                    state)
    m, o, s = load_checkpoint(tmp_path)
    model2 = Toy()
    model2.load_state_dict(m)
    opt2 = build_optimizer(model2.parameters(), "adamw", 0.01, 0.0)
    opt2.load_state_dict(o["optimizer"])
    sched2 = build_scheduler(opt2, "cosine", 100)
    sched2.load_state_dict(o["scheduler"])
    assert s == state
    assert sched2.last_epoch == sched.last_epoch
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert LoopState(best_metric=0.5).improved(0.6, "max") and not LoopState(best_metric=0.5).improved(0.6, "min")

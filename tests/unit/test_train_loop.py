"""The pure-torch training pieces, on a toy dict-batch model (no Ray)."""

import pytest
import torch
from torch import nn

from mmfusion.errors import TrainingDivergedError
from mmfusion.train.checkpoint import LoopState, load_checkpoint, save_checkpoint
from mmfusion.train.loop import (
    beats_majority,
    build_optimizer,
    build_scheduler,
    class_weights,
    classification_loss,
    evaluate,
    majority_share,
    param_groups,
    predict_proba,
    train_one_epoch,
)
from mmfusion.train.worker import user_error


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


def test_epoch_stats_time_the_first_step_after_the_first_batch_arrives():
    import time

    def slow_batches():  # the first batch takes a while to arrive, like a data pipeline starting up
        time.sleep(0.05)
        yield from _batches(2)

    model = Toy()
    opt = build_optimizer(model.parameters(), "sgd", 0.01, 0.0)
    before = time.time()
    stats = train_one_epoch(model, slow_batches(), opt, None, torch.device("cpu"))
    assert before + 0.05 <= stats.first_step_at <= time.time()
    assert stats.seconds >= 0.05  # the wait for data is in the epoch's time
    assert train_one_epoch(model, [], opt, None, torch.device("cpu")).first_step_at is None


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
    save_checkpoint(tmp_path, model.state_dict(),
                    {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, state)
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
    assert (LoopState(best_metric=0.5).improved(0.6, "max")
            and not LoopState(best_metric=0.5).improved(0.6, "min"))


# ------------------------------------------------------------------------- runs that cannot fail silently


class NanAfter(nn.Module):
    """Toy whose logits turn NaN from the `bad_step`-th call on (a model that diverged)."""

    def __init__(self, bad_step: int):
        super().__init__()
        self.lin, self.calls, self.bad_step = nn.Linear(4, 3), 0, bad_step

    def forward(self, batch):
        self.calls += 1
        out = self.lin(batch["image"])
        return out * float("nan") if self.calls >= self.bad_step else out


def test_nan_loss_stops_the_run_naming_epoch_and_step():
    model = NanAfter(bad_step=3)
    opt = build_optimizer(model.parameters(), "adamw", 0.01, 0.0)
    before = model.lin.weight.detach().clone()
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at epoch 5, step 3 .*lower optim.lr"):
        train_one_epoch(model, _batches(4), opt, None, torch.device("cpu"), epoch=4)
    # the two good steps were taken, the bad one was not
    assert torch.isfinite(model.lin.weight).all() and not torch.equal(model.lin.weight, before)


def test_nan_input_is_named_in_the_error():
    batches = _batches(2)
    batches[1]["image"][0, 1] = float("nan")
    model = Toy()
    opt = build_optimizer(model.parameters(), "adamw", 0.01, 0.0)
    with pytest.raises(TrainingDivergedError, match=r"epoch 1, step 2 .*non-finite values in image"):
        train_one_epoch(model, batches, opt, None, torch.device("cpu"))


def test_user_error_is_unwrapped_from_ray_trains_failure():
    from ray.train import WorkerGroupError

    from mmfusion.errors import DecodeError, MmfusionError

    cause = TrainingDivergedError("the training loss became nan at epoch 2, step 7")
    err = user_error(WorkerGroupError("boom", {1: ValueError("x"), 0: cause}), "training run r failed")
    assert type(err) is TrainingDivergedError
    assert str(err) == "training run r failed: the training loss became nan at epoch 2, step 7"
    err = user_error(WorkerGroupError("boom", {0: DecodeError("image", "bad bytes")}), "run r")
    assert type(err) is MmfusionError and str(err) == "run r: image: bad bytes"
    assert user_error(WorkerGroupError("boom", {0: ValueError("x")}), "run r") is None


def test_balanced_class_weights_change_the_loss_as_computed_by_hand():
    counts = [6, 3, 1]  # n = 10, K = 3: weights n / (K * count) = 10/18, 10/9, 10/3
    w = class_weights(counts, "balanced")
    assert w.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert class_weights(counts, "none") is None
    assert class_weights([4, 0, 4], "balanced").tolist() == pytest.approx([1.0, 0.0, 1.0])  # K = 2 present
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 2, 1, 0])
    nll = -torch.log_softmax(logits, dim=-1)[torch.arange(4), labels]  # per-row cross-entropy
    plain = float(nll.mean())
    by_hand = float((w[labels] * nll).sum() / w[labels].sum())  # the weighted mean F.cross_entropy takes
    assert float(classification_loss(logits, labels)) == pytest.approx(plain)
    assert float(classification_loss(logits, labels, w)) == pytest.approx(by_hand)
    assert by_hand != pytest.approx(plain)


def test_label_smoothing_changes_the_loss_as_computed_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    logp = torch.log_softmax(logits, dim=-1)
    eps = 0.1  # target: (1 - eps) on the label plus eps / K on every class
    by_hand = float(((1 - eps) * -logp[torch.arange(2), labels] + eps * -logp.mean(dim=-1)).mean())
    assert float(classification_loss(logits, labels, label_smoothing=eps)) == pytest.approx(by_hand)


class Constant(nn.Module):
    """Ignores its input: learned logits shared by every row (can only learn the class prior)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, batch):
        return self.bias.expand(batch["image"].shape[0], -1)


def test_majority_class_detection_flags_a_constant_predictor():
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(8):  # 60% class 0: a constant predictor scores about 0.6
        x = torch.randn(20, 4, generator=g)
        batches.append({"image": x, "label": torch.tensor([0] * 12 + [1] * 5 + [2] * 3)})
    counts = [96, 40, 24]
    share = majority_share(counts)
    assert share == pytest.approx(0.6)
    model = Constant()
    opt = build_optimizer(model.parameters(), "adamw", 0.1, 0.0)
    accs = [train_one_epoch(model, batches, opt, None, torch.device("cpu")).accuracy for _ in range(5)]
    assert max(accs) == pytest.approx(0.6)  # it found the majority class, and nothing more
    assert not beats_majority(accs, share)
    assert beats_majority([0.5, 0.7], share) and not beats_majority([0.61], share)  # 0.02 margin


def test_epoch_stats_report_macro_f1_and_balanced_accuracy():
    model = Constant()
    with torch.no_grad():
        model.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # always class 0
    batches = [{"image": torch.zeros(4, 4), "label": torch.tensor([0, 0, 1, 2])}]
    va = evaluate(model, batches, torch.device("cpu"), num_classes=3)
    assert va.accuracy == 0.5
    assert va.confusion.tolist() == [[2, 0, 0], [1, 0, 0], [1, 0, 0]]
    assert va.balanced_accuracy == pytest.approx(1 / 3)  # recall 1, 0, 0
    assert va.macro_f1 == pytest.approx((2 / 3) / 3)  # class 0: p=0.5, r=1 -> f1 2/3
    assert evaluate(model, batches, torch.device("cpu")).confusion is None


def test_param_groups_give_encoders_their_own_lr_and_no_decay_to_norms():
    image = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    encoders = nn.ModuleDict({"image": image, "text": nn.Linear(4, 4)})
    model = nn.ModuleDict({"encoders": encoders, "head": nn.Linear(4, 2)})
    model["encoders"]["text"].weight.requires_grad_(False)  # frozen parameters are left out
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, encoder_lr={"image": 1e-4})
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    enc = model["encoders"]
    assert by_id[id(enc["image"][0].weight)] == (1e-4, 0.1)
    assert by_id[id(enc["image"][1].weight)] == (1e-4, 0.0)  # a LayerNorm scale is not decayed
    assert by_id[id(enc["text"].bias)] == (1e-3, 0.0)  # text is not listed: lr
    assert by_id[id(model["head"].weight)] == (1e-3, 0.1)
    assert id(enc["text"].weight) not in by_id
    assert {g["lr"] for g in param_groups(model, 1e-3, 0.1, 3e-4)} == {3e-4, 1e-3}
    opt = build_optimizer(groups, "adamw", 1e-3, 0.1)
    assert sorted(g["lr"] for g in opt.param_groups) == sorted(g["lr"] for g in groups)


def test_on_step_sees_every_optimizer_step_with_its_loss():
    torch.manual_seed(0)
    model = Toy()
    opt = build_optimizer(model.parameters(), "adamw", 0.05, 0.0)
    seen: list[tuple[int, float]] = []
    stats = train_one_epoch(model, _batches(5), opt, None, torch.device("cpu"),
                            on_step=lambda step, loss: seen.append((step, loss)))
    assert [s for s, _ in seen] == [0, 1, 2, 3, 4]
    assert sum(loss for _, loss in seen) / 5 == pytest.approx(stats.loss)  # equal batches: the epoch mean

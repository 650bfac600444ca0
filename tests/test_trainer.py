"""Trainer.train_step switches: non-finite steps are skipped exactly (fused and unfused AdamW),
fused == unfused numerically, gradient checkpointing gives the same gradients, bf16 KD teacher."""

import pytest
import torch

from models import build_model, set_grad_checkpointing
from models.layer_mask import LayerMask, attach_layer_mask
from tinyfusion.families.dit import DiffusionObjective
from tinyfusion.kd import MaskedKDObjective
from tinyfusion.logging import RunLogger
from tinyfusion.runtime import Runtime
from tinyfusion.trainer import TrainConfig, Trainer

SHAPE = (4, 4, 4)


def trainer_for(model, objective, tmp_path, **overrides):
    config = TrainConfig(**{**dict(global_batch_size=4, max_steps=100, results_dir=str(tmp_path), num_workers=0,
                                   ema_decay=0.9, lr=1e-2), **overrides})
    return Trainer(Runtime(), model, objective, range(4), config, logger=RunLogger(None, is_main=False))


class PoisonedObjective(DiffusionObjective):
    """The diffusion loss, made NaN on the steps listed in `poison`."""

    def __init__(self, shape, poison=()):
        super().__init__(shape)
        self.poison = set(poison)

    def loss(self, model, x, y, draws, step):
        per_sample, logs = super().loss(model, x, y, draws, step)
        return (per_sample * float("nan") if step in self.poison else per_sample), logs


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    return build_model("DiT-Tiny-D4/2", input_size=4, num_classes=4)


def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, *SHAPE, generator=g), torch.randint(0, 4, (4,), generator=g)


def state(trainer):
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()},
            {k: v.clone() for k, v in trainer.ema.state_dict().items()})


@pytest.mark.parametrize("fused", [True, False])
def test_a_nan_step_changes_nothing_and_is_counted(tmp_path, fused):
    x, y = batch()
    # Run A: a clean step 0, a poisoned step 1, then step 2. Run B: the same without the poisoned step.
    a = trainer_for(tiny_dit(), PoisonedObjective(SHAPE, poison={1}), tmp_path / "a", fused_adamw=fused)
    b = trainer_for(tiny_dit(), PoisonedObjective(SHAPE), tmp_path / "b", fused_adamw=fused)
    a.train_step(x, y)
    before = state(a)
    loss, _ = a.train_step(x, y)
    assert torch.isnan(loss) and int(a.skipped) == 1
    for was, now in zip(before, state(a)):
        for k in was:
            assert torch.equal(was[k], now[k]), k
    steps = {int(s["step"]) for s in a.opt.state.values()}
    assert steps == {1}, f"the optimizer's step count advanced on a skipped step: {steps}"
    b.train_step(x, y)
    # step 2 of A uses step 2's draws; give B the same step index so both draw identically
    b.step = 2
    a.train_step(x, y)
    b.train_step(x, y)
    for ours, ref in zip(state(a), state(b)):
        for k in ours:
            assert torch.equal(ours[k], ref[k]), k
    assert a.checkpoint_dict()["skipped_steps"] == 1


def test_fused_and_unfused_adamw_agree(tmp_path):
    x, y = batch()
    runs = []
    for fused in (True, False):
        t = trainer_for(tiny_dit(), DiffusionObjective(SHAPE), tmp_path / str(fused), fused_adamw=fused, grad_clip=1.0,
                        weight_decay=0.01)
        # One step: identical gradients, so only the kernels' arithmetic may differ. (Over several steps
        # Adam's g/sqrt(v) turns rounding-level gradient differences of near-zero entries into +-lr.)
        t.train_step(x, y)
        runs.append((t.model.state_dict(), t.ema.state_dict()))
    for ours, ref in zip(*runs):
        for k in ours:
            torch.testing.assert_close(ours[k], ref[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("name", ["DiT-Tiny-D4/2", "SiT-Tiny-D4/2"])
def test_grad_checkpointing_gives_the_same_gradients(name):
    """Masked blocks (Gumbel masks drawn once per pass) must recompute with the same masks."""
    grads, counts = [], []
    for on in (False, True):
        torch.manual_seed(0)
        model = build_model(name, input_size=4, num_classes=4).train()
        for p in model.parameters():  # leave the adaLN-zero init, or most gradients are exactly zero
            p.data.add_(0.05 * torch.randn_like(p))
        attach_layer_mask(model, LayerMask([(1, 2), (1, 2)]))
        model.layer_mask.generator = torch.Generator().manual_seed(7)
        if on:
            set_grad_checkpointing(model)
        x, t, y = torch.randn(3, *SHAPE), torch.rand(3) * (999 if name.startswith("DiT") else 1), torch.tensor([0, 1, 2])
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = model(x, t, y)
        out.square().mean().backward()
        counts.append(len(saved))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert counts[1] < counts[0] / 2, counts  # checkpointing really ran: far fewer tensors kept for backward
    assert grads[0].keys() == grads[1].keys() and any("layer_mask" in k for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_grad_checkpointing_flag_reaches_the_model(tmp_path):
    t = trainer_for(tiny_dit(), DiffusionObjective(SHAPE), tmp_path,
                    grad_checkpointing=True)
    assert t.model.grad_checkpointing and not t.ema.model.training
    t.train_step(*batch())
    with pytest.raises(ValueError, match="no gradient checkpointing"):
        set_grad_checkpointing(torch.nn.Linear(2, 2))


def test_bf16_teacher_runs_in_inference_mode_and_stays_close(tmp_path):
    student, teacher = tiny_dit(0), tiny_dit(1)
    for p in teacher.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, y = batch()
    logs = {}
    for dtype in (None, torch.bfloat16):
        t = teacher if dtype is None else tiny_dit(1).requires_grad_(False)
        if dtype is not None:
            t.load_state_dict(teacher.state_dict())
        obj = MaskedKDObjective(DiffusionObjective(SHAPE), student, t, [(1, 1), (3, 3)], teacher_dtype=dtype)
        draws = obj.draw(4, torch.Generator().manual_seed(1))
        total, logs[dtype] = obj.loss(student, x, y, draws, 0)
        total.mean().backward()  # inference-mode teacher tensors must never be saved for backward
        assert next(t.parameters()).dtype == (dtype or torch.float32)
    for key in ("kd", "rep"):
        torch.testing.assert_close(logs[torch.bfloat16][key], logs[None][key], rtol=2e-2, atol=1e-4, msg=key)


def test_config_takes_every_training_flag_of_the_scripts():
    import train
    parser = train.build_parser()
    args = parser.parse_args(["--data-path", "d", "--max-steps", "7", "--lr", "3e-3", "--no-fused-adamw", "--resume",
                              "auto", "--grad-checkpointing", "--model", "SiT-S/2"])
    config = TrainConfig.from_args(args)
    loop_flags = {a.dest for g in parser._action_groups if g.title == "training loop" for a in g._group_actions}
    fields = set(vars(config))
    assert loop_flags - fields == {"prefix", "tf32", "device"}  # script-level: the run folder and the runtime
    assert all(getattr(config, k) == getattr(args, k) for k in loop_flags & fields)
    assert (config.max_steps, config.lr, config.fused_adamw, config.grad_checkpointing) == (7, 3e-3, False, True)
    assert config.model_name == "SiT-S/2" and config.record == vars(args)  # checkpoints keep every flag


def test_checkpoints_store_the_scripts_flags_as_before(tmp_path):
    from types import SimpleNamespace
    args = SimpleNamespace(global_batch_size=4, max_steps=1, results_dir=str(tmp_path), num_workers=0,
                           model="DiT-Tiny-D4/2", data_path="somewhere", ckpt_every=1)
    trainer = Trainer(Runtime(), tiny_dit(), DiffusionObjective(SHAPE), range(4),
                      TrainConfig.from_args(args), logger=RunLogger(None, is_main=False))
    assert trainer.checkpoint_dict()["args"] == vars(args)
    direct = trainer_for(tiny_dit(), DiffusionObjective(SHAPE), tmp_path)
    assert direct.checkpoint_dict()["args"]["global_batch_size"] == 4 and "record" not in direct.checkpoint_dict()["args"]

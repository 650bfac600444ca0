"""The one training loop, used by train.py, train_masked_kd.py and prune_by_learning.py.

What makes resume exact (bit-identical weights after a SIGKILL and --resume on CPU):
- the data order is a pure function of (seed, epoch): each step reads global batch
  `step` of a seeded permutation, and the flip of each item is drawn with it;
- all randomness of a step comes from generators seeded by (seed, step): the objective's
  draws (t, noise, label drops) are made for the *global* batch and sliced per rank, so
  1 process with batch 2B sees the same numbers as 2 processes with batch B each;
- model, EMA, optimizer, scheduler, grad scaler and objective state are saved together,
  atomically, and restored before the next step.

What keeps the step free of host-device syncs (with fused AdamW, the CUDA default): a non-finite loss
or gradient norm is turned into the optimizer's `found_inf` flag and a zero EMA weight on the
device, so the step is skipped without Python ever reading a GPU value; the loss is accumulated
on the device and read once per --log-every steps.
"""
import argparse
import glob
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from core.errors import UserError
from models import set_grad_checkpointing
from .checkpoint import check_state_dict, load_checkpoint, remove_stale_temporaries, save_checkpoint, save_weights
from .ema import EMA
from .logging import RunLogger
from .outputs import check_output_dir, check_output_file


@dataclass
class TrainConfig:
    """Everything the training loop reads. Scripts build it from their flags (`TrainConfig.from_args`);
    code and tests may build it directly: TrainConfig(global_batch_size=4, max_steps=10, results_dir=...)."""
    results_dir: str = "results"
    global_batch_size: int = 256
    epochs: int = 1400                  # used only when max_steps is None
    max_steps: Optional[int] = None     # total optimizer steps
    lr: float = 1e-4
    lr_schedule: str = "constant"       # constant, cosine or linear (lr_factor)
    lr_min: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 0.0              # 0 disables
    ema_decay: float = 0.9999
    precision: str = "fp32"             # fp32, bf16 or fp16 (fp16 trains in fp32 off CUDA)
    global_seed: int = 0
    num_workers: int = 4
    log_every: int = 100
    ckpt_every: int = 50_000
    keep_last: int = 0                  # 0 keeps every checkpoint
    resume: Optional[str] = None        # a checkpoint path, or "auto"
    max_nonfinite_steps: int = 100      # 0 never stops
    compile: bool = False
    grad_checkpointing: bool = False
    fused_adamw: Optional[bool] = None  # None: on with CUDA
    model_name: str = ""                # for messages
    record: dict = field(default_factory=dict)  # stored in checkpoints as 'args' (scripts: all their flags)

    @classmethod
    def from_args(cls, args):
        """The config of a training script's argparse namespace (add_train_args' flags; --model names the model);
        the whole namespace is kept as `record`, the checkpoints' 'args' (as before the config existed)."""
        names = {f.name for f in fields(cls)} - {"model_name", "record"}
        return cls(**{k: getattr(args, k) for k in names if hasattr(args, k)}, model_name=getattr(args, "model", ""),
                   record={k: v for k, v in vars(args).items() if _plain(v)})

    def checkpoint_args(self):
        return self.record or {k: v for k, v in asdict(self).items() if k != "record" and _plain(v)}


def add_train_args(parser, lr=1e-4, ema_decay=0.9999, grad_clip=0.0, precision="fp32"):
    """Flags shared by every training script (defaults per script via the arguments, else TrainConfig's)."""
    d = TrainConfig()
    g = parser.add_argument_group("training loop")
    g.add_argument("--results-dir", type=str, default=d.results_dir)
    g.add_argument("--prefix", type=str, default=None, help="experiment folder name inside --results-dir")
    g.add_argument("--global-batch-size", type=int, default=d.global_batch_size)
    g.add_argument("--epochs", type=int, default=d.epochs, help="used only when --max-steps is not given")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="total optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default=d.lr_schedule)
    g.add_argument("--lr-min", type=float, default=d.lr_min, help="final lr of the cosine/linear schedule")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--grad-clip", type=float, default=grad_clip, help="max global grad norm; 0 disables")
    g.add_argument("--ema-decay", type=float, default=ema_decay)
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=precision,
                   help="autocast dtype; fp16 adds a grad scaler and runs in fp32 on CPU")
    g.add_argument("--global-seed", type=int, default=d.global_seed)
    g.add_argument("--num-workers", type=int, default=d.num_workers)
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    g.add_argument("--keep-last", type=int, default=d.keep_last, help="keep only the last K checkpoints (0 keeps all)")
    g.add_argument("--resume", type=str, default=d.resume, help="a checkpoint path, or 'auto' for the latest one")
    g.add_argument("--max-nonfinite-steps", type=int, default=d.max_nonfinite_steps,
                   help="stop with an error after this many consecutive non-finite (skipped) steps, checked at "
                        "each log and checkpoint step; 0 never stops")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass: far less memory, ~1/3 more time")
    g.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=d.fused_adamw,
                   help="fused AdamW kernel, which also lets a non-finite step be skipped without a host-device "
                        "sync (default: on with CUDA; off on CPU, where there is no sync to save and the foreach "
                        "kernel keeps CPU runs bit-identical to earlier releases)")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="CUDA: TF32 matmuls and convs")
    g.add_argument("--device", type=str, default=None, help="cpu or cuda (default: cuda if available)")
    return g


def step_seed(seed, step, rank=-1):
    """A distinct, reproducible seed for each (seed, step, rank); rank -1 = shared by all ranks."""
    return (seed * 1_000_003 + step * 4099 + rank + 1) % (2**63 - 1)


def to_device(batch_part, device):
    """A tensor, or a dict of tensors (text conditioning: prompt embeddings, masks), moved to `device`."""
    if isinstance(batch_part, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch_part.items()}
    return batch_part.to(device, non_blocking=True)


class GlobalBatchSampler:
    """Yields this rank's slice of global batch `step` from `start_step` on.

    Keys are (index, flip, sample_seed): the flip and the seed of a stochastic store's posterior
    sample are drawn here, with the order, so that they too are reproducible on resume.
    """

    def __init__(self, num_items, global_batch, rank, world_size, seed, start_step=0, flip=True):
        if num_items < global_batch:
            raise UserError(f"the dataset has {num_items} items, fewer than --global-batch-size {global_batch}: "
                            f"lower the batch size")
        self.n, self.gb, self.rank, self.world, self.seed = num_items, global_batch, rank, world_size, seed
        self.start, self.flip = start_step, flip
        self.per_epoch = num_items // global_batch  # drop_last, like the reference

    def epoch_order(self, epoch):
        g = torch.Generator().manual_seed(step_seed(self.seed, epoch, rank=-7))
        perm = torch.randperm(self.n, generator=g)
        flips = torch.randint(0, 2, (self.n,), generator=g) if self.flip else torch.zeros(self.n, dtype=torch.long)
        return perm, flips

    def __iter__(self):
        step, per = self.start, self.gb // self.world
        epoch, order = None, None
        while True:
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                order = self.epoch_order(epoch)
            lo = (step % self.per_epoch) * self.gb + self.rank * per
            seed0 = step_seed(self.seed, step, rank=-3) % (2**31) + lo
            yield [(int(i), int(f), seed0 + j) for j, (i, f) in enumerate(zip(order[0][lo:lo + per],
                                                                              order[1][lo:lo + per]))]
            step += 1


def lr_factor(step, total, schedule, warmup, lr, lr_min):
    """Multiplier of the base lr at `step`, defined in steps (independent of batch size and epochs)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = lr_min / lr if lr > 0 else 0.0
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


class Trainer:
    """Runs `objective` on `model` over `dataset` for `total_steps` optimizer steps, as `config` (TrainConfig) says.

    The objective provides `draw(n, generator) -> dict` (randomness for a global batch),
    `loss(model, x, y, draws, step) -> (per-sample loss, {name: scalar tensor})`, and
    optionally `begin_step(step, total)`, `log_line()`, `state_dict()`/`load_state_dict()`.
    """

    def __init__(self, runtime, model, objective, dataset, config, param_groups=None, results_dir=None,
                 ddp_find_unused=False, logger=None):
        self.rt, self.config, self.objective, self.dataset = runtime, config, objective, dataset
        self.model = model.to(runtime.device)
        self.results_dir = results_dir or config.results_dir
        self.ckpt_dir = os.path.join(self.results_dir, "checkpoints")
        self.per_rank = runtime.per_rank(config.global_batch_size)
        steps_per_epoch = len(dataset) // config.global_batch_size
        self.total_steps = config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch
        if self.total_steps <= 0:
            raise UserError("nothing to train: set --max-steps or --epochs to a positive number")
        self.ema = EMA(self.model, config.ema_decay)
        groups = param_groups or [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        for g in groups:
            g.setdefault("lr", config.lr)
            g["base_lr"] = g["lr"]
        self.fused = runtime.device.type == "cuda" if config.fused_adamw is None else config.fused_adamw
        self.opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=self.fused)
        # fp16 autocast is not usable on CPU: there the fp16 default (the official recipe) trains in fp32.
        self.precision = "fp32" if config.precision == "fp16" and runtime.device.type != "cuda" else config.precision
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=self.precision == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.step = 0
        self.skipped = torch.zeros((), dtype=torch.long, device=runtime.device)  # read only when logged/saved
        self.nonfinite_run = torch.zeros((), dtype=torch.long, device=runtime.device)  # consecutive, likewise
        if config.grad_checkpointing:
            set_grad_checkpointing(self.model, True)
        self.logger = logger or RunLogger(self.results_dir, runtime.is_main)
        if runtime.is_main:
            remove_stale_temporaries(self.ckpt_dir)  # left by a write that was killed
        if self.precision != config.precision:
            self.logger.info(f"--precision fp16 needs CUDA: training in fp32 on {runtime.device.type}")
        net = DDP(self.model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                  find_unused_parameters=ddp_find_unused) if runtime.distributed else self.model
        self.net = torch.compile(net) if config.compile else net
        if config.resume:
            self.restore(config.resume)

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint_dict(self):
        extra = self.objective.state_dict() if hasattr(self.objective, "state_dict") else {}
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "train_steps": self.step, "skipped_steps": int(self.skipped),
                "nonfinite_run": int(self.nonfinite_run),
                "objective": extra, "args": self.config.checkpoint_args()}

    def save(self):
        self.check_nonfinite()
        if self.rt.is_main:
            path = os.path.join(self.ckpt_dir, f"{self.step:07d}.pt")
            save_checkpoint(self.checkpoint_dict(), path)
            self.logger.info(f"saved checkpoint {path}")
            remove_stale_temporaries(self.ckpt_dir)
            ckpts = sorted(glob.glob(os.path.join(self.ckpt_dir, "[0-9]*.pt")))
            if self.config.keep_last > 0:
                for old in ckpts[:-self.config.keep_last]:
                    os.remove(old)
        self.rt.barrier()

    def restore(self, path):
        if path == "auto":
            found = sorted(glob.glob(os.path.join(self.ckpt_dir, "[0-9]*.pt")))
            if not found:
                self.logger.info(f"--resume auto: no checkpoint in {self.ckpt_dir}, starting from step 0")
                return
            path = found[-1]
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or "opt" not in ckpt or "train_steps" not in ckpt:
            raise UserError(f"--resume {path} is not a training checkpoint of this code (needs model/ema/opt/"
                            f"train_steps); to start from its weights use --load-weight instead")
        check_state_dict(self.model, ckpt["model"], self.config.model_name or type(self.model).__name__, path)
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["opt"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = ckpt["train_steps"]
        self.skipped.fill_(ckpt.get("skipped_steps", 0))
        self.nonfinite_run.fill_(ckpt.get("nonfinite_run", 0))
        if hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(ckpt.get("objective", {}))
        self.logger.info(f"resumed from {path} at step {self.step}")

    # ---- the loop ----------------------------------------------------------------------------
    def loader(self):
        sampler = GlobalBatchSampler(len(self.dataset), self.config.global_batch_size, self.rt.rank,
                                     self.rt.world_size, self.config.global_seed, start_step=self.step,
                                     flip=getattr(self.dataset, "has_flips", False))
        workers = self.config.num_workers
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=workers,
                                           pin_memory=self.rt.device.type == "cuda",
                                           persistent_workers=workers > 0, prefetch_factor=4 if workers else None)

    def set_lr(self):
        c = self.config
        f = lr_factor(self.step, self.total_steps, c.lr_schedule, c.warmup_steps, c.lr, c.lr_min)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f

    def train_step(self, x, y):
        c, rt = self.config, self.rt
        torch.manual_seed(step_seed(c.global_seed, self.step, rt.rank))  # dropout etc. inside the model
        gen = torch.Generator().manual_seed(step_seed(c.global_seed, self.step))
        draws = self.objective.draw(c.global_batch_size, gen)
        lo = rt.rank * self.per_rank
        draws = {k: v[lo:lo + self.per_rank].to(rt.device, non_blocking=True) for k, v in draws.items()}
        if hasattr(self.objective, "begin_step"):
            self.objective.begin_step(self.step, self.total_steps)
        self.set_lr()
        with torch.autocast(rt.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            per_sample, logs = self.objective.loss(self.net, x, y, draws, self.step)
            loss = per_sample.mean()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        params = [p for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        if c.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        self.skipped += ~finite  # a non-finite step is skipped and counted, never applied
        self.nonfinite_run.mul_(~finite).add_(~finite)  # back to 0 on a finite step, on the device (no sync)
        if self.fused and not self.scaler.is_enabled():
            # The fused kernel skips the update (and its step count) where found_inf is set: no sync.
            self.opt.found_inf, self.opt.grad_scale = (~finite).float(), None
            self.opt.step()
            del self.opt.found_inf, self.opt.grad_scale
            self.ema.update(weight=finite)
        elif self.scaler.is_enabled():  # fp16: the scaler skips steps with non-finite gradients itself
            self.scaler.step(self.opt)
            self.ema.update(weight=finite)
        elif bool(finite):  # unfused optimizer: the only host-device sync of the step
            self.opt.step()
            self.ema.update()
        self.scaler.update()
        self.step += 1
        return loss.detach(), logs

    def fit(self):
        c, rt = self.config, self.rt
        self.logger.info(f"training {self.total_steps} steps from step {self.step}, global batch "
                         f"{c.global_batch_size}, {rt.world_size} process(es) on {rt.device}")
        self.model.train()
        running, count, t0 = torch.zeros((), device=rt.device), 0, time.time()
        if self.step >= self.total_steps:
            return self
        for _, batch in zip(range(self.step, self.total_steps), self.loader()):
            x, y = (to_device(t, rt.device) for t in batch)
            loss, logs = self.train_step(x, y)
            running += loss
            count += 1
            if self.step % c.log_every == 0 or self.step == self.total_steps:
                self.log(running / count, count, time.time() - t0, logs)
                running, count, t0 = torch.zeros((), device=rt.device), 0, time.time()
            if self.step % c.ckpt_every == 0 or self.step == self.total_steps:
                self.save()
        return self

    def check_nonfinite(self):
        """Stop with one line once --max-nonfinite-steps consecutive steps were skipped (data or lr gone bad)."""
        limit = self.config.max_nonfinite_steps
        run = int(self.nonfinite_run)
        if limit and run >= limit:
            raise UserError(f"the last {run} steps (up to step {self.step}) all had a non-finite loss or gradient "
                            f"and were skipped: check the data (NaN/inf latents) and lower --lr; the weights were "
                            f"not changed by them (--max-nonfinite-steps {limit} sets this limit)")

    def check_progress(self):
        """Refuse to write a final model when no step of the run was ever applied."""
        applied = self.step - int(self.skipped)
        if applied <= 0:
            raise UserError(f"no training step was applied ({self.step} steps, all skipped as non-finite): not "
                            f"writing a final model that would equal the initial weights; check the data and --lr")

    def finish(self, save_model=None, save=None):
        """After fit(): optionally write the EMA model with `save(model, path)` (default: the official plain state
        dict), then leave the process group."""
        if save_model:
            self.check_progress()
        if save_model and self.rt.is_main:
            if save is None:
                save_weights(self.ema.state_dict(), save_model)
            else:
                save(self.ema.model, save_model)
            self.logger.info(f"saved EMA weights to {os.path.abspath(save_model)}")
        self.rt.shutdown()

    def log(self, mean_loss, steps, seconds, logs):
        self.check_nonfinite()
        mean_loss = self.rt.all_reduce_mean(mean_loss).item()
        sps = steps / max(seconds, 1e-9)
        values = {"loss": mean_loss, "steps_per_sec": sps, "images_per_sec": sps * self.config.global_batch_size,
                  "lr": self.opt.param_groups[0]["lr"], "skipped_steps": int(self.skipped)}
        values.update({k: float(v) for k, v in logs.items()})
        self.logger.scalars(self.step, values)
        extra = self.objective.log_line() if hasattr(self.objective, "log_line") else ""
        skipped = f", skipped {values['skipped_steps']}" if values["skipped_steps"] else ""
        self.logger.info(f"(step={self.step:07d}) loss {mean_loss:.4f}, {sps:.2f} steps/s, "
                         f"{values['images_per_sec']:.1f} img/s, lr {values['lr']:.2e}{skipped}"
                         + (f" | {extra}" if extra else ""))


def _plain(v):
    return isinstance(v, (int, float, str, bool, type(None), list, tuple))


def check_train_outputs(args):
    """Before any work: --results-dir and --save-model (when the script has it) must be writable."""
    check_output_dir(args.results_dir, "--results-dir")
    check_output_file(getattr(args, "save_model", None), "--save-model")


def _decided_on_main_rank(fn, *args):
    """fn(*args) on rank 0, its result (or its UserError) shared with every rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return fn(*args)
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn(*args)
        except UserError as e:
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], UserError):
        raise box[0]
    return box[0]


def _claim(path, resume):
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.mkdir(path)  # atomic: of two runs that race for one folder, exactly one gets it
    except FileExistsError:
        if not (resume and os.path.isdir(path)):
            raise UserError(f"run folder {path} already exists (an earlier or concurrent run): continue it with "
                            f"--resume auto, or pick another --prefix") from None
    except OSError as e:
        raise UserError(f"cannot create run folder {path} ({e.strerror}): pick a writable --results-dir") from None
    _hold_lock(path)
    return path


_HELD_LOCKS = {}  # run folder -> open lock file, held until the process exits


def _hold_lock(path):
    """An advisory lock on <run>/.lock for the life of this process: a second live process (e.g. a requeued job
    whose first copy still runs) cannot --resume into the same folder. The OS drops it when a process dies."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: the exclusive folder creation still separates new runs
        return
    key = os.path.realpath(path)
    if key in _HELD_LOCKS:
        return
    f = open(os.path.join(path, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(f"run folder {path} is in use by another running process: wait for it to end (or stop it) "
                        f"before resuming, or pick another --prefix") from None
    _HELD_LOCKS[key] = f


def claim_run_dir(path, resume=None):
    """Create run folder `path` exclusively; an existing one is reused only with --resume."""
    return _decided_on_main_rank(_claim, path, resume)


def _claim_numbered(results_dir, model_name):
    os.makedirs(results_dir, exist_ok=True)
    index = len(glob.glob(os.path.join(glob.escape(results_dir), "*")))
    while True:  # the reference counts entries; a taken number (deleted runs, a concurrent start) moves on
        path = os.path.join(results_dir, f"{index:03d}-{model_name.replace('/', '-')}")
        try:
            os.mkdir(path)
        except FileExistsError:
            index += 1
            continue
        _hold_lock(path)
        return path


def experiment_dir(args, model_name):
    """results/<prefix> or results/<NNN>-<model> (the reference's naming), claimed for this run."""
    if args.prefix:
        return claim_run_dir(os.path.join(args.results_dir, args.prefix), args.resume)
    if args.resume == "auto":
        raise UserError("--resume auto needs --prefix NAME to know which experiment folder to continue")
    return _decided_on_main_rank(_claim_numbered, args.results_dir, model_name)


"""Learn which layers to remove (TinyFusion): N:M Gumbel-softmax layer masks co-optimised with LoRA.

    torchrun --nnodes=1 --nproc_per_node=8 prune_by_learning.py --model DiT-XL-1-2 \
        --load-weight pretrained/DiT-XL-2-256x256.pt --data-path data/imagenet_encoded \
        --epochs 1 --global-batch-size 128 --delta-w --lora --save-model outputs/pruned/DiT-D14-Learned.pt

--model is a preset (DiT-XL-1-2, DiT-XL-2-4, DiT-XL-7-14, DiT-XL-1-4, DiT-D14-1-2, DiT-D14-2-4, the
same for SiT, MAR-L-1-2) or a registry model with --groups, e.g. --model DiT-XL/2
--groups "[[2,4],[2,4],[3,4],[2,4],[3,4],[2,4],[2,4]]" (16 layers). The output holds the ORIGINAL
weights of the kept blocks, renumbered, plus a JSON record of the decision.
"""
import argparse
import os

from core.errors import UserError
from models.layer_mask import is_preset, parse_groups, resolve_preset
from tinyfusion.checkpoint import read_weights
from tinyfusion.cli import add_model_args, add_transport_args, create_model, open_training_data
from tinyfusion.errors import run_main
from tinyfusion.families import family_for
from tinyfusion.mask_learning import GATE_ESTIMATORS, MaskLearningObjective, plot_decisions, prepare_mask_learning
from tinyfusion.pruning import pruned_summary, write_pruned
from tinyfusion.runtime import seed_everything, setup_runtime
from tinyfusion.trainer import TrainConfig, Trainer, add_train_args, check_train_outputs, claim_run_dir


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, model="DiT-XL-1-2")
    add_train_args(parser, lr=1e-4, ema_decay=0.999, grad_clip=1.0)
    add_transport_args(parser)
    parser.set_defaults(epochs=1, global_batch_size=128, precision="bf16", ckpt_every=10_000,
                        results_dir="outputs", prefix="learn_mask")
    g = parser.add_argument_group("mask learning")
    g.add_argument("--groups", type=str, default=None, help="N:M groups, e.g. '[[1,2]]*14' as a list, or '1:2'")
    g.add_argument("--delta-w", action="store_true", help="update weights during the search (LoRA or full)")
    g.add_argument("--lora", action="store_true", help="the weight update is LoRA (else full weights)")
    g.add_argument("--lora-scope", choices=["all", "blocks"], default="all",
                   help="LoRA on every Linear (official) or only on those inside the prunable blocks")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=None, help="default 2 x rank, as the reference")
    g.add_argument("--tau-range", nargs=2, type=float, default=[4.0, 0.1])
    g.add_argument("--scaling-range", nargs=2, type=float, default=[100.0, 100.0])
    g.add_argument("--gate-lr-mult", type=float, default=10.0)
    g.add_argument("--save-model", type=str, default=None, help="where to write the pruned plain state dict")
    g.add_argument("--no-split-forward", dest="split_forward", action="store_false",
                   help="run every block forward and backward for every sample, as the official code does "
                        "(default: autograd only on the samples that keep a block; same losses and gradients)")
    g.add_argument("--soft-mask-steps", type=int, default=0,
                   help="ours: the first K steps use the soft Gumbel-softmax sample as the mask (no one-hot, no "
                        "straight-through; every block runs for every sample then); default 0 = official")
    g.add_argument("--draws-per-sample", type=int, default=1,
                   help="ours: evaluate each sample under K independent mask draws (batch repeated K times, "
                        "losses averaged; K times the compute); default 1 = official")
    g.add_argument("--gate-estimator", choices=GATE_ESTIMATORS, default="st",
                   help="gradient of the gate logits: st = straight-through Gumbel (official); score-function = "
                        "REINFORCE on the drawn options' losses with a leave-one-out baseline (ours)")
    return parser


def resolve_model_and_groups(args):
    """(registry model name, groups) from a preset or --model + --groups."""
    if is_preset(args.model):
        if args.groups:
            raise UserError(f"--model {args.model} is a preset with its own groups: drop --groups, or use the base "
                            f"model name ({resolve_preset(args.model)[0]}) with --groups")
        return resolve_preset(args.model)
    if not args.groups:
        raise UserError(f"--model {args.model} is not a pruning preset: pass --groups (e.g. '1:2') or a preset "
                        f"such as DiT-XL-1-2")
    return args.model, args.groups


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_train_outputs(args)
    base_name, groups = resolve_model_and_groups(args)
    rt = setup_runtime(args.device, tf32=args.tf32)
    seed_everything(args.global_seed)
    family = family_for(base_name)
    store, shape = open_training_data(args, base_name)
    model = create_model(base_name, shape, args.num_classes, args.load_weight)
    groups = parse_groups(groups, model.depth)  # checks sum(M) == depth before anything is trained
    family.check_groups(model, groups)
    original = read_weights(args.load_weight) if args.load_weight else \
        {k: v.clone() for k, v in model.state_dict().items()}
    layer_mask, param_groups = prepare_mask_learning(model, groups, args.delta_w, args.lora, args.lora_rank,
                                                     args.lora_alpha, args.lr, args.gate_lr_mult, args.lora_scope)
    layer_mask.split_forward = args.split_forward
    objective = MaskLearningObjective(family.objective(shape, args), layer_mask, args.tau_range,
                                      args.scaling_range, args.soft_mask_steps, args.draws_per_sample,
                                      args.gate_estimator)
    out_dir = claim_run_dir(os.path.join(args.results_dir, f"{args.prefix}-{family.run_name(base_name)}"), args.resume)
    trainer = Trainer(rt, model, objective, store, TrainConfig.from_args(args), param_groups=param_groups, results_dir=out_dir)
    objective.ema_mask = trainer.ema.model.layer_mask
    total = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for g in param_groups for p in g["params"])
    trainer.logger.info(f"{base_name} groups {groups}: {trainable:,} trainable parameters "
                        f"({100 * trainable / (total + trainable):.2f}%), delta-w {args.delta_w}, "
                        f"lora {args.lora and args.lora_scope}")
    trainer.fit()

    ema_mask = trainer.ema.model.layer_mask
    kept, confidence = ema_mask.decision(), ema_mask.confidence()
    trainer.logger.info(f"[!] Final decision: {kept}\n[!] Final confidence: {confidence}")
    if rt.is_main:
        figure = plot_decisions(objective.history, os.path.join(out_dir, "decisions.png"))
        if args.save_model:
            trainer.check_progress()
            name, record = write_pruned(args.save_model, base_name, args.load_weight, original,
                                        model.block_lists, kept, method="learned", groups=groups,
                                        confidence=confidence, steps=trainer.step, delta_w=args.delta_w,
                                        lora=args.lora, lora_scope=args.lora_scope, lora_rank=args.lora_rank,
                                        decision_figure=figure, history=objective.history)
            trainer.logger.info(pruned_summary(name, record, args.save_model))
    rt.shutdown()


if __name__ == "__main__":
    run_main(main)

"""Fine-tune (or train from scratch) a DiT or SiT on pre-extracted latents.

    torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiT-D14/2 \
        --load-weight outputs/pruned/DiT-D14-Learned.pt --data-path data/imagenet_encoded \
        --epochs 100 --prefix D14-Learned-Finetuning

Also runs as plain `python train.py ...` (one process, GPU if present, else CPU). MAR's recipe:
--lr 8e-4 (1e-4 x batch/256) --lr-schedule constant --warmup-steps <100 epochs> --weight-decay 0.02
--grad-clip 3.0 (its AdamW groups and betas (0.9, 0.95) are set automatically).
"""
import argparse

from tinyfusion.cli import add_model_args, add_transport_args, create_model, open_training_data
from tinyfusion.errors import run_main
from tinyfusion.families import family_for
from tinyfusion.runtime import seed_everything, setup_runtime
from tinyfusion.trainer import TrainConfig, Trainer, add_train_args, check_train_outputs, experiment_dir


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_train_args(parser, lr=2e-4, ema_decay=0.9999, grad_clip=1.0, precision="fp16")  # the official recipe
    add_transport_args(parser)
    # TinyFusion's fine-tuning recipe (AdamW 2e-4, cosine to 1e-4); pass --lr 1e-4 --lr-schedule constant
    # for the official DiT/SiT pre-training recipe.
    parser.set_defaults(lr_schedule="cosine", lr_min=1e-4, results_dir="outputs")
    parser.add_argument("--save-model", type=str, default=None, help="also write the final EMA weights here")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_train_outputs(args)

    rt = setup_runtime(args.device, tf32=args.tf32)
    seed_everything(args.global_seed)  # same initial weights in every process and every run
    family = family_for(args.model)
    store, shape = open_training_data(args, args.model)
    model = create_model(args.model, shape, args.num_classes, args.load_weight)
    objective = family.objective(shape, args)
    trainer = Trainer(rt, model, objective, store, TrainConfig.from_args(args), param_groups=family.param_groups(model, args),
                      results_dir=experiment_dir(args, family.run_name(args.model)))
    trainer.logger.info(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
                        f"{len(store):,} training latents from {args.data_path}")
    trainer.fit().finish(args.save_model)


if __name__ == "__main__":
    run_main(main)

"""Recover a depth-pruned DiT/SiT with masked knowledge distillation (TinyFusion eq. 8).

    torchrun --nnodes=1 --nproc_per_node=8 train_masked_kd.py --model DiT-D14/2 \
        --load-weight outputs/pruned/DiT-D14-Learned.pt --data-path data/imagenet_encoded --epochs 100 \
        --prefix D14-Learned-RepKD --teacher DiT-XL/2 --load-teacher pretrained/DiT-XL-2-256x256.pt

The student->teacher layer map is the official table for DiT-D14/2, DiT-D19/2 (from DiT-XL/2) and
DiT-D7/2 (from DiT-D14/2); for other students it comes from the pruning record beside --load-weight (in
each pruning group, the last kept student block <-> the teacher's last block of the group).
--layer-map-source picks either; --layer-map overrides both. Defaults reproduce the official code
(fp16 autocast with a grad scaler on CUDA, fp32 on CPU; see the README's "defaults vs official" table).
Schedules are defined in steps (--max-steps, or --epochs x steps per epoch), never silently tied to
the batch size.
"""
import argparse

import torch

from core.errors import UserError
from diffusion import REP_MASKS
from tinyfusion.cli import add_model_args, add_transport_args, create_model, open_training_data, require_weights
from tinyfusion.errors import run_main
from tinyfusion.families import family_for
from tinyfusion.kd import LAYER_MAP_SOURCES, MaskedKDObjective, choose_layer_map
from tinyfusion.pruning import read_record
from tinyfusion.runtime import seed_everything, setup_runtime
from tinyfusion.trainer import TrainConfig, Trainer, add_train_args, check_train_outputs, experiment_dir


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, model="DiT-D14/2")
    add_train_args(parser, lr=2e-4, ema_decay=0.9999, grad_clip=1.0, precision="fp16")
    add_transport_args(parser)
    parser.set_defaults(lr_schedule="cosine", lr_min=1e-4, results_dir="outputs")  # paper Table 6
    g = parser.add_argument_group("masked knowledge distillation")
    g.add_argument("--teacher", type=str, default="DiT-XL/2")
    g.add_argument("--load-teacher", type=str, default=None, help="teacher weights (required)")
    g.add_argument("--layer-map", type=str, default=None, help="student:teacher pairs, e.g. '0:1,1:3'")
    g.add_argument("--layer-map-source", choices=LAYER_MAP_SOURCES, default="auto",
                   help="auto: the official table for DiT-D14/2, D19/2, D7/2, else the pruning record")
    g.add_argument("--alpha-kd", type=float, default=0.9)
    g.add_argument("--alpha-diff", type=float, default=None, help="weight of L_Diff (default 1 - alpha-kd)")
    g.add_argument("--rep-mask", choices=REP_MASKS, default="both",
                   help="both: mask each hidden state by its own statistics (official); teacher: ours")
    g.add_argument("--kd-channels", choices=["eps", "all"], default="eps",
                   help="DiT L_KD: eps channels + the VB term against the teacher (official), or MSE over all")
    g.add_argument("--beta", type=float, default=None, help="initial L_Rep weight (default 1e-2; SiT 2e-4)")
    g.add_argument("--beta-end", type=float, default=0.0)
    g.add_argument("--teacher-precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: teacher weights in bf16 (half its memory, faster on GPUs), run under bf16 autocast")
    g.add_argument("--mask-std", type=float, default=2.0, help="mask hidden entries beyond this many std")
    g.add_argument("--save-model", type=str, default=None, help="also write the final EMA weights here")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_train_outputs(args)
    family = family_for(args.model)
    require_weights(args.teacher, args.load_teacher, "--load-teacher")  # e.g. DiT-XL-2-256x256.pt
    if family_for(args.teacher) is not family:
        raise UserError(f"teacher {args.teacher} and student {args.model} are different model families")
    rt = setup_runtime(args.device, tf32=args.tf32)
    seed_everything(args.global_seed)
    store, shape = open_training_data(args, args.model)
    student = create_model(args.model, shape, args.num_classes, args.load_weight)
    teacher = create_model(args.teacher, shape, args.num_classes, args.load_teacher).to(rt.device)
    source = family.weights_path(args.model, args.load_weight)  # the record lies beside the student's weights
    record = read_record(source) if source and not args.layer_map else None
    layer_map, origin = choose_layer_map(args.model, student.depth, teacher.depth, args.layer_map,
                                         args.layer_map_source, record)
    if max(s for s, _ in layer_map) >= student.depth:
        raise UserError(f"the layer map {layer_map} does not fit the student's depth {student.depth}: check --model "
                        f"or pass --layer-map")
    beta = args.beta if args.beta is not None else family.kd_beta  # paper Table 6
    objective = MaskedKDObjective(family.objective(shape, args), student, teacher, layer_map,
                                  args.alpha_kd, args.alpha_diff, beta, args.beta_end, args.mask_std,
                                  teacher_dtype=torch.bfloat16 if args.teacher_precision == "bf16" else None,
                                  rep_mask=args.rep_mask, kd_channels=args.kd_channels)
    trainer = Trainer(rt, student, objective, store, TrainConfig.from_args(args), results_dir=experiment_dir(args, family.run_name(args.model)))
    trainer.logger.info(f"student {args.model} ({student.depth} blocks) <- teacher {args.teacher} "
                        f"({teacher.depth} blocks); layer map {layer_map} from {origin}; beta {beta} -> {args.beta_end}")
    trainer.fit().finish(args.save_model, family.save_trained)


if __name__ == "__main__":
    run_main(main)

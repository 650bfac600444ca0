"""What the first gate updates of a search see (issue 14, the 1:4 block-0 puzzle).

    python studies/gate_signal.py            # writes studies/results/gate_signal.json, prints the tables
    python studies/gate_signal.py --gate-estimator score-function --patterns 1:4 --out /tmp/sf.json

At the search's start (gates at their constant init, tau 4, scaling 100, frozen teacher weights) the
masked teacher is run on fixed calibration batches with per-sample Gumbel draws, exactly as in
prune_by_learning.py. For every option of every group it reports
  - the gradient of its logit (negative = a gradient step raises it): straight-through (the official
    estimator), or with --gate-estimator / --soft the first step of prune_by_learning.py's options, and
  - the mean loss of the samples that drew it (what the option is really worth, averaged over the
    other groups' random choices).
Where the two rank the options differently, the first updates push the search away from the
better option, and with the gate learning rate high enough it never comes back.
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tinyfusion.digits import load_digits_teacher, load_split  # noqa: E402
from tinyfusion.errors import run_main  # noqa: E402
from tinyfusion.mask_learning import GATE_ESTIMATORS, MaskLearningObjective, prepare_mask_learning  # noqa: E402
from tinyfusion.objectives import DiffusionObjective  # noqa: E402
from models.layer_mask import parse_groups  # noqa: E402


def gate_signal(pattern, batches=8, batch_size=256, seed=0, estimator="st", soft=False):
    model = load_digits_teacher()
    groups = parse_groups(pattern, model.depth)
    layer_mask, _ = prepare_mask_learning(model, groups, delta_w=False)
    model.train()
    objective = MaskLearningObjective(DiffusionObjective((1, 8, 8), class_dropout_prob=0.0), layer_mask,
                                      soft_mask_steps=int(soft), gate_estimator=estimator)
    objective.begin_step(0, 100)  # tau 4, scaling 100: the search's first step
    x_all, y_all, _, _ = load_split()
    g = torch.Generator().manual_seed(seed)
    layer_mask.generator = torch.Generator().manual_seed(seed + 1)
    grads = [torch.zeros_like(p) for p in layer_mask.logits]
    loss_sum = [torch.zeros(len(c)) for c in layer_mask._combos]
    count = [torch.zeros(len(c)) for c in layer_mask._combos]
    for _ in range(batches):
        idx = torch.randperm(len(x_all), generator=g)[:batch_size].numpy()
        x, y = torch.from_numpy(x_all[idx]), torch.from_numpy(y_all[idx])
        draws = objective.draw(batch_size, g)
        per_sample, _ = objective.loss(model, x, y, draws, 0)
        layer_mask.zero_grad()
        per_sample.mean().backward()
        for gi in range(len(groups)):
            grads[gi] += layer_mask.logits[gi].grad / batches
            for b, option in enumerate(layer_mask.drawn[:, gi].tolist()):  # with --soft: the Gumbel argmax
                loss_sum[gi][option] += per_sample[b].item()
                count[gi][option] += 1
    out = []
    start = 0
    for gi, ((n, m), combos) in enumerate(zip(groups, layer_mask._combos)):
        out.append([{"kept": [start + j for j in c], "grad": float(grads[gi][k]), "n": int(count[gi][k]),
                     "mean_loss": float(loss_sum[gi][k] / count[gi][k]) if count[gi][k] else None}
                    for k, c in enumerate(combos)])
        start += m
    return out


@torch.no_grad()
def loss_along_mask(block, others, values, batches=4, batch_size=256, seed=0):
    """Calibration loss of the teacher with blocks `others` kept, the rest dropped, and block `block` scaled
    by m in `values` (m * block(x) + (1 - m) * x, the search's own masking): is the loss linear in m?"""
    model = load_digits_teacher()
    layer_mask, _ = prepare_mask_learning(model, [(model.depth, model.depth)], delta_w=False)
    objective = DiffusionObjective((1, 8, 8), class_dropout_prob=0.0)
    x_all, y_all, _, _ = load_split()
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(batches):
        idx = torch.randperm(len(x_all), generator=g)[:batch_size].numpy()
        data.append((torch.from_numpy(x_all[idx]), torch.from_numpy(y_all[idx]), objective.draw(batch_size, g)))
    out = []
    for v in values:
        m = torch.zeros(model.depth)
        m[list(others)] = 1.0
        m[block] = v
        with layer_mask.masks(m):
            out.append(float(sum(objective.loss(model, x, y, d, 0)[0].mean() for x, y, d in data) / batches))
    return out


def estimator_name(settings):
    """The gate gradient a run of this script measured, from its settings."""
    if settings.get("soft"):
        return "soft-mask"
    return {"st": "straight-through"}.get(settings.get("gate_estimator", "st"), settings.get("gate_estimator"))


def table(pattern, groups, estimator="straight-through"):
    lines = [f"### {pattern}: first-step gate signal (frozen teacher, tau 4, scaling 100)", "",
             f"| group | option (kept) | {estimator} grad of its logit | samples | mean loss of those samples |",
             "|---|---|---|---|---|"]
    for gi, options in enumerate(groups):
        best_loss = min(options, key=lambda o: o["mean_loss"] if o["mean_loss"] is not None else 1e9)
        best_grad = min(options, key=lambda o: o.get("grad", o.get("st_grad")))
        for o in options:
            mark = (" **lowest loss**" if o is best_loss else "") + (" **favoured by the gradient**" if o is best_grad else "")
            loss = f"{o['mean_loss']:.4f}" if o["mean_loss"] is not None else "n/a"
            lines.append(f"| {gi} | {o['kept']}{mark} | {o.get('grad', o.get('st_grad')):+.3e} | {o['n']} | {loss} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", nargs="+", default=["1:4", "1:2"])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--gate-estimator", choices=GATE_ESTIMATORS, default="st")
    parser.add_argument("--soft", action="store_true", help="soft Gumbel-softmax masks (--soft-mask-steps)")
    parser.add_argument("--out", default=os.path.join(ROOT, "studies", "results", "gate_signal.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = {p: gate_signal(p, args.batches, args.batch_size, estimator=args.gate_estimator, soft=args.soft)
              for p in args.patterns}
    values = [round(0.125 * i, 3) for i in range(11)]  # 0 .. 1.25
    paths = {f"block 0 with {others}": loss_along_mask(0, others, values) for others in ([7, 11], [4, 10], [2, 7])}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "patterns": result, "mask_values": values, "loss_along_mask": paths},
                  f, indent=1)
    for p, groups in result.items():
        print("\n".join(table(p, groups, estimator_name(vars(args)))) + "\n")
    print("\n".join(path_table(values, paths)))


def path_table(values, paths):
    lines = ["### Calibration loss as block 0's mask m goes from 0 (dropped) to 1.25", "",
             "| kept blocks | " + " | ".join(f"m={v:g}" for v in values) + " |", "|---|" + "---|" * len(values)]
    lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in losses) + " |" for name, losses in paths.items()]
    return lines


if __name__ == "__main__":
    run_main(main)

"""The whole TinyFusion pipeline on the embedded digits dataset, with the paper's comparison in miniature.

    python demo.py                 # about 10 minutes on 2 CPU cores
    python demo.py --full          # the larger budget behind the README table (see --help for its time)
    python demo.py --family SiT    # the same comparison on the shipped SiT-Tiny/2 teacher (ODE sampler, Euler steps)

A shipped 12-block teacher DiT (assets/digits_teacher.safetensors) is pruned to 6 blocks by
  learned  prune_by_learning.py (1:2 groups, LoRA co-optimisation)      [TinyFusion]
  bi       prune_by_score.py --method bi (ShortGPT)
  oracle   prune_by_index.py, BK-SDM style (first half even, second half odd blocks)
  random   prune_by_score.py --method random
Each pruned model is recovered with train_masked_kd.py under the same budget, sampled with sample_ddp.py and
scored with evaluator.py on digit-classifier features (FID, IS, precision, recall) plus the classifier's
accuracy on the class-conditional samples. All stages call the real scripts; finished stages are skipped
when the demo is re-run with the same settings.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from core.errors import UserError
from tinyfusion.errors import run_main

ROOT = os.path.dirname(os.path.abspath(__file__))
TEACHER = os.path.join(ROOT, "assets", "digits_teacher.safetensors")
TEACHERS = {"DiT": TEACHER, "SiT": os.path.join(ROOT, "assets", "sit_digits_teacher.safetensors")}
OUT_DIRS = {"DiT": "demo_report", "SiT": "demo_report_sit"}
METHODS = ("learned", "bi", "oracle", "random")
ORACLE_KEPT = [0, 2, 4, 7, 9, 11]  # BK-SDM: keep the first layer of each encoder pair, the last of each decoder pair
BUDGETS = {  # steps of mask learning / fine-tuning per method, FID samples, sampling steps
    "default": dict(prune_steps=200, finetune_steps=300, samples=500, sampling_steps=25, batch=64, seeds=[0]),
    "full": dict(prune_steps=600, finetune_steps=1500, samples=1000, sampling_steps=50, batch=64, seeds=[0, 1]),
}
COMMON = ["--image-size", "8", "--vae", "none", "--channels", "1", "--num-classes", "10"]


class Demo:
    def __init__(self, args):
        self.args, self.out = args, os.path.abspath(args.out)
        self.model = f"{args.family}-Tiny/2"
        from tinyfusion.families import family_for
        self.sampler_argv = list(family_for(self.model).fixed_step_sampler_argv)  # SiT: Euler ODE, as many steps as DDPM
        self.budget = dict(BUDGETS["full" if args.full else "default"])
        for key in ("prune_steps", "finetune_steps", "samples", "sampling_steps"):
            if getattr(args, key) is not None:
                self.budget[key] = getattr(args, key)
        if args.seeds is not None:
            self.budget["seeds"] = args.seeds
        self.data = os.path.join(self.out, "data", "digits")
        self.ref = os.path.join(self.out, "data", "digits_ref.npz")
        self.logs = os.path.join(self.out, "logs")

    # ---- bookkeeping ---------------------------------------------------------------------------
    def check_settings(self):
        # Seeds are left out: each seed has its own folder, so a run may add or drop seeds.
        settings = {"budget": {k: v for k, v in self.budget.items() if k != "seeds"}, "teacher": self.args.teacher}
        path = os.path.join(self.out, "settings.json")
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old != settings and not self.args.overwrite:
                raise UserError(f"{self.out} holds a demo run with other settings ({old['budget']}): pass --overwrite "
                                f"to replace it, or --out another folder")
            if old != settings:
                shutil.rmtree(self.out)
        os.makedirs(self.logs, exist_ok=True)
        with open(path, "w") as f:
            json.dump(settings, f, indent=1)
        if not os.path.isfile(self.args.teacher):
            raise UserError(f"teacher {self.args.teacher} is missing: rebuild it with the train.py command in "
                            f"assets/README.md, or pass --teacher")

    def run(self, name, script, argv, total=None, desc=None):
        """Run one of the real scripts, its output in logs/<name>.log; a bar follows its '(step=N)' lines."""
        log_path = os.path.join(self.logs, f"{name}.log")
        cmd = [sys.executable, os.path.join(ROOT, script), *map(str, argv)]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread each is fastest (no spin-waiting)
        bar = tqdm(total=total, desc=desc or name, unit="step", leave=False, disable=self.args.quiet)
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
            for line in proc.stdout:
                log.write(line)
                m = re.search(r"\(step=(\d+)\)", line)
                if m and total:
                    bar.update(int(m.group(1)) - bar.n)
            code = proc.wait()
        bar.close()
        if code:
            tail = open(log_path).read().strip().splitlines()[-1:]
            raise UserError(f"stage {name} failed ({script}, exit {code}): {tail[0] if tail else ''}; full log in {log_path}")
        return log_path

    # ---- stages --------------------------------------------------------------------------------
    def prepare(self):
        if not os.path.isfile(self.ref):
            self.run("prepare", "prepare_digits.py", ["--data-path", self.data, "--ref-batch", self.ref])

    def prune(self, seed):
        d, b, out = os.path.join(self.out, f"seed{seed}", "pruned"), self.budget, {}
        os.makedirs(d, exist_ok=True)
        common = ["--model", self.model, *COMMON]
        jobs = {
            "learned": ("prune_by_learning.py", ["--groups", "1:2", "--load-weight", self.args.teacher, "--data-path",
                        self.data, "--delta-w", "--lora", "--max-steps", b["prune_steps"], "--global-batch-size",
                        b["batch"], "--lr", "1e-3", "--precision", "fp32", "--num-workers", "0", "--log-every", "10",
                        "--global-seed", seed, "--results-dir", d, "--prefix", "search", "--resume", "auto"]),
            "bi": ("prune_by_score.py", ["--method", "bi", "--n-pruned", "6", "--ckpt", self.args.teacher,
                   "--data-path", self.data, "--seed", seed]),
            "oracle": ("prune_by_index.py", ["--ckpt", self.args.teacher, "--kept-indices", str(ORACLE_KEPT)]),
            "random": ("prune_by_score.py", ["--method", "random", "--n-pruned", "6", "--ckpt", self.args.teacher,
                       "--seed", seed, "--data-path", self.data]),
        }
        for method, (script, argv) in jobs.items():
            path = os.path.join(d, f"{method}.pt")
            if not os.path.isfile(path):
                total = b["prune_steps"] if method == "learned" else None
                self.run(f"seed{seed}-prune-{method}", script, [*common, *argv, "--save-model", path], total,
                         f"prune {method} (seed {seed})")
            out[method] = path
        return out

    def finetune(self, seed, method, pruned):
        d = os.path.join(self.out, f"seed{seed}", "finetuned")
        final = os.path.join(d, f"{method}.safetensors")
        if not os.path.isfile(final):
            record = json.load(open(os.path.splitext(pruned)[0] + ".json"))
            b = self.budget
            self.run(f"seed{seed}-kd-{method}", "train_masked_kd.py", [
                "--model", record["pruned_model"], "--load-weight", pruned, "--teacher", self.model,
                "--load-teacher", self.args.teacher, "--data-path", self.data, *COMMON,
                "--max-steps", b["finetune_steps"], "--global-batch-size", b["batch"], "--lr", "1e-3",
                "--lr-min", "1e-4", "--ema-decay", "0.99", "--num-workers", "0", "--log-every", "25",
                "--ckpt-every", b["finetune_steps"], "--global-seed", seed, "--results-dir", d, "--prefix", method,
                "--resume", "auto",
                "--save-model", final], b["finetune_steps"], f"masked KD {method} (seed {seed})")
        return final

    def sample_and_score(self, tag, model_name, ckpt):
        d = os.path.join(self.out, "samples")
        npz, metrics = os.path.join(d, f"{tag}.npz"), os.path.join(d, f"{tag}.json")
        b = self.budget
        if not os.path.isfile(npz):
            self.run(f"sample-{tag}", "sample_ddp.py", [*self.sampler_argv,
                "--model", model_name, "--ckpt", ckpt, *COMMON, "--cfg-scale", "1.5",
                "--guide-all-channels", "--num-sampling-steps", b["sampling_steps"], "--num-fid-samples", b["samples"],
                "--per-proc-batch-size", "250", "--global-seed", "0", "--sample-dir", os.path.join(d, "parts"),
                "--out", npz], desc=f"sample {tag}")
        if not os.path.isfile(metrics):
            self.run(f"eval-{tag}", "evaluator.py", [self.ref, npz, "--feature-net", "digits", "--json", metrics,
                                                      "--device", "cpu"], desc=f"evaluate {tag}")
        with open(metrics) as f:
            result = json.load(f)
        result["class_acc"] = self.class_accuracy(npz, model_name)
        return result

    def class_accuracy(self, npz, model_name):
        """Classifier accuracy on the samples against the labels sample_ddp drew for them."""
        from tinyfusion.digits import DigitsExtractor, class_accuracy, load_digits_classifier
        from tinyfusion.sample_job import draw_inputs
        images = np.load(npz)["arr_0"]
        labels, _ = draw_inputs(0, range(len(images)), (1, 8, 8), 10)
        return class_accuracy(DigitsExtractor(load_digits_classifier()), images, labels.numpy())

    def grid(self, tag, model_name, ckpt):
        path = os.path.join(self.out, f"grid-{tag}.png")
        if not os.path.isfile(path):
            self.run(f"grid-{tag}", "sample.py", [*self.sampler_argv,
                "--model", model_name, "--ckpt", ckpt, *COMMON, "--cfg-scale", "1.5",
                "--guide-all-channels", "--num-sampling-steps", self.budget["sampling_steps"], "--seed", "0",
                "--class-labels", *range(10), *range(10), "--nrow", "10", "--out", path])
        return os.path.basename(path)


def calibration_loss(model_name, ckpt, data, seed=0, batches=8, batch_size=64):
    """Diffusion loss right after pruning (before any fine-tuning), on fixed data, t and noise."""
    from tinyfusion.cli import create_model
    from tinyfusion.data import open_feature_store
    from tinyfusion.families import family_for
    store = open_feature_store(data)
    model = create_model(model_name, store.latent_shape, 10, ckpt).eval()
    objective = family_for(model_name).objective(store.latent_shape, class_dropout_prob=0.0)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(store), generator=g)[:batches * batch_size]
    losses = []
    with torch.no_grad():
        for i in range(0, len(idx), batch_size):
            items = [store[int(j)] for j in idx[i:i + batch_size]]
            x, y = torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
            losses.append(objective.loss(model, x, y, objective.draw(len(x), g), 0)[0].mean())
    return float(torch.stack(losses).mean())


def sampling_speedups(models, batch=64, reps=5, rounds=5):
    """Speed of one CFG sampling step (the denoiser forward on a doubled batch) of each (name, ckpt), relative
    to the first. Models are timed in turn, round after round, and medians are compared, so load changes on
    a shared machine hit them all alike."""
    from tinyfusion.cli import create_model
    nets = [create_model(name, (1, 8, 8), 10, ckpt).eval() for name, ckpt in models]
    x, t, y = torch.randn(2 * batch, 1, 8, 8), torch.randint(0, 1000, (2 * batch,)), torch.randint(0, 10, (2 * batch,))
    times = [[] for _ in nets]
    with torch.no_grad():
        for net in nets:
            net(x, t, y)  # warm-up
        for _ in range(rounds):
            for i, net in enumerate(nets):
                start = time.perf_counter()
                for _ in range(reps):
                    net(x, t, y)
                times[i].append(time.perf_counter() - start)
    medians = [float(np.median(ts)) for ts in times]
    return [medians[0] / m for m in medians]


def fmt(v, digits=2):
    return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="DiT", choices=sorted(TEACHERS), help="teacher family (DiT-Tiny/2 or SiT-Tiny/2)")
    parser.add_argument("--out", default=None, help="report folder, reused when settings match (default demo_report, "
                        "demo_report_sit for SiT)")
    parser.add_argument("--full", action="store_true", help="5x the fine-tuning budget, 2 seeds, 1000 samples (about 35 minutes on 2 cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace a report folder made with other settings")
    parser.add_argument("--teacher", default=None, help="teacher weights (default: the shipped one of --family)")
    parser.add_argument("--prune-steps", type=int, default=None)
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None, help="samples per model for the metrics")
    parser.add_argument("--sampling-steps", type=int, default=None, help="DDPM steps per sample")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.out = args.out or OUT_DIRS[args.family]
    args.teacher = args.teacher or TEACHERS[args.family]
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    demo = Demo(args)
    demo.check_settings()
    start = time.time()
    demo.prepare()
    rows = {"teacher (unpruned)": [dict(kept=list(range(12)), model=demo.model, ckpt=args.teacher, calib=None)]}
    for seed in demo.budget["seeds"]:
        pruned = demo.prune(seed)
        for method in METHODS:
            record = json.load(open(os.path.splitext(pruned[method])[0] + ".json"))
            calib = calibration_loss(record["pruned_model"], pruned[method], demo.data)
            final = demo.finetune(seed, method, pruned[method])
            rows.setdefault(method, []).append(dict(kept=record["kept"], model=record["pruned_model"], ckpt=final,
                                                   calib=calib))
    firsts = [runs[0] for runs in rows.values()]
    speedups = sampling_speedups([(r["model"], r["ckpt"]) for r in firsts])
    table = []
    for (name, runs), speedup in zip(rows.items(), speedups):
        results = []
        for i, r in enumerate(runs):
            tag = name.split()[0] + (f"-seed{demo.budget['seeds'][i]}" if name in METHODS else "")
            results.append(demo.sample_and_score(tag, r["model"], r["ckpt"]))
        grid = demo.grid(name.split()[0], runs[0]["model"], runs[0]["ckpt"])
        mean = {k: float(np.mean([res[k] for res in results])) if results[0].get(k) is not None else None
                for k in ("FID", "IS", "precision", "recall", "class_acc")}
        calib = [r["calib"] for r in runs if r["calib"] is not None]
        from tinyfusion.cli import create_model
        with torch.device("meta"):
            params = sum(p.numel() for p in create_model(runs[0]["model"], (1, 8, 8), 10).parameters())
        table.append(dict(method=name, kept=runs[0]["kept"], params=params, calib=float(np.mean(calib)) if calib else None,
                          speedup=speedup, grid=grid, **mean,
                          per_seed=[dict(kept=r["kept"], **{k: res.get(k) for k in ("FID", "class_acc")})
                                    for r, res in zip(runs, results)]))
    write_report(demo, table, time.time() - start)


def write_report(demo, table, seconds):
    head = "| method | kept layers (seed 0) | params | speedup | calib. loss after pruning | FID | IS | precision | recall | class acc. |"
    lines = [head, "|" + "---|" * 10]
    for r in table:
        lines.append(f"| {r['method']} | {r['kept']} | {r['params'] / 1e6:.2f}M | {r['speedup']:.2f}x | {fmt(r['calib'], 4)} "
                     f"| {fmt(r['FID'])} | {fmt(r['IS'])} | {fmt(r['precision'], 3)} | {fmt(r['recall'], 3)} "
                     f"| {fmt(r['class_acc'], 3)} |")
    b = demo.budget
    figure = os.path.join(demo.out, f"seed{b['seeds'][0]}", "pruned", f"search-{demo.model.replace('/', '-')}", "decisions.png")
    if os.path.isfile(figure):
        shutil.copy(figure, os.path.join(demo.out, "decisions.png"))
    from tinyfusion.cli import sampling_flags
    from tinyfusion.families import family_for
    sampler = family_for(demo.model).sampler(sampling_flags([*demo.sampler_argv, "--num-sampling-steps", b["sampling_steps"]]))
    report = [f"# TinyFusion on the digits dataset ({demo.model} teacher)", "",
              f"Budget: mask learning {b['prune_steps']} steps, masked-KD fine-tuning {b['finetune_steps']} steps per "
              f"method (batch {b['batch']}), {b['samples']} samples per model with the "
              f"{sampler.name} sampler (cfg 1.5), seeds {b['seeds']} (metrics are means over seeds). Metrics use the digit classifier's "
              f"features against {os.path.basename(demo.ref)} (held-out digits). Total time {seconds / 60:.1f} min.", "",
              *lines, "", "Per seed (FID, class accuracy):", ""]
    for r in table:
        report.append(f"- {r['method']}: " + "; ".join(f"kept {p['kept']} FID {fmt(p['FID'])} acc {fmt(p['class_acc'], 3)}"
                                                      for p in r["per_seed"]))
    report += ["", "## Decision dynamics of the learned search (seed 0)", "", "![decisions](decisions.png)", "",
               "## Samples (two rows of classes 0-9 per method)", ""]
    report += [f"**{r['method']}**\n\n![{r['method']}]({r['grid']})\n" for r in table]
    path = os.path.join(demo.out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(report) + "\n")
    with open(os.path.join(demo.out, "results.json"), "w") as f:
        json.dump(table, f, indent=1)
    print("\n".join(lines))
    print(f"\nreport: {path} ({seconds / 60:.1f} min)")


if __name__ == "__main__":
    run_main(main)

"""Recoverability ground truth on the shipped 12-block digits teacher (issue 14; paper section 4).

    python studies/recoverability.py --part enumerate   # every 1:2 (and 1:4) subnet: calibration loss, then
                                                        # masked-KD fine-tuning and held-out loss / FID / accuracy
    python studies/recoverability.py --part methods     # learned searches (several seeds, rates, patterns,
                                                        # update modes) and the score baselines' picks
    python studies/recoverability.py --part report      # figures and tables from whatever is finished

The two heavy parts may run at the same time (two processes). Every stage calls the real code:
pruning.write_pruned for the subnets, train_masked_kd.py's main for the fine-tuning (the repo's
masked-KD defaults), prune_by_learning.py's and prune_by_score.py's mains for the methods,
digits.sample_digits and metrics.evaluate for the quality. Finished rows are appended to JSONL files
under --results, each tagged with the hash of the settings that made it; a re-run skips them, and a
run with other settings is refused (pass another --results folder).
"""
import argparse
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prune_by_learning  # noqa: E402  (the real scripts, called in-process: no interpreter start per subnet)
import prune_by_score  # noqa: E402
import train_masked_kd  # noqa: E402
from core.errors import UserError  # noqa: E402
from models.layer_mask import parse_groups  # noqa: E402
from tinyfusion.checkpoint import read_weights  # noqa: E402
from tinyfusion.cli import create_model  # noqa: E402
from tinyfusion.digits import (DigitsExtractor, class_accuracy, load_digits_classifier, load_split,  # noqa: E402
                               sample_digits, write_digits_data)
from tinyfusion.errors import run_main  # noqa: E402
from tinyfusion.families.dit import DiffusionObjective  # noqa: E402
from tinyfusion.metrics import evaluate  # noqa: E402
from tinyfusion.npz import write_sample_batch  # noqa: E402
from tinyfusion.pruning import write_pruned  # noqa: E402

TEACHER = os.path.join(ROOT, "assets", "digits_teacher.safetensors")
COMMON = ["--image-size", "8", "--vae", "none", "--channels", "1", "--num-classes", "10"]
DEPTH = 12
UPDATES = {"lora": ["--delta-w", "--lora"], "full": ["--delta-w"], "frozen": []}
# Searches in the order they run (most important first). name: (groups, update, lr, steps, seeds, extra flags)
SEARCHES = {
    "1:2 lora lr1e-4": ("1:2", "lora", 1e-4, 1000, [0, 1, 2, 3, 4], []),       # the official rates (gates 1e-3)
    "1:2 lora lr1e-3": ("1:2", "lora", 1e-3, 100, [0, 1, 2, 3, 4], []),          # the demo's rates
    "1:2 full lr1e-3": ("1:2", "full", 1e-3, 100, [0, 1, 2], []),
    "1:2 frozen lr1e-3": ("1:2", "frozen", 1e-3, 100, [0, 1, 2], []),
    "2:4 lora lr1e-3": ("2:4", "lora", 1e-3, 100, [0, 1, 2], []),
    "2:4 full lr1e-3": ("2:4", "full", 1e-3, 100, [0, 1, 2], []),
    "2:4 frozen lr1e-3": ("2:4", "frozen", 1e-3, 100, [0, 1, 2], []),
    "6:12 lora lr1e-3": ("6:12", "lora", 1e-3, 100, [0, 1, 2], []),
    "6:12 full lr1e-3": ("6:12", "full", 1e-3, 100, [0, 1, 2], []),
    "6:12 frozen lr1e-3": ("6:12", "frozen", 1e-3, 100, [0, 1, 2], []),
    "1:4 frozen lr1e-3": ("1:4", "frozen", 1e-3, 100, [0], []),
    "1:4 lora lr1e-3": ("1:4", "lora", 1e-3, 100, [0], []),
    "1:4 full lr1e-3": ("1:4", "full", 1e-3, 100, [0], []),
    "1:4 lora lr1e-3 gates x1": ("1:4", "lora", 1e-3, 100, [0], ["--gate-lr-mult", "1"]),
    "1:4 lora lr1e-3 scaling 10": ("1:4", "lora", 1e-3, 100, [0], ["--scaling-range", "10", "10"]),
    "1:4 lora lr1e-3 tau 10->1": ("1:4", "lora", 1e-3, 100, [0], ["--tau-range", "10", "1"]),
    # the 1:4 block-0 puzzle (README section 5): gate estimators other than straight-through (ours)
    "1:4 lora lr1e-3 soft 20": ("1:4", "lora", 1e-3, 100, [0], ["--soft-mask-steps", "20"]),
    "1:4 lora lr1e-3 draws 4": ("1:4", "lora", 1e-3, 100, [0], ["--draws-per-sample", "4"]),
    "1:4 lora lr1e-3 score-function": ("1:4", "lora", 1e-3, 100, [0], ["--gate-estimator", "score-function"]),
    "1:4 frozen lr1e-3 score-function": ("1:4", "frozen", 1e-3, 100, [0], ["--gate-estimator", "score-function"]),
    "1:2 lora lr1e-3 score-function": ("1:2", "lora", 1e-3, 100, [0, 1, 2], ["--gate-estimator", "score-function"]),
}
SCORES = ("bi", "sensitivity", "output-error", "magnitude")


# ----------------------------------------------------------------------------- subnets and bookkeeping

def all_subnets(pattern):
    """Every kept-index list of an N:M pattern over the 12 blocks (groups of M, N kept in each)."""
    groups = parse_groups(pattern, DEPTH)
    per_group = [[[start + j for j in c] for c in itertools.combinations(range(m), n)]
                 for (n, m), start in zip(groups, range(0, DEPTH, groups[0][1]))]
    return [sum(choice, []) for choice in itertools.product(*per_group)]


def fits(kept, pattern):
    return sorted(kept) in all_subnets(pattern)


def settings_hash(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def file_sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


class Rows:
    """An append-only JSONL file of result rows. Each row carries the hash of the settings that made it
    (the file's common settings plus the row's own, e.g. one search's configuration): a finished row is
    reused only under the same hash, and a row of the same key made with other settings stops the run."""

    def __init__(self, path, settings):
        self.path, self.settings = path, settings
        self.reload()

    def reload(self):
        self.rows = []
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.rows = [json.loads(line) for line in f if line.strip()]

    def hash(self, own=None):
        return settings_hash({**self.settings, **(own or {})})

    def find(self, own=None, **key):
        row = next((r for r in self.rows if all(r.get(k) == v for k, v in key.items())), None)
        if row is not None and row["settings"] != self.hash(own):
            raise UserError(f"{self.path} holds {key} made with other settings ({row['settings']}, this run "
                            f"{self.hash(own)}): pass --results another folder (or move that file away) instead "
                            f"of mixing them")
        return row

    def add(self, row, own=None):
        row = {"settings": self.hash(own), **row}
        with open(self.path, "a") as f:  # one write per row: concurrent appenders do not interleave
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        return row


@contextlib.contextmanager
def quiet(log_path):
    """Send a real script's console output to its log file."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


# ----------------------------------------------------------------------------- the measurements

class Study:
    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(args.work)
        self.data, self.ref = os.path.join(self.work, "data", "digits"), os.path.join(self.work, "data", "ref.npz")
        if not os.path.isfile(self.ref):
            write_digits_data(self.data, self.ref)
        self.teacher_sd = read_weights(TEACHER)
        x_train, y_train, x_test, y_test = load_split()
        pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:args.calib_items].numpy()
        self.calib = (torch.from_numpy(x_train[pick]), torch.from_numpy(y_train[pick]))
        self.held_out = (torch.from_numpy(x_test), torch.from_numpy(y_test))
        self.extractor = DigitsExtractor(load_digits_classifier())
        self.objective = DiffusionObjective((1, 8, 8), class_dropout_prob=0.0)

    @torch.no_grad()
    def fixed_loss(self, model, x, y, repeats=1):
        """Diffusion loss (MSE + VB) with t and noise drawn from fixed seeds: the same for every subnet."""
        model.eval()
        losses = []
        for r in range(repeats):
            draws = self.objective.draw(len(x), torch.Generator().manual_seed(1000 + r))
            losses.append(self.objective.loss(model, x, y, draws, 0)[0].mean())
        return float(torch.stack(losses).mean())

    def prune(self, kept, pattern, folder):
        path = os.path.join(folder, "pruned.pt")
        groups = parse_groups(pattern, DEPTH)  # the KD layer map follows the groups
        name, _ = write_pruned(path, "DiT-Tiny/2", TEACHER, self.teacher_sd, ["blocks"], kept, method="enumerated",
                               groups=groups)
        return name, path

    def finetune(self, name, pruned, steps, folder):
        """train_masked_kd.py with the repo's masked-KD defaults, the demo's lr/EMA and this study's budget."""
        final = os.path.join(folder, "student.safetensors")
        a = self.args
        with quiet(os.path.join(folder, "finetune.log")):
            train_masked_kd.main([
                "--model", name, "--load-weight", pruned, "--teacher", "DiT-Tiny/2", "--load-teacher", TEACHER,
                "--data-path", self.data, *COMMON, "--max-steps", str(steps), "--global-batch-size", str(a.batch),
                "--lr", str(a.lr), "--lr-min", str(a.lr / 10), "--ema-decay", str(a.ema_decay), "--num-workers", "0",
                "--log-every", str(steps), "--ckpt-every", str(steps), "--global-seed", "0", "--results-dir", folder,
                "--prefix", "kd", "--save-model", final, "--device", "cpu"])
        shutil.rmtree(os.path.join(folder, "kd", "checkpoints"), ignore_errors=True)
        return final

    def quality(self, model):
        """Held-out loss, then FID/IS/P/R on digit-classifier features and class accuracy of fixed-seed samples."""
        a = self.args
        out = {"heldout_loss": self.fixed_loss(model, *self.held_out, repeats=a.heldout_repeats)}
        if a.samples:
            labels = np.arange(a.samples) % 10
            images = sample_digits(model, labels, num_steps=a.sampling_steps, cfg_scale=a.cfg, seed=0)
            out["class_acc"] = class_accuracy(self.extractor, images, labels)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "samples.npz")
                write_sample_batch(path, images)
                out.update({k: v for k, v in evaluate(self.ref, path, self.extractor).items() if v is not None})
        return out

    def subnet(self, kept, pattern, budget):
        """One row: calibration loss after pruning, and the quality after `budget` fine-tuning steps; None when
        another live process is fine-tuning this subnet."""
        start = time.time()
        folder = os.path.join(self.work, "subnets", pattern.replace(":", "-"), "-".join(map(str, kept)))
        if budget and not claim_finetune(os.path.join(folder, f"ft{budget}")):
            return None
        name, pruned = self.prune(kept, pattern, folder)
        model = create_model(name, (1, 8, 8), 10, pruned)
        row = {"pattern": pattern, "kept": list(kept), "budget": budget,
               "calib_loss": self.fixed_loss(model, *self.calib)}
        if budget == 0:
            row["heldout_loss"] = self.fixed_loss(model, *self.held_out, repeats=self.args.heldout_repeats)
        else:
            ckpt = self.finetune(name, pruned, budget, os.path.join(folder, f"ft{budget}"))
            row.update(self.quality(create_model(name, (1, 8, 8), 10, ckpt)))
        row["seconds"] = round(time.time() - start, 1)
        return row


def claim_finetune(folder):
    """Free `folder` for a new fine-tuning run: False when a live process holds its run lock (the trainer
    flocks <run>/.lock while it lives), else any leftover of a killed run is removed (rows are only written
    when a subnet is finished, so nothing measured is lost)."""
    import fcntl
    lock = os.path.join(folder, "kd", ".lock")
    if os.path.isfile(lock):
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(f, fcntl.LOCK_UN)
    shutil.rmtree(folder, ignore_errors=True)
    return True


def run_subnets(study, rows, jobs, desc):
    """Evaluate (kept, pattern, budget) jobs not yet in `rows`, with a progress bar. Budget-0 rows (calibration
    and held-out loss right after pruning) do not depend on the fine-tuning and sampling settings."""
    own = lambda budget: study.args.finetune_settings if budget else {}  # noqa: E731
    todo = [j for j in jobs if rows.find(own(j[2]), kept=list(j[0]), pattern=j[1], budget=j[2]) is None]
    bar = tqdm(todo, desc=desc, unit="subnet", disable=study.args.quiet)
    for kept, pattern, budget in bar:
        rows.reload()  # another process may have done it meanwhile
        if rows.find(own(budget), kept=list(kept), pattern=pattern, budget=budget) is None:
            row = study.subnet(kept, pattern, budget)
            if row is None:  # another process is on it
                continue
            row = rows.add(row, own(budget))
            bar.set_postfix(kept=",".join(map(str, kept)), FID=f"{row.get('FID', float('nan')):.1f}")


def part_enumerate(study, rows):
    """Most important first: the 1:2 calibration losses, all 1:2 subnets at the main budget (in a random
    order, so that a partial run is a random subset), a calibration-stratified subset of them at the
    further budgets, then the other patterns. --worker i/n takes every n-th job of each stage, so n
    processes share the work without doing anything twice."""
    args = study.args
    i, n = (int(v) for v in args.worker.split("/"))
    rng = np.random.default_rng(0)
    main_budget, *more = args.budgets
    subnets = [all_subnets("1:2")[j] for j in rng.permutation(64)][:args.limit]
    run_subnets(study, rows, [(k, "1:2", 0) for k in subnets][i::n], "1:2 calibration loss")
    run_subnets(study, rows, [(k, "1:2", main_budget) for k in subnets][i::n], f"1:2 x {main_budget} steps")
    if more:
        part_further(study, rows, subnets, i, n)
    for pattern in args.patterns[1:]:
        others = all_subnets(pattern)
        others = [others[j] for j in rng.permutation(len(others))][:args.limit]
        if args.reverse:  # a second process working from the other end of the same list
            others = others[::-1]
        run_subnets(study, rows, [(k, pattern, 0) for k in others][i::n], f"{pattern} calibration loss")
        run_subnets(study, rows, [(k, pattern, main_budget) for k in others][i::n],
                    f"{pattern} x {main_budget} steps")


def part_further(study, rows, subnets=None, i=0, n=1, reverse=False):
    """The further budgets on a subset of the 1:2 subnets spread evenly over the calibration-loss ranking."""
    args = study.args
    subnets = subnets or all_subnets("1:2")
    run_subnets(study, rows, [(k, "1:2", 0) for k in subnets], "1:2 calibration loss (rest)")
    rows.reload()
    by_calib = sorted(subnets, key=lambda k: rows.find(kept=k, pattern="1:2", budget=0)["calib_loss"])
    subset = by_calib[::max(1, len(by_calib) // args.subset)][:args.subset]
    jobs = [(k, "1:2", b) for b in args.budgets[1:] for k in subset][i::n]
    run_subnets(study, rows, jobs[::-1] if reverse else jobs, f"1:2 subset x {args.budgets[1:]} steps")


# ----------------------------------------------------------------------------- methods

def search(study, name, seed):
    pattern, update, lr, steps, _, extra = SEARCHES[name]
    steps = study.args.search_steps or steps
    folder = os.path.join(study.work, "searches", name.replace(" ", "_").replace(":", "-"), f"seed{seed}")
    path = os.path.join(folder, "pruned.pt")
    start = time.time()
    argv = ["--model", "DiT-Tiny/2", *COMMON, "--groups", pattern, "--load-weight", TEACHER, "--data-path",
            study.data, *UPDATES[update], "--max-steps", str(steps), "--global-batch-size", "64", "--lr", str(lr),
            "--precision", "fp32", "--num-workers", "0", "--log-every", "10", "--global-seed", str(seed),
            "--results-dir", folder, "--prefix", "search", "--save-model", path, "--device", "cpu",
            "--ckpt-every", "10", "--resume", "auto", *extra]
    ckpt_dir = os.path.join(folder, "search-DiT-Tiny-2", "checkpoints")
    if os.path.isdir(ckpt_dir) and not same_run(ckpt_dir, argv):
        shutil.rmtree(folder)  # a killed search with other settings: start it afresh
    with quiet(os.path.join(folder, "search.log")):
        prune_by_learning.main(argv)  # continues a killed search from its last checkpoint (every 10 steps)
    with open(os.path.splitext(path)[0] + ".json") as f:
        record = json.load(f)
    return {"gate_logits": gate_logits(ckpt_dir), **{"kind": "search", "name": name, "seed": seed, "pattern": pattern, "update": update, "lr": lr,
            "steps": steps, "extra": extra, "kept": record["kept"], "confidence": record["confidence"],
            "history": record["history"], "figure": record["decision_figure"],
            "seconds": round(time.time() - start, 1)}}


def same_run(ckpt_dir, argv):
    """Whether the checkpoints in `ckpt_dir` were made by prune_by_learning.py with these arguments."""
    names = sorted(os.listdir(ckpt_dir))
    if not names:
        return True
    saved = torch.load(os.path.join(ckpt_dir, names[-1]), map_location="cpu", weights_only=False)["args"]
    wanted = vars(prune_by_learning.build_parser().parse_args(argv))
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731  (tuples vs lists)
    return all(norm(saved[k]) == norm(v) for k, v in wanted.items() if k in saved and k != "resume")


def gate_logits(ckpt_dir):
    """{step: {"raw": [...], "ema": [...]}}: the gate logits of the searched model and of its EMA copy (the
    decision) every 10 steps, read from the training checkpoints, which are then deleted."""
    out = {}
    for name in sorted(os.listdir(ckpt_dir)):
        ckpt = torch.load(os.path.join(ckpt_dir, name), map_location="cpu", weights_only=False)
        logits = {kind: sorted((k for k in ckpt[key] if k.startswith("layer_mask.logits.")),
                               key=lambda k: int(k.rsplit(".", 1)[1])) for kind, key in (("raw", "model"), ("ema", "ema"))}
        out[int(name.split(".")[0])] = {kind: [[round(v, 6) for v in ckpt[key][k].tolist()] for k in logits[kind]]
                                        for kind, key in (("raw", "model"), ("ema", "ema"))}
    shutil.rmtree(ckpt_dir)
    return out


def score(study, method):
    folder = os.path.join(study.work, "scores")
    path = os.path.join(folder, f"{method}.pt")
    with quiet(os.path.join(folder, f"{method}.log")):
        prune_by_score.main(prune_by_score.build_parser().parse_args([
            "--model", "DiT-Tiny/2", "--ckpt", TEACHER, *COMMON, "--method", method, "--n-pruned", "6",
            "--data-path", study.data, "--nsamples", "256", "--batch-size", "64", "--seed", "0",
            "--save-model", path, "--device", "cpu"]))
    with open(os.path.splitext(path)[0] + ".json") as f:
        record = json.load(f)
    return {"kind": "score", "name": method, "kept": record["kept"], "importance": record["importance"]}


def constrained_pick(importance, pattern):
    """A score method's pick inside an N:M pattern: the N most important blocks of each group."""
    kept = []
    for (n, m), start in zip(parse_groups(pattern, DEPTH), range(0, DEPTH, parse_groups(pattern, DEPTH)[0][1])):
        group = sorted(range(start, start + m), key=lambda i: (-importance[i], i))[:n]
        kept += sorted(group)
    return kept


def extra_jobs(args, methods):
    """Picks outside the 1:2 family (unconstrained score picks, 2:4 / 6:12 decisions) at the main budget."""
    jobs = []
    for r in methods.rows:
        if len(r["kept"]) == 6 and not fits(r["kept"], "1:2"):
            pattern = r["pattern"] if r["kind"] == "search" else "1:2"  # 1:2 pairs give the even KD layer map
            jobs.append((r["kept"], pattern, args.budgets[0]))
    return jobs


def part_teacher(study, rows):
    """The unpruned teacher under the same held-out loss and sample budget: the scale of every FID here."""
    key = dict(kept=list(range(DEPTH)), pattern="teacher", budget=0)
    if rows.find(study.args.finetune_settings, **key) is None:
        start = time.time()
        model = create_model("DiT-Tiny/2", (1, 8, 8), 10, TEACHER)
        row = {**key, "calib_loss": study.fixed_loss(model, *study.calib), **study.quality(model)}
        rows.add({**row, "seconds": round(time.time() - start, 1)}, study.args.finetune_settings)


def part_methods(study, methods, rows):
    args = study.args
    for method in tqdm(args.scores, desc="score baselines", disable=args.quiet):
        if methods.find(kind="score", name=method) is None:
            methods.add(score(study, method))
    names = [n for n in SEARCHES if not args.searches or n in args.searches]
    todo = [(n, s) for n in names for s in SEARCHES[n][4]
            if methods.find({"search": SEARCHES[n]}, kind="search", name=n, seed=s) is None]
    todo.sort(key=lambda job: SEARCHES[job[0]][4].index(job[1]))  # seed-major: a partial run has whole tables
    for name, seed in tqdm(todo, desc="searches", disable=args.quiet):
        methods.reload()  # another process may have run it meanwhile (--searches splits the work)
        if methods.find({"search": SEARCHES[name]}, kind="search", name=name, seed=seed) is None:
            methods.add(search(study, name, seed), {"search": SEARCHES[name]})
    run_subnets(study, rows, extra_jobs(args, methods), "picks outside 1:2")


# ----------------------------------------------------------------------------- main

def settings_of(args):
    kd_defaults = vars(train_masked_kd.build_parser().parse_args(["--data-path", "-", "--load-teacher", "-"]))
    kd_defaults = {k: v for k, v in kd_defaults.items() if k not in ("data_path", "load_teacher")}
    # Each kind of row hashes the code it runs: fine-tuning (DiT's objective and official KD terms in
    # families/dit.py, KD, trainer), searches (mask, trainer).
    sha = lambda *paths: {p: file_sha(os.path.join(ROOT, p)) for p in paths}  # noqa: E731
    finetune_code = sha("tinyfusion/families/dit.py", "tinyfusion/kd.py", "tinyfusion/trainer.py",
                        "diffusion/gaussian_diffusion.py", "diffusion/losses.py")
    search_code = sha("tinyfusion/mask_learning.py", "models/layer_mask.py", "tinyfusion/trainer.py")
    teacher = file_sha(TEACHER)
    return {
        "subnets": {"teacher": teacher, "calib_items": args.calib_items, "heldout_repeats": args.heldout_repeats},
        "finetune": {"batch": args.batch, "lr": args.lr, "ema_decay": args.ema_decay, "samples": args.samples,
                     "sampling_steps": args.sampling_steps, "cfg": args.cfg, "kd_defaults": kd_defaults,
                     "code": finetune_code},
        "methods": {"teacher": teacher, "search_steps": args.search_steps, "code": search_code},
    }


def git_commit():
    """The code's commit (recorded beside the settings, not hashed: a new commit alone does not refuse rows)."""
    import subprocess
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["enumerate", "calibration", "further", "methods", "teacher", "report", "all"], default="all")
    parser.add_argument("--results", default=os.path.join(ROOT, "studies", "results"),
                        help="folder of the result rows (JSONL) and the report")
    parser.add_argument("--figures", default=os.path.join(ROOT, "studies", "figures"))
    parser.add_argument("--work", default=os.path.join(ROOT, "outputs", "studies"), help="scratch: subnets, logs")
    parser.add_argument("--patterns", nargs="+", default=["1:2", "1:4"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[50, 200, 1000],
                        help="fine-tuning steps: the first on every subnet, the others on --subset subnets")
    parser.add_argument("--subset", type=int, default=8, help="1:2 subnets (spread over calibration loss) for "
                                                               "the further budgets")
    parser.add_argument("--limit", type=int, default=None, help="only N subnets (a seeded random choice) per "
                                                                "pattern (tests)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.9,
                        help="EMA of the fine-tuning (0.99 keeps 60 %% of the pruned weights after 50 steps)")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--calib-items", type=int, default=512)
    parser.add_argument("--heldout-repeats", type=int, default=2)
    parser.add_argument("--worker", default="0/1", help="i/n: this process does every n-th subnet (from i)")
    parser.add_argument("--scores", nargs="*", default=list(SCORES), choices=SCORES, help="score baselines to run")
    parser.add_argument("--searches", nargs="*", default=None, help="only these SEARCHES names (tests)")
    parser.add_argument("--search-steps", type=int, default=None, help="override every search's length (tests)")
    parser.add_argument("--reverse", action="store_true", help="enumerate the patterns after the first from "
                                                                "the end (a second process sharing the work)")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    for p in args.patterns:
        parse_groups(p, DEPTH)  # a bad pattern fails here, before any work
    if not os.path.isfile(TEACHER):
        raise UserError(f"{TEACHER} is missing: rebuild it with the train.py command in assets/README.md")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.makedirs(args.results, exist_ok=True)
    settings = settings_of(args)
    args.finetune_settings = settings["finetune"]
    rows = Rows(os.path.join(args.results, "subnets.jsonl"), settings["subnets"])
    methods = Rows(os.path.join(args.results, "methods.jsonl"), settings["methods"])
    if args.part != "report":  # a record of the settings behind the rows this run adds
        with open(os.path.join(args.results, f"settings-{rows.hash()}-{methods.hash()}.json"), "w") as f:
            json.dump({**settings, "commit": git_commit()}, f, indent=1)
    if args.part in ("enumerate", "all"):
        part_enumerate(Study(args), rows)
    if args.part in ("methods", "all"):
        part_methods(Study(args), methods, rows)
    if args.part == "calibration":  # only the budget-0 rows (calibration and held-out loss) of --patterns
        study = Study(args)
        for pattern in args.patterns:
            run_subnets(study, rows, [(k, pattern, 0) for k in all_subnets(pattern)], f"{pattern} calibration loss")
    if args.part == "further":  # only the further budgets (a separate process, from the end of the list)
        part_further(Study(args), rows, reverse=True)
    if args.part in ("teacher", "all"):
        part_teacher(Study(args), rows)
    if args.part in ("report", "all"):
        from studies.report import write_report
        rows.reload()
        methods.reload()
        write_report(args, rows.rows, methods.rows)


if __name__ == "__main__":
    run_main(main)

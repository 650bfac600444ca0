"""MAR through the shared scripts: objective draws and loss, KD terms, train.py, prune_by_learning / index /
score, sample.py and sample_ddp.py, and their errors. The model is a tiny 'MAR-B' (width 32, 2 + 2 blocks,
1-block DiffLoss) patched into the registry for this module, on 64 px = 4x4 tokens of 16 channels."""
import copy
import functools
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import models.mar as mar
from core.errors import UserError
from models import MAR_models, build_model
from models.layer_mask import LayerMask, attach_layer_mask
from tinyfusion.checkpoint import read_weights, save_weights
from tinyfusion.cli import create_model
from tinyfusion.families import family_for
from tinyfusion.families.mar import MARObjective, mar_kd_terms, mar_param_groups, masked_token_mean
from tinyfusion.synthetic import write_feature_store

SHAPE = (16, 4, 4)  # KL-16 latents of 64 px images
SIZE = ["--image-size", "64", "--num-classes", "4"]
TINY_KL16 = dict(embed_dim=16, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(), resolution=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Patch 'MAR-B' (and its pruned names) to a tiny size; write a store and train a checkpoint with train.py."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(mar.SIZES, "B", (32, 2, 2, 1, 32))  # width, blocks per stack, heads, DiffLoss depth, width
        mp.setitem(MAR_models, "MAR-B", mar._constructor("B"))
        root = tmp_path_factory.mktemp("mar")
        rng = np.random.default_rng(0)
        labels = np.arange(64) % 4
        centers = rng.normal(size=(4, *SHAPE)).astype(np.float32)
        latents = centers[labels] + 0.1 * rng.normal(size=(64, *SHAPE)).astype(np.float32)
        store = write_feature_store(str(root / "store"), latents, labels, num_classes=4, vae="kl16", image_size=64)
        ckpt = str(root / "trained.pt")
        log = train(store, root / "train", steps=100, extra=["--save-model", ckpt, "--ema-decay", "0"])
        yield type("Tiny", (), dict(root=root, store=store, ckpt=ckpt, log=log))


def train(store, out, steps, extra=()):
    import train as train_script
    train_script.main(["--model", "MAR-B", "--data-path", store, "--results-dir", str(out), "--prefix", "run",
                       "--max-steps", str(steps), "--global-batch-size", "8", "--lr", "2e-3", "--log-every", "1",
                       "--ckpt-every", "1000", "--num-workers", "0", "--grad-clip", "3.0", *SIZE, *extra])
    return os.path.join(out, "run", "log.txt")


def tiny_model(**kw):
    return mar.MAR(img_size=64, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, decoder_embed_dim=32,
                   decoder_depth=2, decoder_num_heads=2, buffer_size=4, diffloss_d=1, diffloss_w=32, class_num=4, **kw)


def randomize_diffloss_output(model):
    for p in model.diffloss.net.final_layer.parameters():  # the released init outputs zeros: make it non-trivial
        torch.nn.init.normal_(p, std=0.1)


# ---------------------------------------------------------------------------------------------- objective
def test_draws_follow_mars_laws():
    obj = MARObjective((16, 16, 16))  # 256 tokens, as the real model
    g = torch.Generator().manual_seed(0)
    a = (0.7 - 1) / 0.25
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    mean = 1 + 0.25 * (phi(a) - phi(0)) / (Phi(0) - Phi(a))  # closed-form truncated-normal mean (~0.867)
    fracs, drops = [], []
    for i in range(1500):
        d = obj.draw(3, g)
        counts = d["mask"].sum(1)
        assert torch.equal(counts, counts[:1].expand(3))  # one ratio for the whole (global) batch
        if i < 10:
            assert all(sorted(row.tolist()) == list(range(256)) for row in d["orders"])
            n = int(counts[0])
            for row in range(3):  # the masked tokens are the first n of each order
                assert set(torch.nonzero(d["mask"][row]).flatten().tolist()) == set(d["orders"][row, :n].tolist())
        fracs.append(float(counts[0]) / 256)
        drops += d["drop"].tolist()
    assert min(fracs) >= math.ceil(0.7 * 256) / 256 and max(fracs) <= 1.0
    assert abs(np.mean(fracs) - (mean + 0.5 / 256)) < 0.006  # ceil adds ~half a token
    assert abs(np.mean(drops) - 0.1) < 0.015
    d = family_for("MAR-B").objective((16, 16, 16), class_dropout_prob=0.0).draw(500, g)
    assert not d["drop"].any() and d["orders"].shape == (500, 256)


def test_loss_is_the_masked_token_mean_and_does_not_depend_on_the_split():
    torch.manual_seed(0)
    model = tiny_model().eval()
    randomize_diffloss_output(model)
    obj = MARObjective(SHAPE, label_drop_prob=0.5)
    x, y = torch.randn(4, *SHAPE), torch.tensor([0, 1, 2, 3])
    d = obj.draw(4, torch.Generator().manual_seed(3))
    loss = obj.loss(model, x, y, d, 0)[0].detach()
    assert loss.shape == (4,)
    # Reference: each sample alone, its t / noise drawn from its seed as (mul, L) and (mul, L, C), the
    # DiffLoss loss averaged over its masked rows; then the mean over samples.
    per = []
    for b in range(4):
        g = torch.Generator().manual_seed(int(d["seed"][b]))
        t, noise = torch.randint(0, 1000, (4, 16), generator=g), torch.randn(4, 16, 16, generator=g)
        f = model.forward_features(x[b:b + 1], y[b:b + 1], {k: d[k][b:b + 1] for k in ("orders", "mask", "drop")})
        rows = model.diffloss.train_diffusion.training_losses(
            model.diffloss.net, f["target"][0].repeat(4, 1), t.flatten(), dict(c=f["z"][0].repeat(4, 1)),
            noise=noise.reshape(64, 16))["loss"]
        m = d["mask"][b].repeat(4)
        per.append(((rows * m).sum() / m.sum()).item())
    assert loss[0].item() == pytest.approx(np.mean(per), rel=1e-5)
    with torch.no_grad():
        halves = [obj.loss(model, x[s], y[s], {k: v[s] for k, v in d.items()}, 0)[0].mean()
                  for s in (slice(0, 2), slice(2, 4))]
    assert loss.mean().item() == pytest.approx(float(sum(halves) / 2), rel=1e-5)  # 2 ranks x 2 == 1 x 4


def test_kd_terms_share_all_randomness():
    torch.manual_seed(0)
    teacher = tiny_model().eval()
    randomize_diffloss_output(teacher)
    student = copy.deepcopy(teacher)
    x, y = torch.randn(3, *SHAPE), torch.tensor([0, 1, 3])
    d = MARObjective(SHAPE, label_drop_prob=0.5).draw(3, torch.Generator().manual_seed(1))
    out = mar_kd_terms(student, teacher, x, y, d, student_layers=[1, 3], teacher_layers=[1, 3])
    for a, b in (("student_z", "teacher_z"), ("student_out", "teacher_out")):
        torch.testing.assert_close(out[a], out[b], rtol=0, atol=1e-6)
    assert out["student_out"].shape == (3, 4, 16, 32) and out["student_z"].shape == (3, 16, 32)
    visible = 16 - int(d["mask"][0].sum())
    assert out["student_hidden"][1].shape == (3, 4 + visible, 32) and out["teacher_hidden"][3].shape == (3, 20, 32)
    torch.testing.assert_close(out["student_hidden"][3], out["teacher_hidden"][3])
    torch.testing.assert_close(out["student_loss"], MARObjective(SHAPE).loss(student, x, y, d, 0)[0])
    torch.testing.assert_close(out["teacher_z"], teacher.forward_features(x, y, d)["z"])
    out["student_loss"].mean().backward()
    assert student.z_proj.weight.grad is not None and teacher.z_proj.weight.grad is None
    # A different student: z differs, and masked_token_mean matches a hand-written masked average.
    torch.nn.init.zeros_(student.decoder_blocks[0].mlp.fc2.weight)
    out = mar_kd_terms(student, teacher, x, y, d)
    err = ((out["student_z"] - out["teacher_z"]) ** 2).mean(-1).detach()
    assert err.abs().sum() > 0
    expected = [float(err[b][d["mask"][b] == 1].mean()) for b in range(3)]
    torch.testing.assert_close(masked_token_mean(err, d["mask"]), torch.tensor(expected))


def test_param_groups_follow_mars_weight_decay_rule():
    model = tiny_model()
    decay, no_decay = mar_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)] for p in decay["params"]}
    blocks = {f"{s}_blocks.{i}.{w}.weight" for s in ("encoder", "decoder") for i in range(2)
              for w in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert got == blocks | {"class_emb.weight", "fake_latent", "z_proj.weight", "encoder_pos_embed_learned",
                            "mask_token", "decoder_embed.weight", "decoder_pos_embed_learned",
                            "diffusion_pos_embed_learned"}  # mar.md section 6
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert (decay["weight_decay"], no_decay["weight_decay"], decay["betas"]) == (0.02, 0.0, (0.9, 0.95))


# ---------------------------------------------------------------------------------------------- train.py
def losses(log):
    return [float(line.split("loss ")[1].split(",")[0]) for line in open(log) if "(step=" in line]


def test_train_loss_falls(tiny):
    curve = losses(tiny.log)
    assert len(curve) == 100
    assert np.mean(curve[-15:]) < 0.7 * np.mean(curve[:15]), (curve[:15], curve[-15:])
    assert create_model("MAR-B", SHAPE, 4, tiny.ckpt).depth == 4  # the saved weights load strictly


def test_resume_is_exact(tiny, tmp_path):
    """Run a does 4 steps; run b restarts from a's step-2 checkpoint (dropout, drops, orders, t, noise all redrawn)."""
    train(tiny.store, tmp_path / "a", steps=4, extra=["--ckpt-every", "2"])
    os.makedirs(tmp_path / "b" / "run" / "checkpoints")
    shutil.copy(tmp_path / "a" / "run" / "checkpoints" / "0000002.pt", tmp_path / "b" / "run" / "checkpoints")
    train(tiny.store, tmp_path / "b", steps=4, extra=["--resume", "auto"])
    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "0000004.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "run" / "checkpoints" / "0000004.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- pruning
def pinned_full_model(ckpt, kept):
    full = create_model("MAR-B", SHAPE, 4, ckpt).eval()
    mask = LayerMask([(4, 4)])
    attach_layer_mask(full, mask)
    return full, mask.masks(torch.tensor([float(i in kept) for i in range(4)]))


def assert_matches_masked_full(ckpt, pruned_path, kept):
    record = json.load(open(os.path.splitext(pruned_path)[0] + ".json"))
    pruned = create_model(record["pruned_model"], SHAPE, 4, pruned_path).eval()  # strict load
    full, pinned = pinned_full_model(ckpt, kept)
    obj = MARObjective(SHAPE)
    x, y = torch.randn(4, *SHAPE), torch.tensor([0, 1, 2, 3])
    d = obj.draw(4, torch.Generator().manual_seed(7))
    with torch.no_grad(), pinned:
        ref = full.forward_features(x, y, d)["z"], obj.loss(full, x, y, d, 0)[0]
    got = pruned.forward_features(x, y, d)["z"], obj.loss(pruned, x, y, d, 0)[0]
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    return record


def test_prune_by_learning_end_to_end(tiny, tmp_path):
    from prune_by_learning import main as prune_main
    out = tmp_path / "pruned.pt"
    prune_main(["--model", "MAR-B", "--groups", "1:2", "--load-weight", tiny.ckpt, "--data-path", tiny.store, *SIZE,
                "--num-workers", "0", "--global-batch-size", "8", "--max-steps", "6", "--precision", "fp32",
                "--delta-w", "--lora", "--lora-rank", "2", "--log-every", "3", "--results-dir", str(tmp_path),
                "--save-model", str(out)])
    record = json.load(open(tmp_path / "pruned.json"))
    kept = record["kept"]
    assert len(kept) == 2 and kept[0] in (0, 1) and kept[1] in (2, 3)  # one encoder + one decoder block
    assert record["pruned_model"] == "MAR-B-D2"
    assert_matches_masked_full(tiny.ckpt, str(out), kept)


def test_train_masked_kd_end_to_end(tiny, tmp_path):
    """MAR student (1+1 blocks) distilled from the trained 2+2 teacher; the layer map comes from the record."""
    from prune_by_index import build_parser, main as index_main
    from train_masked_kd import main as kd_main
    student = str(tmp_path / "student.pt")
    index_main(build_parser().parse_args(["--model", "MAR-B", "--ckpt", tiny.ckpt, "--kept-indices", "[1, 3]",
                                          "--save-model", student, *SIZE]))
    kd_main(["--model", "MAR-B-D2", "--load-weight", student, "--teacher", "MAR-B", "--load-teacher", tiny.ckpt,
             "--data-path", tiny.store, *SIZE, "--num-workers", "0", "--global-batch-size", "8", "--max-steps", "3",
             "--log-every", "1", "--results-dir", str(tmp_path), "--prefix", "kd"])
    log = open(tmp_path / "kd" / "log.txt").read()
    assert "layer map [(0, 1), (1, 3)]" in log and "(step=0000003)" in log


@pytest.mark.parametrize("kept,name", [([1, 2], "MAR-B-D2"), ([0, 1, 3], "MAR-B-E2D1")])
def test_prune_by_index(tiny, tmp_path, kept, name):
    from prune_by_index import build_parser, main
    out = str(tmp_path / "idx.pt")
    main(build_parser().parse_args(["--model", "MAR-B", "--ckpt", tiny.ckpt, "--kept-indices", str(kept),
                                    "--save-model", out, *SIZE]))
    record = assert_matches_masked_full(tiny.ckpt, out, kept)
    assert record["pruned_model"] == name
    orig, pruned = read_weights(tiny.ckpt), read_weights(out)
    enc = [i for i in kept if i < 2]
    assert torch.equal(pruned["encoder_blocks.0.attn.qkv.weight"], orig[f"encoder_blocks.{enc[0]}.attn.qkv.weight"])


@pytest.mark.parametrize("method", ["bi", "sensitivity"])
def test_prune_by_score_finds_an_identity_block(tiny, tmp_path, method):
    from prune_by_score import build_parser, main
    sd = read_weights(tiny.ckpt)
    for k in ("encoder_blocks.1.attn.proj", "encoder_blocks.1.mlp.fc2"):  # block 1 becomes the identity
        sd[k + ".weight"].zero_()
        sd[k + ".bias"].zero_()
    save_weights(sd, tmp_path / "planted.pt")
    out = str(tmp_path / "score.pt")
    main(build_parser().parse_args(["--model", "MAR-B", "--ckpt", str(tmp_path / "planted.pt"), "--save-model", out,
                                    "--n-pruned", "1", "--method", method, "--data-path", tiny.store,
                                    "--nsamples", "8", "--batch-size", "4", "--device", "cpu", *SIZE]))
    record = json.load(open(tmp_path / "score.json"))
    assert record["removed"] == [1] and record["pruned_model"] == "MAR-B-E1D2"
    assert abs(record["importance"][1]) < 1e-5 and min(record["importance"][i] for i in (0, 2)) > 1e-4


# ---------------------------------------------------------------------------------------------- sampling
@pytest.fixture
def kl16(tmp_path, monkeypatch):
    """A tiny random KL-16 (stride 16) saved as MAR's {'model': ...}; load_kl16 builds that config."""
    import models.kl16 as kl
    torch.manual_seed(0)
    path = str(tmp_path / "kl16.ckpt")
    torch.save({"model": kl.AutoencoderKL(**TINY_KL16).state_dict()}, path)
    monkeypatch.setattr(kl, "load_kl16", functools.partial(kl.load_kl16, **TINY_KL16))
    return path


def sample_argv(tiny, kl16, out, *extra):
    return ["--model", "MAR-B", "--ckpt", tiny.ckpt, "--vae", kl16, "--num-iter", "4", "--cfg-scale", "3.0",
            "--cfg-schedule", "linear", "--class-labels", "0", "1", "2", "3", "--out", str(out), "--device", "cpu",
            *SIZE, *extra]


def test_sample_py(tiny, kl16, tmp_path):
    from sample import main
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        main(sample_argv(tiny, kl16, tmp_path / f"{name}.png", "--seed", seed))
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert a.shape == (64 + 4, 4 * 64 + 5 * 2, 3)  # 4 decoded 64 px images in a row, make_grid padding 2
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sampler_gives_kl16_latents(tiny):
    from types import SimpleNamespace

    model = create_model("MAR-B", SHAPE, 4, tiny.ckpt).eval()
    sampler = family_for("MAR-B").sampler(SimpleNamespace(num_iter=3, cfg_schedule="constant", temperature=1.0))
    torch.manual_seed(0)
    z = sampler(model, torch.randn(2, *SHAPE), torch.tensor([1, 2]), 2.0)
    assert z.shape == (2, *SHAPE) and torch.isfinite(z).all()


def test_sample_ddp(tiny, kl16, tmp_path):
    if not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(__file__)), "sample_ddp.py")):
        pytest.skip("sample_ddp.py not written yet")
    from sample_ddp import main
    arrays = []
    for run in ("a", "b"):  # two runs in one process: numpy's global state differs, the samples must not
        out = str(tmp_path / f"{run}.npz")
        main(["--model", "MAR-B", "--ckpt", tiny.ckpt, "--vae", kl16, "--num-iter", "2", "--cfg-scale", "2.0",
              "--num-fid-samples", "3", "--per-proc-batch-size", "2", "--sample-dir", str(tmp_path / run),
              "--out", out, "--device", "cpu", *SIZE])
        arrays.append(np.load(out)["arr_0"])
    assert arrays[0].shape == (3, 64, 64, 3) and arrays[0].dtype == np.uint8
    assert np.array_equal(arrays[0], arrays[1])


# ---------------------------------------------------------------------------------------------- errors
def test_errors(tiny, kl16, tmp_path):
    from sample import main
    dit = str(tmp_path / "dit.pt")
    save_weights(build_model("DiT-S-D2/2", input_size=8, num_classes=4).state_dict(), dit)
    cases = [
        (["--ckpt", dit], "DiT/SiT checkpoint"),
        (["--num-iter", "17"], "num_iter 17"),
        (["--cfg-schedule", "cosine"], "linear, constant"),
        (["--vae", "mse"], "kl16.ckpt"),
        (["--image-size", "72"], "multiple of 16"),
    ]
    for extra, message in cases:
        with pytest.raises(UserError, match=message):
            main(sample_argv(tiny, kl16, tmp_path / "x.png", *extra))
    with pytest.raises(UserError, match="MAR checkpoint"):  # the reverse: MAR weights for a DiT
        main(["--model", "DiT-S-D2/2", "--ckpt", tiny.ckpt, "--image-size", "64", "--num-classes", "4",
              "--vae", "none", "--class-labels", "0", "1"])
    dit_store = write_feature_store(str(tmp_path / "dit_store"), np.zeros((8, 4, 8, 8)), np.arange(8) % 4,
                                    num_classes=4, vae="ema", image_size=64)
    with pytest.raises(UserError, match=r"\(16, 4, 4\)"):
        train(dit_store, tmp_path / "t", steps=1)
    from prune_by_score import build_parser, main as score_main
    with pytest.raises(UserError, match="output-error"):
        score_main(build_parser().parse_args(["--model", "MAR-B", "--ckpt", tiny.ckpt, "--save-model", "x.pt",
                                              "--n-pruned", "1", "--method", "output-error", *SIZE]))
    assert not os.path.exists("x.pt")

"""Text-conditioned feature stores (PixArt, SD3) and KL-16 stores for MAR, end to end with tiny local models:
store layout and values against the pipelines' own encode_prompt and diffusers' VAE, resume after a kill,
bad inputs, one training step per family on the store, and MAR training on a KL-16 moments store."""
import json
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tiny_text import pixart_pipeline, save_random_image, sd3_pipeline
from tinyfusion.data import open_captioned_images, open_feature_store, open_image_folder
from core.errors import UserError
from tinyfusion.features import extract_features, image_seed
from tinyfusion.runtime import Runtime
from tinyfusion.trainer import GlobalBatchSampler, TrainConfig, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
CAPTIONS = ["a photo of a cat", "a red dog on the grass", "blue sky", "a small cat on a big dog", "dog"]
KW = dict(image_size=16, batch_size=2, num_workers=0, shard_size=2, global_seed=3, max_sequence_length=8)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Two tiny pipeline folders, 5 captioned images (one listed in a subfolder) and a reference store of each."""
    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    (root / "imgs" / "sub").mkdir(parents=True)
    lines = []
    for i, caption in enumerate(CAPTIONS):
        rel = f"sub/{i}.png" if i == 2 else f"{i}.png"
        save_random_image(root / "imgs" / rel, rng, 16, 40)
        lines.append(json.dumps({"image": rel, "caption": caption, "extra": i}))
    (root / "captions.jsonl").write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    pipes = {"pixart": pixart_pipeline(str(root / "pixart")), "sd3": sd3_pipeline(str(root / "sd3"))}
    for name, folder in pipes.items():
        extract_features(root / "imgs", root / f"store_{name}", captions=root / "captions.jsonl", pipeline=folder,
                         runtime=Runtime(), **KW)
    return root, pipes


def expected_latent(vae_folder, image, index, flip):
    """diffusers' own posterior sample with the store's per-image generator (image first, then the flip)."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    g = torch.Generator().manual_seed(image_seed(KW["global_seed"], index))
    with torch.no_grad():
        z = [vae.encode(x[None]).latent_dist.sample(generator=g) for x in (image, image.flip(-1))][flip][0]
    shift = vae.config.shift_factor or 0.0
    return (z - shift) * vae.config.scaling_factor


def direct_encoding(pipe_cls, folder, prompts):
    """The full pipeline (transformer and VAE included), loaded by diffusers itself, encoding the prompts."""
    pipe = pipe_cls.from_pretrained(folder, local_files_only=True)
    extra = [None, None] if pipe_cls.__name__ == "StableDiffusion3Pipeline" else []
    with torch.no_grad():
        return pipe.encode_prompt(prompts, *extra, do_classifier_free_guidance=False, device="cpu",
                                  max_sequence_length=8)


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_store_layout_and_values(text, family):
    from diffusers import PixArtAlphaPipeline, StableDiffusion3Pipeline
    root, pipes = text
    path = root / f"store_{family}"
    store = open_feature_store(path)
    m = store.manifest
    names = {"pixart": ("prompt_embeds", "prompt_attention_mask"), "sd3": ("prompt_embeds", "pooled_prompt_embeds")}
    assert len(store) == 5 and m["num_shards"] == 3 and m["format_version"] == 2 and m["conditioning"] == "text"
    assert store.cond_names == names[family] and "labels" not in m["shards"][0] and "num_classes" not in m
    assert m["text_encoder"] == {"pipeline": pipes[family], "max_sequence_length": 8, "dtype": "fp32",
                                 "pipeline_class": {"pixart": "PixArtAlphaPipeline",
                                                    "sd3": "StableDiffusion3Pipeline"}[family]}
    assert m["vae"] == os.path.join(pipes[family], "vae") and m["captions"] == str(root / "captions.jsonl")
    assert not any(f.startswith("labels") for f in os.listdir(path))
    cls = {"pixart": PixArtAlphaPipeline, "sd3": StableDiffusion3Pipeline}[family]
    direct = direct_encoding(cls, pipes[family], CAPTIONS + [""])
    expected = {"prompt_embeds": direct[0], ("prompt_attention_mask" if family == "pixart" else
                                             "pooled_prompt_embeds"): direct[1 if family == "pixart" else 2]}
    images = open_captioned_images(root / "imgs", root / "captions.jsonl", 16, downsample=2)
    for i in range(5):
        for flip in (0, 1):
            x, cond = store[(i, flip)]
            torch.testing.assert_close(x, expected_latent(os.path.join(pipes[family], "vae"), images[i][0], i, flip),
                                       rtol=1e-4, atol=1e-5)
            assert set(cond) == set(expected)
            for name, want in expected.items():
                assert cond[name].dtype == want.dtype  # float32 embeddings, int64 masks, as the pipeline makes them
                torch.testing.assert_close(cond[name], want[i], rtol=1e-5, atol=1e-6)
    null = store.null_cond()
    for name, want in expected.items():
        torch.testing.assert_close(null[name], want[5], rtol=1e-5, atol=1e-6)
    if family == "pixart":  # the padding is real: masks end in zeros; and T5 itself gives these embeddings
        assert store[4][1]["prompt_attention_mask"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
        from transformers import T5EncoderModel, T5Tokenizer
        tokens = T5Tokenizer.from_pretrained(os.path.join(pipes[family], "tokenizer"))(
            CAPTIONS[1], padding="max_length", max_length=8, return_tensors="pt")
        t5 = T5EncoderModel.from_pretrained(os.path.join(pipes[family], "text_encoder")).eval()
        with torch.no_grad():
            hidden = t5(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state[0]
        torch.testing.assert_close(store[1][1]["prompt_embeds"], hidden, rtol=1e-5, atol=1e-6)
        assert np.load(path / "prompt_attention_mask-00000.npy").dtype == np.int8
    else:
        assert m["shift_factor"] == pytest.approx(0.0609) and m["scale_factor"] == pytest.approx(1.5305)


def test_fp16_storage_and_limit(text, tmp_path):
    root, pipes = text
    extract_features(root / "imgs", tmp_path / "s", captions=root / "captions.jsonl", pipeline=pipes["pixart"],
                     runtime=Runtime(), dtype="fp16", limit=2, **KW)
    store, ref = open_feature_store(tmp_path / "s"), open_feature_store(root / "store_pixart")
    assert np.load(tmp_path / "s" / "prompt_embeds-00000.npy").dtype == np.float16
    assert store.manifest["cond"]["prompt_embeds"] == {"shape": [8, 32], "dtype": "float16"}
    for i, j in ((0, 0), (1, 2)):  # --limit 2 keeps lines 0 and 2 (evenly spaced)
        torch.testing.assert_close(store[i][1]["prompt_embeds"], ref[j][1]["prompt_embeds"], rtol=2e-3, atol=2e-3)
        assert torch.equal(store[i][1]["prompt_attention_mask"], ref[j][1]["prompt_attention_mask"])


def run_script(args, **env):
    return subprocess.run([sys.executable, os.path.join(ROOT, "extract_features.py"), *map(str, args)],
                          env={**ENV, **env}, capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_without_duplicates(text, tmp_path, capsys):
    root, pipes = text
    out = tmp_path / "killed"
    args = ["--data-path", root / "imgs", "--captions", root / "captions.jsonl", "--pipeline", pipes["sd3"],
            "--features-path", out, "--image-size", 16, "--batch-size", 1, "--num-workers", 0, "--shard-size", 2,
            "--global-seed", 3, "--max-sequence-length", 8]
    res = run_script(args, TINYFUSION_EXTRACT_EXIT_AT="1:1")  # shard 0 done, shard 1 half-written
    assert res.returncode == 17, res.stderr[-2000:]
    files = set(os.listdir(out))
    assert {"shard-00000.done", "latents-00000.npy", "prompt_embeds-00000.npy", "pooled_prompt_embeds-00000.npy",
            ".prompt_embeds-00001.partial.npy", ".latents-00001.partial.npy"} <= files
    assert "manifest.json" not in files and "shard-00001.done" not in files
    stat0 = os.stat(out / "prompt_embeds-00000.npy")
    extract_features(root / "imgs", out, captions=root / "captions.jsonl", pipeline=pipes["sd3"], runtime=Runtime(),
                     **KW)
    assert "1 already done" in capsys.readouterr().out
    assert os.stat(out / "prompt_embeds-00000.npy").st_mtime_ns == stat0.st_mtime_ns  # finished shard kept
    assert not any(f.endswith(".partial.npy") for f in os.listdir(out))
    store, ref = open_feature_store(out), open_feature_store(root / "store_sd3")
    assert len(store) == len(ref) == 5
    for i in range(5):
        for flip in (0, 1):
            (x, c), (rx, rc) = store[(i, flip)], ref[(i, flip)]
            torch.testing.assert_close(x, rx, rtol=1e-5, atol=1e-6)
            for name in rc:
                torch.testing.assert_close(c[name], rc[name], rtol=1e-5, atol=1e-6)
    # Another captions file under the same store is refused (its content is part of the store).
    (tmp_path / "other.jsonl").write_text(json.dumps({"image": "0.png", "caption": "a dog"}) + "\n")
    with pytest.raises(UserError, match="other settings.*captions"):
        extract_features(root / "imgs", out, captions=tmp_path / "other.jsonl", pipeline=pipes["sd3"],
                         runtime=Runtime(), **KW)


def test_bad_inputs_are_one_line_and_write_nothing(text, tmp_path, capsys, monkeypatch):
    root, pipes = text
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"

    def refused(match, captions=bad, pipeline=pipes["pixart"], **kw):
        with pytest.raises(UserError, match=match):
            extract_features(root / "imgs", out, captions=captions, pipeline=pipeline, runtime=Runtime(), **{**KW, **kw})
        assert not out.exists()

    bad.write_text(json.dumps({"image": "0.png", "caption": "a cat"}) + "\n" + json.dumps({"image": "1.png"}) + "\n")
    refused(r"bad.jsonl line 2 has no text field 'caption'")
    bad.write_text(json.dumps({"image": "0.png", "caption": "a cat"}) + "\n{not json\n")
    refused(r"bad.jsonl line 2 is not JSON")
    bad.write_text(json.dumps({"image": "missing.png", "caption": "a cat"}) + "\n")
    refused(r"missing.png is not a readable image")
    refused(r"captions file .*nofile.jsonl does not exist", captions=tmp_path / "nofile.jsonl")
    refused(r"--pipeline .*nopipe does not exist", captions=root / "captions.jsonl", pipeline=str(tmp_path / "nopipe"))
    refused(r"--captions and --pipeline go together", captions=root / "captions.jsonl", pipeline=None)
    shutil.copytree(pipes["pixart"], tmp_path / "no_t5", ignore=shutil.ignore_patterns("text_encoder"))
    refused(r"no_t5/text_encoder does not exist, but .*model_index.json lists it", captions=root / "captions.jsonl",
            pipeline=str(tmp_path / "no_t5"))
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    refused(r"is a DiTPipeline; text encoding supports PixArtAlphaPipeline, PixArtSigmaPipeline, StableDiffusion3",
            captions=root / "captions.jsonl", pipeline=str(tmp_path / "dit"))
    # The script (in-process): one line on stderr, exit code 2, nothing written.
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["extract_features.py", "--data-path", str(root / "imgs"), "--captions",
                                      str(root / "captions.jsonl"), "--pipeline", str(tmp_path / "nopipe"),
                                      "--features-path", str(out), "--image-size", "16", "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, "extract_features.py"), run_name="__main__")
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "nopipe does not exist" in lines[0], lines
    assert not out.exists()
    # A class-conditional model cannot train on a text store.
    with pytest.raises(UserError, match="not class labels"):
        open_feature_store(root / "store_pixart").check_num_classes(1000)


# ------------------------------------------------------------------------------------- one training step per family

class PlainObjective:
    """A plain loss on the conditioning dict: DDPM noise prediction (PixArt) or rectified flow (SD3)."""

    def __init__(self, family):
        self.family, self.seen = family, []

    def draw(self, n, generator):
        return {"t": torch.rand(n, generator=generator), "noise": torch.randn(n, 4, 8, 8, generator=generator)}

    def loss(self, model, x, cond, draws, step):
        self.seen.append((x.clone(), {k: v.clone() for k, v in cond.items()}))
        t, noise = draws["t"], draws["noise"]
        if self.family == "pixart":
            abar = torch.cos(t * torch.pi / 2)[:, None, None, None] ** 2
            xt = abar.sqrt() * x + (1 - abar).sqrt() * noise
            out = model(xt, encoder_hidden_states=cond["prompt_embeds"], encoder_attention_mask=cond[
                "prompt_attention_mask"], timestep=t * 1000, added_cond_kwargs={"resolution": None,
                                                                                 "aspect_ratio": None}).sample[:, :4]
            target = noise
        else:
            s = t[:, None, None, None]
            out = model((1 - s) * x + s * noise, encoder_hidden_states=cond["prompt_embeds"],
                        pooled_projections=cond["pooled_prompt_embeds"], timestep=t * 1000).sample
            target = noise - x
        return ((out - target) ** 2).mean(dim=(1, 2, 3)), {}


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_one_training_step_per_family(text, tmp_path, family):
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel
    root, pipes = text
    store = open_feature_store(root / f"store_{family}")
    cls = {"pixart": PixArtTransformer2DModel, "sd3": SD3Transformer2DModel}[family]
    model = cls.from_pretrained(os.path.join(pipes[family], "transformer"))
    projection = model.caption_projection if family == "pixart" else model.context_embedder
    before = {k: v.clone() for k, v in projection.state_dict().items()}
    objective = PlainObjective(family)
    config = TrainConfig(global_batch_size=2, max_steps=1, num_workers=0, log_every=1, ema_decay=0.0, lr=1e-2,
                         results_dir=str(tmp_path))
    Trainer(Runtime(), model, objective, store, config).fit()
    # The batch reached the loss as the store's items of the sampler's first batch (latent + dict conditioning).
    keys = next(iter(GlobalBatchSampler(len(store), 2, 0, 1, config.global_seed, flip=True)))
    x, cond = objective.seen[0]
    for row, key in enumerate(keys):
        want_x, want_cond = store[key]
        torch.testing.assert_close(x[row], want_x)
        for name, want in want_cond.items():
            assert torch.equal(cond[name][row], want)
    # The text conditioning took part in the step: the caption projection was updated.
    after = projection.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------ MAR: KL-16 stores

TINY_KL16 = dict(embed_dim=16, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(), resolution=64)


def test_kl16_moments_store_for_mar(tmp_path, monkeypatch):
    import models.mar as mar
    from models import MAR_models
    from models.kl16 import AutoencoderKL
    from tinyfusion.families import family_for
    from tinyfusion.families.mar import KL16VAE
    from tinyfusion.vae import load_vae
    torch.manual_seed(0)
    kl16 = AutoencoderKL(**TINY_KL16).eval()
    rng = np.random.default_rng(1)
    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            save_random_image(tmp_path / "imgs" / f"c{c}" / f"{i}.png", rng, 64, 100)
    extract_features(tmp_path / "imgs", tmp_path / "store", image_size=64, vae=KL16VAE(kl16), batch_size=3,
                     num_workers=0, shard_size=5, runtime=Runtime())
    store = open_feature_store(tmp_path / "store")
    m = store.manifest
    assert m["store"] == "moments" and m["scale_factor"] == pytest.approx(0.2325) and store.latent_shape == (16, 4, 4)
    assert store.stochastic and m["stored_shape"] == [32, 4, 4] and list(store.labels()) == [0] * 4 + [1] * 4
    # MAR's main_cache.py: moments (mean | logvar) of the center crop and of its flip; the reader samples them.
    images = open_image_folder(tmp_path / "imgs", 64, 16)
    raw = np.concatenate([np.load(tmp_path / "store" / f"latents-0000{k}.npy") for k in (0, 1)])
    for i in (0, 6):
        for flip in (0, 1):
            x = images[i][0][None]
            with torch.no_grad():
                post = kl16.encode(x.flip(-1) if flip else x)
            np.testing.assert_allclose(raw[i, flip], torch.cat([post.mean, post.logvar], 1)[0].numpy(),
                                       rtol=1e-5, atol=1e-5)
            eps = torch.randn(16, 4, 4, generator=torch.Generator().manual_seed(11))
            want = (post.mean[0] + torch.exp(0.5 * post.logvar[0]) * eps) * 0.2325
            torch.testing.assert_close(store[(i, flip, 11)][0], want, rtol=1e-5, atol=1e-6)
    # The MAR family encodes with KL-16: --vae is a checkpoint (here of the wrong architecture: refused), by
    # default the release kl16.ckpt (offline in tests: the message names it); the SD VAE loader points there.
    torch.save({"model": kl16.state_dict()}, tmp_path / "kl16_tiny.ckpt")
    mar_family = family_for("MAR-B")
    with pytest.raises(UserError, match="does not fit the KL-16 VAE"):
        mar_family.encoder(str(tmp_path / "kl16_tiny.ckpt"), "cpu")
    with pytest.raises(UserError, match="cannot download kl16.ckpt"):
        mar_family.encoder(None, "cpu")
    with pytest.raises(UserError, match="is not a file: MAR encodes"):
        mar_family.encoder(str(tmp_path / "no.ckpt"), "cpu")
    with pytest.raises(UserError, match="is a file.*--model MAR-L"):
        load_vae(str(tmp_path / "kl16_tiny.ckpt"))
    # MAR trains on the store through train.py (a tiny MAR-B patched into the registry).
    import train as train_script
    monkeypatch.setitem(mar.SIZES, "B", (32, 2, 2, 1, 32))
    monkeypatch.setitem(MAR_models, "MAR-B", mar._constructor("B"))
    train_script.main(["--model", "MAR-B", "--data-path", str(tmp_path / "store"), "--results-dir",
                       str(tmp_path / "run"), "--prefix", "r", "--max-steps", "2", "--global-batch-size", "4",
                       "--log-every", "1", "--num-workers", "0", "--image-size", "64", "--num-classes", "2",
                       "--save-model", str(tmp_path / "mar.pt")])
    log = open(tmp_path / "run" / "r" / "log.txt").read()
    assert "(step=0000002) loss" in log and "nan" not in log.lower()

"""The pruning and KD scripts on diffusers transformers (--model diffusers:<folder>), tiny models, in-process."""
import json
import os

import numpy as np
import pytest
import torch

import diffusers
from core.errors import UserError
from models import diffusers_t2i as t2i
from models.layer_mask import LayerMask, attach_layer_mask
from prune_by_index import build_parser as index_parser, main as index_main
from prune_by_learning import main as learning_main
from prune_by_score import build_parser as score_parser, main as score_main
from test_diffusers_t2i import inputs, pruned_by_hand, run, tiny
from tinyfusion.families import family_for
from tinyfusion.pruning import score_blocks
from tinyfusion.synthetic import write_feature_store
from train_masked_kd import main as kd_main


def saved(kind, folder, same_embedders=True):
    """A tiny transformer saved as a diffusers folder (DiT: one embedder in every block, as converted weights)."""
    model = tiny(kind)
    if kind == "DiT" and same_embedders:
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    model.save_pretrained(folder)
    return model


@pytest.fixture
def dit_store(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(32) % 10
    latents = rng.normal(size=(32, 4, 8, 8)).astype(np.float32)
    return write_feature_store(str(tmp_path / "store"), latents, labels, num_classes=10,
                               vae="stabilityai/sd-vae-ft-ema", image_size=64)


@pytest.mark.parametrize("kind,kept", [("DiT", [0, 2, 3]), ("PixArt", [1, 2]), ("SD3", [0, 1, 3])])
def test_prune_by_index_writes_a_diffusers_folder(kind, kept, tmp_path):
    model = saved(kind, tmp_path / "transformer")
    out = tmp_path / "pruned"
    index_main(index_parser().parse_args(["--model", f"diffusers:{tmp_path / 'transformer'}", "--kept-indices",
                                          json.dumps(kept), "--save-model", str(out)]))
    record = json.loads((tmp_path / "pruned.json").read_text())
    assert record["kept"] == kept and record["pruned_model"] == f"diffusers:{out}"
    reloaded = getattr(diffusers, type(model).__name__).from_pretrained(out)
    assert float((run(reloaded, kind) - run(pruned_by_hand(model, kept), kind)).abs().max()) == 0.0
    assert family_for(record["pruned_model"]) is family_for(f"diffusers:{tmp_path / 'transformer'}")


def test_prune_by_index_refuses_to_drop_sd3s_last_block(tmp_path):
    saved("SD3", tmp_path / "transformer")
    args = index_parser().parse_args(["--model", f"diffusers:{tmp_path / 'transformer'}", "--kept-indices",
                                      "[0, 1, 2]", "--save-model", str(tmp_path / "pruned")])
    with pytest.raises(UserError, match="drop block 3, but SD3's last block .context_pre_only. must be kept"):
        index_main(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer"]


@pytest.mark.parametrize("kind", ["PixArt", "SD3"])
def test_prune_by_score_magnitude(kind, tmp_path):
    model = saved(kind, tmp_path / "transformer")
    score_main(score_parser().parse_args(["--model", f"diffusers:{tmp_path / 'transformer'}", "--method",
                                          "magnitude", "--n-pruned", "2", "--save-model", str(tmp_path / "pruned")]))
    record = json.loads((tmp_path / "pruned.json").read_text())
    magnitude = [torch.cat([p.abs().flatten() for p in b.parameters()]).mean().item() for b in model.transformer_blocks]
    assert record["importance"] == pytest.approx(magnitude)
    assert 3 in record["kept"] and len(record["kept"]) == 2  # the last block is never removed
    assert len(diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "pruned").transformer_blocks if kind == "SD3"
               else diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "pruned").transformer_blocks) == 2


def test_prune_by_score_sensitivity_on_a_store(tmp_path, dit_store):
    saved("DiT", tmp_path / "transformer")
    score_main(score_parser().parse_args([
        "--model", f"diffusers:{tmp_path / 'transformer'}", "--method", "sensitivity", "--n-pruned", "1",
        "--save-model", str(tmp_path / "pruned"), "--data-path", dit_store, "--nsamples", "8", "--batch-size", "4",
        "--num-classes", "10", "--image-size", "64", "--device", "cpu"]))
    record = json.loads((tmp_path / "pruned.json").read_text())
    assert len(record["kept"]) == 3 and record["calibration"]["inputs"] == "noised"
    assert all(np.isfinite(record["importance"]))


def test_bi_scores_the_sd3_image_stream():
    """BI of an SD3 block: 1 - cos(image tokens in, image tokens out), from hooks written here."""
    model = tiny("SD3")
    x, cond = inputs("SD3")
    objective = family_for_model(model).objective((4, 8, 8), None, class_dropout_prob=0.0)
    scores = score_blocks(model, "bi", [(x, cond)], objective, seed=0)
    sims = {}

    def hook(i):
        def record(module, args, kwargs, output):
            sims[i] = torch.nn.functional.cosine_similarity(kwargs["hidden_states"], output[1], dim=-1).mean().item()
        return record
    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_hook(hook(i), with_kwargs=True)
    draws = objective.draw(len(x), torch.Generator().manual_seed(0))
    with torch.no_grad():
        objective.loss(model, x, cond, draws, 0)
    assert scores == pytest.approx([1 - sims[i] for i in range(4)], abs=1e-6)


def family_for_model(model):
    from tinyfusion.families import family_of_model
    return family_of_model(model)


def learn(tmp_path, store, groups, folder, steps=6, extra=()):
    learning_main(["--model", f"diffusers:{folder}", "--groups", groups, "--data-path", store, "--image-size", "64",
                   "--num-classes", "10", "--num-workers", "0", "--global-batch-size", "8", "--max-steps", str(steps),
                   "--precision", "fp32", "--delta-w", "--lora", "--lora-rank", "2", "--log-every", "3",
                   "--results-dir", str(tmp_path / "runs"), "--save-model", str(tmp_path / "pruned"), *extra])


def test_prune_by_learning_and_masked_kd_on_diffusers_dit(tmp_path, dit_store):
    model = saved("DiT", tmp_path / "transformer")
    learn(tmp_path, dit_store, "1:2", tmp_path / "transformer")
    record = json.loads((tmp_path / "pruned.json").read_text())
    kept = record["kept"]
    assert len(kept) == 2 and kept[0] in (0, 1) and kept[1] in (2, 3) and record["groups"] == [[1, 2], [1, 2]]
    student = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "pruned")  # the original kept weights
    assert float((run(student, "DiT") - run(pruned_by_hand(model, kept), "DiT")).abs().max()) == 0.0

    kd_main(["--model", f"diffusers:{tmp_path / 'pruned'}", "--teacher", f"diffusers:{tmp_path / 'transformer'}",
             "--data-path", dit_store, "--image-size", "64", "--num-classes", "10", "--num-workers", "0",
             "--global-batch-size", "8", "--max-steps", "3", "--precision", "fp32", "--log-every", "1",
             "--results-dir", str(tmp_path / "kd"), "--save-model", str(tmp_path / "recovered")])
    recovered = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "recovered")
    assert recovered.config.num_layers == 2
    # run folders are named after the family and the model folder, not the folder's whole path
    assert sorted(os.listdir(tmp_path / "runs")) == ["learn_mask-diffusers-DiT-transformer"]
    assert sorted(os.listdir(tmp_path / "kd")) == ["000-diffusers-DiT-pruned"]
    changed = [k for k, v in recovered.state_dict().items() if not torch.equal(v, student.state_dict()[k])]
    assert changed  # trained (the EMA moved)


def test_prune_by_learning_refuses_a_pattern_dropping_a_required_block(tmp_path, dit_store):
    saved("DiT", tmp_path / "transformer", same_embedders=False)  # block 0's embedder feeds the final layer
    with pytest.raises(UserError, match="group 0 .1:2, blocks 0-1. may drop block 0, but the final layer"):
        learn(tmp_path, dit_store, "1:2", tmp_path / "transformer")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "pruned").exists()


def test_masked_model_under_the_pipeline_call_convention():
    """The pipelines call the transformer with keywords only: the mask is drawn lazily and still exact."""
    model = tiny("SD3")
    x, cond = inputs("SD3")
    expected = run(pruned_by_hand(model, [0, 2, 3]), "SD3")
    mask = LayerMask([[3, 4]])
    attach_layer_mask(model, mask)
    mask.fix(mask.choice_for_kept([0, 2, 3]))
    with torch.no_grad():
        out = model(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"],
                    pooled_projections=cond["pooled_prompt_embeds"], timestep=torch.tensor([10, 500, 999])).sample
    assert float((out - expected).abs().max()) <= 1e-5
    assert t2i.required_blocks(model) == [3]


def test_text_families_refuse_a_class_store(tmp_path, dit_store):
    saved("PixArt", tmp_path / "transformer")
    with pytest.raises(UserError, match="holds class labels, but PixArt needs prompt_embeds, prompt_attention_mask: "
                                        "extract it with --captions"):
        learn(tmp_path, dit_store, "1:2", tmp_path / "transformer")
    assert not (tmp_path / "runs").exists()


def write_text_store(path, latents, cond, null):
    """A text store in extract_features' layout (format 2, one shard; 16c's reader): latents (N, C, H, W) and their
    flips, cond {name: (N, ...)}, null {name: (...)} (the empty prompt's tensors)."""
    import os
    os.makedirs(path)
    n, c, h, w = latents.shape
    np.save(os.path.join(path, "latents-00000.npy"), np.stack([latents, latents[..., ::-1]], axis=1))
    for name, array in {**cond, **{f"null-{k}": v for k, v in null.items()}}.items():
        np.save(os.path.join(path, f"{name}-00000.npy" if name in cond else f"{name}.npy"), array)
    manifest = {"format_version": 2, "conditioning": "text", "count": n, "latent_shape": [c, h, w],
                "stored_shape": [c, h, w], "dtype": "float32", "store": "latents", "scale_factor": 1.0,
                "shift_factor": 0.0, "vae": "pipeline/vae", "image_size": 8 * h, "channels": c, "flips": True,
                "shard_size": n, "num_shards": 1,
                "cond": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in cond.items()},
                "null_cond": {k: f"null-{k}.npy" for k in null},
                "shards": [{"latents": "latents-00000.npy", "count": n, "cond": {k: f"{k}-00000.npy" for k in cond}}]}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return path


@pytest.fixture
def text_stores(tmp_path):
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(16, 4, 8, 8)).astype(np.float32)
    embeds = rng.normal(size=(16, 5, 12)).astype(np.float32)
    mask = (np.arange(5)[None] < rng.integers(1, 6, (16, 1))).astype(np.int8)
    pixart = write_text_store(str(tmp_path / "pixart_store"), latents, {"prompt_embeds": embeds,
                              "prompt_attention_mask": mask},
                              {"prompt_embeds": np.zeros((5, 12), np.float32),
                               "prompt_attention_mask": np.eye(5, dtype=np.int8)[0]})
    sd3 = write_text_store(str(tmp_path / "sd3_store"), latents, {"prompt_embeds": embeds, "pooled_prompt_embeds":
                           rng.normal(size=(16, 10)).astype(np.float32)},
                           {"prompt_embeds": np.zeros((5, 12), np.float32), "pooled_prompt_embeds": np.zeros(10, np.float32)})
    return {"PixArt": pixart, "SD3": sd3}


@pytest.mark.parametrize("kind,groups", [("PixArt", "1:2"), ("SD3", "[[1,2],[1,1],[1,1]]")])
def test_text_families_search_and_recover_through_the_scripts(kind, groups, tmp_path, text_stores):
    """prune_by_learning (LoRA, caption dropout from the store's empty prompt) then train_masked_kd on a text store:
    both write diffusers folders that load with from_pretrained."""
    cls = getattr(diffusers, f"{'PixArt' if kind == 'PixArt' else 'SD3'}Transformer2DModel")
    model = saved(kind, tmp_path / "transformer")
    learn(tmp_path, text_stores[kind], groups, tmp_path / "transformer", steps=4)
    record = json.loads((tmp_path / "pruned.json").read_text())
    student = cls.from_pretrained(tmp_path / "pruned")
    assert float((run(student, kind) - run(pruned_by_hand(model, record["kept"]), kind)).abs().max()) == 0.0
    if kind == "SD3":
        assert record["kept"][-1] == 3 and student.transformer_blocks[-1].context_pre_only
    kd_main(["--model", f"diffusers:{tmp_path / 'pruned'}", "--teacher", f"diffusers:{tmp_path / 'transformer'}",
             "--data-path", text_stores[kind], "--image-size", "64", "--num-workers", "0", "--global-batch-size", "8",
             "--max-steps", "2", "--precision", "fp32", "--log-every", "1", "--results-dir", str(tmp_path / "kd"),
             "--save-model", str(tmp_path / "recovered")])
    recovered = cls.from_pretrained(tmp_path / "recovered")
    assert recovered.config.num_layers == len(record["kept"])
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in recovered.state_dict().items())


def test_bi_score_on_an_sd3_text_store(tmp_path, text_stores):
    saved("SD3", tmp_path / "transformer")
    score_main(score_parser().parse_args([
        "--model", f"diffusers:{tmp_path / 'transformer'}", "--method", "bi", "--n-pruned", "1",
        "--save-model", str(tmp_path / "pruned"), "--data-path", text_stores["SD3"], "--nsamples", "8",
        "--batch-size", "4", "--image-size", "64", "--device", "cpu"]))
    record = json.loads((tmp_path / "pruned.json").read_text())
    assert record["kept"][-1] == 3 and len(record["kept"]) == 3 and record["calibration"]["inputs"] == "noised"


def test_caption_dropout_uses_the_stores_empty_prompt(tmp_path, text_stores):
    from types import SimpleNamespace
    saved("PixArt", tmp_path / "transformer")
    args = SimpleNamespace(model=f"diffusers:{tmp_path / 'transformer'}", data_path=text_stores["PixArt"])
    objective = family_for(args.model).objective((4, 8, 8), args)
    assert objective.p_drop == 0.1
    null = np.load(f"{text_stores['PixArt']}/null-prompt_attention_mask.npy")
    assert objective.null_cond["prompt_attention_mask"].tolist() == null.tolist()
    assert family_for(args.model).objective((4, 8, 8), args, class_dropout_prob=0.0).null_cond is None


def test_sample_scripts_point_to_the_pipeline(tmp_path):
    from sample import main as sample_main
    saved("PixArt", tmp_path / "transformer")
    with pytest.raises(UserError, match="PixArt models sample through their diffusers pipeline"):
        sample_main(["--model", f"diffusers:{tmp_path / 'transformer'}", "--out", str(tmp_path / "s.png")])
    assert not (tmp_path / "s.png").exists()

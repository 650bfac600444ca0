"""diffusers transformers (DiT, PixArt, SD3) as prunable models: tiny models built from small configs, no download."""
import copy
import json

import pytest
import torch

import diffusers
from models import diffusers_t2i as t2i
from models.layer_mask import LayerMask, attach_layer_mask, detach_layer_mask
from core.errors import UserError
from tinyfusion.families import diffusers as fam
from tinyfusion.families import family_for, family_of_model
from tinyfusion.kd import MaskedKDObjective
from tinyfusion.mask_learning import prepare_mask_learning

KINDS = ("DiT", "PixArt", "SD3")
BATCH, TOKENS = 3, 5


def objective(model, cond_drop_prob=0.0):
    return family_of_model(model).objective((4, 8, 8), None, class_dropout_prob=cond_drop_prob)


def tiny(kind, num_layers=4, seed=0):
    """A tiny transformer of `kind` with every weight random (diffusers zero-initialises some gates)."""
    torch.manual_seed(seed)
    common = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=num_layers, sample_size=8,
                  patch_size=2)
    if kind == "DiT":
        model = diffusers.DiTTransformer2DModel(out_channels=8, num_embeds_ada_norm=10, **common)
    elif kind == "PixArt":
        model = diffusers.PixArtTransformer2DModel(out_channels=8, cross_attention_dim=16, caption_channels=12,
                                                   **common)
    else:
        model = diffusers.SD3Transformer2DModel(out_channels=4, joint_attention_dim=12, caption_projection_dim=16,
                                                pooled_projection_dim=10, pos_embed_max_size=8,
                                                dual_attention_layers=(0, 2), **common)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return t2i.prepare(model).eval()


def inputs(kind, batch=BATCH, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    if kind == "DiT":
        return x, torch.randint(0, 10, (batch,), generator=g)
    text = torch.randn(batch, TOKENS, 12, generator=g)
    if kind == "PixArt":
        return x, {"prompt_embeds": text, "prompt_attention_mask": torch.tensor([[1, 1, 1, 0, 0]] * batch)}
    return x, {"prompt_embeds": text, "pooled_prompt_embeds": torch.randn(batch, 10, generator=g)}


def run(model, kind, seed=1):
    x, cond = inputs(kind, seed=seed)
    with torch.no_grad():
        return t2i.forward(model, x, torch.tensor([10, 500, 999]), cond)


def pruned_by_hand(model, kept):
    """The pruned model built independently of prune_transformer: a fresh model of the smaller config
    (SD3's dual-attention indices remapped by hand) loaded with the kept blocks' weights renamed."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    config["num_layers"] = len(kept)
    if "dual_attention_layers" in config:
        config["dual_attention_layers"] = [i for i, k in enumerate(kept) if k in model.config.dual_attention_layers]
    small = type(model)(**config)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("transformer_blocks."):
            _, old, rest = key.split(".", 2)
            if int(old) not in kept:
                continue
            key = f"transformer_blocks.{kept.index(int(old))}.{rest}"
        state[key] = value
    small.load_state_dict(state, strict=True)
    return t2i.prepare(small).eval()


KEPT = {"DiT": [0, 2, 3], "PixArt": [1, 2], "SD3": [0, 2, 3]}  # DiT keeps block 0, SD3 its last block


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", [True, False])
def test_fixed_mask_equals_pruned_model(kind, split):
    model = tiny(kind)
    kept = KEPT[kind]
    expected, full = run(pruned_by_hand(model, kept), kind), run(model, kind)
    mask = LayerMask([[len(kept), 4]])
    mask.split_forward = split
    attach_layer_mask(model, mask)
    mask.fix(mask.choice_for_kept(kept))
    assert float((run(model, kind) - expected).abs().max()) <= 1e-5
    assert (full - expected).abs().max() > 1e-3  # the dropped block matters


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_masks_with_gradients(kind):
    """Per-sample masks in training mode (split forward, straight-through gates): each sample's output is its
    own pruned model's, and the gates get a gradient."""
    model = tiny(kind)
    x, cond = inputs(kind)
    t = torch.tensor([10, 500, 999])
    rows = [[0, 2, 3], [0, 1, 3], [0, 1, 2]] if kind == "DiT" else [[0, 2, 3], [1, 2, 3], [0, 1, 3]]
    refs = []
    for i, kept in enumerate(rows):
        one = {k: v[i:i + 1] for k, v in cond.items()} if isinstance(cond, dict) else cond[i:i + 1]
        with torch.no_grad():
            refs.append(t2i.forward(pruned_by_hand(model, kept), x[i:i + 1], t[i:i + 1], one))
    masks = torch.tensor([[float(j in kept) for j in range(4)] for kept in rows], requires_grad=True)
    mask = LayerMask([[3, 4]])
    attach_layer_mask(model.train(), mask)
    with mask.masks(masks):
        out = t2i.forward(model, x, t, cond)
    assert float((out.detach() - torch.cat(refs)).abs().max()) <= 1e-5
    gate = torch.autograd.grad(out.square().sum(), masks)[0]
    assert gate.abs().sum() > 0


def tiny_vae():
    torch.manual_seed(0)  # one level: latents and images have the same size
    return diffusers.AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8, sample_size=8)


def pipeline_latents(kind, transformer):
    """Two denoising steps through the diffusers pipeline of `kind`, conditioning given as embeddings."""
    g = torch.Generator().manual_seed(0)
    x, cond = inputs(kind, batch=1)
    common = dict(num_inference_steps=2, generator=g, output_type="latent")
    if kind == "DiT":
        pipe = diffusers.DiTPipeline(transformer, tiny_vae(), diffusers.DPMSolverMultistepScheduler())
        # DiTPipeline always decodes; guidance would use the hard-coded null class 1000
        return torch.as_tensor(pipe(class_labels=[3], guidance_scale=1.0, **{**common, "output_type": "np"}).images)
    if kind == "PixArt":
        pipe = diffusers.PixArtAlphaPipeline(None, None, tiny_vae(), transformer, diffusers.DPMSolverMultistepScheduler())
        null = {k: torch.zeros_like(v) for k, v in cond.items()}
        return pipe(prompt=None, negative_prompt=None, prompt_embeds=cond["prompt_embeds"], height=8, width=8,
                    prompt_attention_mask=cond["prompt_attention_mask"], negative_prompt_embeds=null["prompt_embeds"],
                    negative_prompt_attention_mask=null["prompt_attention_mask"] + 1, guidance_scale=2.0,
                    use_resolution_binning=False, **common).images
    pipe = diffusers.StableDiffusion3Pipeline(transformer, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                              tiny_vae(), None, None, None, None, None, None)
    return pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                negative_prompt_embeds=torch.zeros_like(cond["prompt_embeds"]), height=8, width=8,
                negative_pooled_prompt_embeds=torch.zeros_like(cond["pooled_prompt_embeds"]), guidance_scale=2.0,
                **common).images


@pytest.mark.parametrize("kind", KINDS)
def test_saved_folder_reloads_and_runs_in_the_pipeline(kind, tmp_path):
    model = tiny(kind)
    kept = KEPT[kind]
    expected = run(pruned_by_hand(model, kept), kind)
    t2i.save_transformer(t2i.prune_transformer(model, kept), str(tmp_path / "transformer"))
    saved = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert saved["num_layers"] == len(kept)
    reloaded = t2i.load_transformer(str(tmp_path))  # a pipeline folder: its transformer/ is used
    assert len(reloaded.transformer_blocks) == len(kept)
    assert float((run(reloaded, kind) - expected).abs().max()) <= 1e-5
    latents = pipeline_latents(kind, reloaded)
    assert latents.shape == ((1, 8, 8, 3) if kind == "DiT" else (1, 4, 8, 8)) and torch.isfinite(latents).all()
    assert torch.equal(latents, pipeline_latents(kind, pruned_by_hand(tiny(kind), kept)))


def test_sd3_dual_attention_layers_follow_the_kept_blocks():
    model = tiny("SD3", num_layers=6)  # dual attention in original blocks 0 and 2
    t2i.prune_transformer(model, [1, 2, 4, 5])
    assert tuple(model.config.dual_attention_layers) == (1,)  # old block 2 is now block 1
    assert [b.use_dual_attention for b in model.transformer_blocks] == [False, True, False, False]
    assert [b.context_pre_only for b in model.transformer_blocks] == [False, False, False, True]


def test_required_blocks():
    assert t2i.required_blocks(tiny("SD3")) == [3]
    assert t2i.required_blocks(tiny("PixArt")) == []
    dit = tiny("DiT")
    assert t2i.required_blocks(dit) == [0]  # random embedders differ per block
    for block in dit.transformer_blocks[1:]:  # converted official weights: one embedder copied into every block
        block.norm1.emb.load_state_dict(dit.transformer_blocks[0].norm1.emb.state_dict())
    assert t2i.required_blocks(dit) == []
    expected = run(pruned_by_hand(dit, [1, 3]), "DiT")
    mask = LayerMask([[1, 2], [1, 2]])
    attach_layer_mask(dit, mask)
    mask.fix(mask.choice_for_kept([1, 3]))
    assert float((run(dit, "DiT") - expected).abs().max()) <= 1e-5


def test_patterns_that_drop_a_required_block_are_refused(tmp_path):
    sd3 = tiny("SD3")
    with pytest.raises(UserError, match="block 3.*context_pre_only.*\\[1,1\\]"):
        t2i.check_groups(sd3, [(1, 2), (1, 2)])
    t2i.check_groups(sd3, [(1, 2), (1, 1), (1, 1)])
    with pytest.raises(UserError, match="drop block 3"):
        t2i.prune_transformer(sd3, [0, 1])
    assert len(sd3.transformer_blocks) == 4 and sd3.config.num_layers == 4  # nothing changed
    with pytest.raises(UserError, match="block 0.*embedder"):
        t2i.check_groups(tiny("DiT"), [(1, 2), (2, 2)])


def test_bad_folders(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'nope'} does not exist$"):
        t2i.load_transformer(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="huggingface-cli download PixArt-alpha/PixArt-XL-2-256x256"):
        t2i.load_transformer(str(tmp_path / "nope"), hub_id="PixArt-alpha/PixArt-XL-2-256x256")
    with pytest.raises(UserError, match="folder PixArt-alpha/PixArt-XL-2-256x256 does not exist .fetch it with "
                                        "`huggingface-cli download PixArt-alpha/PixArt-XL-2-256x256"):
        t2i.load_transformer("diffusers:PixArt-alpha/PixArt-XL-2-256x256")  # a hub id, not a local folder
    (tmp_path / "weights.pt").write_text("")
    with pytest.raises(UserError, match="weights.pt is a file, not a diffusers model folder"):
        t2i.load_transformer(f"diffusers:{tmp_path / 'weights.pt'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a diffusers model folder"):
        t2i.load_transformer(str(tmp_path / "empty"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(UserError, match="UNet2DConditionModel; supported .*DiTTransformer2DModel, "
                                        "PixArtTransformer2DModel, SD3Transformer2DModel"):
        t2i.load_transformer(str(tmp_path / "unet"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        t2i.save_transformer(tiny("PixArt"), str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def plant_harm(kind, block):
    """Make a block's residual branches large, so keeping it moves the output far."""
    outs = [block.attn.to_out[0], block.ff.net[2]] if kind == "SD3" else [block.attn1.to_out[0], block.ff.net[2]]
    with torch.no_grad():
        for linear in outs:
            linear.weight.mul_(30)


# groups, harmful blocks, the blocks the search must keep
PLANTED = {"DiT": ([(1, 2), (1, 2)], [1, 2], [0, 3]), "PixArt": ([(1, 2), (1, 2)], [0, 3], [1, 2]),
           "SD3": ([(1, 2), (1, 1), (1, 1)], [0], [1, 2, 3])}


@pytest.mark.parametrize("kind", KINDS)
def test_learned_mask_finds_planted_blocks(kind):
    """The project's mask-learning objective, over masked KD towards a teacher that is the model without the
    harmful blocks (alpha_KD = 1: the teacher defines the optimum), keeps exactly the teacher's blocks."""
    from tinyfusion.mask_learning import MaskLearningObjective
    model = tiny(kind)
    if kind == "DiT":  # one embedder in every block (as converted weights), so block 0 may go
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    groups, harmful, expected = PLANTED[kind]
    for i in harmful:
        plant_harm(kind, model.transformer_blocks[i])
    teacher = pruned_by_hand(model, expected)
    t2i.check_groups(model, groups)
    x, cond = inputs(kind, batch=8)
    torch.manual_seed(0)
    layer_mask, param_groups = prepare_mask_learning(model.train(), groups, delta_w=False, lr=1e-2)
    opt = torch.optim.AdamW(param_groups, weight_decay=0)
    kd = MaskedKDObjective(objective(model), model, teacher,
                               [(3, len(expected) - 1)], alpha_kd=1.0, alpha_diff=0.0,
                               beta_start=0.0)  # the output KD alone
    search = MaskLearningObjective(kd, layer_mask)
    g, steps = torch.Generator().manual_seed(0), 30
    for step in range(steps):
        search.begin_step(step, steps)
        loss, _ = search.loss(model, x, cond, search.draw(len(x), g), step)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    assert layer_mask.decision() == expected
    assert min(layer_mask.confidence()) > 0.9


def kd_terms(kind, student, teacher, layer_map):
    x, cond = inputs(kind)
    base = objective(teacher)
    kd = MaskedKDObjective(base, student, teacher, layer_map)
    draws = base.draw(len(x), torch.Generator().manual_seed(0))
    if "t" in draws:  # t = 0 is the decoder NLL, not a KL: nonzero even for equal models
        draws["t"] = draws["t"].clamp_min(1)
    total, logs = kd.loss(student, x, cond, draws, 0)
    return total, logs


@pytest.mark.parametrize("kind", KINDS)
def test_masked_kd_is_zero_when_student_is_teacher(kind):
    teacher = tiny(kind)
    student = copy.deepcopy(teacher).train()
    total, logs = kd_terms(kind, student, teacher, [(i, i) for i in range(4)])
    assert abs(float(logs["kd"])) <= 1e-7 and float(logs["rep"]) == 0.0  # the VB KL rounds to ~1e-9
    assert float(total.mean()) == pytest.approx(0.1 * float(logs["diff"]), abs=1e-6)  # alpha_diff = 1 - 0.9
    other = tiny(kind, seed=1)
    _, logs = kd_terms(kind, other, teacher, [(i, i) for i in range(4)])
    assert float(logs["kd"]) > 1e-3 and float(logs["rep"]) > 1e-3


def test_sd3_rep_loss_compares_the_image_stream():
    """A student that differs from its teacher only in block 1's text branch: the image stream out of
    block 1 is still the teacher's (rep = 0), the final output is not (kd > 0)."""
    teacher = tiny("SD3")
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.transformer_blocks[1].ff_context.net[2].bias.add_(10.0)
    _, logs = kd_terms("SD3", student, teacher, [(1, 1)])
    assert float(logs["rep"]) == 0.0 and float(logs["kd"]) > 1e-5


def test_prune_benchmark_smoke(capsys):
    from benchmarks import bench_diffusers_prune
    threads = torch.get_num_threads()
    try:
        rows = bench_diffusers_prune.main(["--smoke", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert [r["depth"] for r in rows] == [28, 14]
    assert rows[1]["speedup"] == pytest.approx(rows[0]["seconds"] / rows[1]["seconds"])
    assert f"forward speedup {rows[1]['speedup']:.2f}x with 14/28 blocks" in capsys.readouterr().out


def test_rectified_flow_objective_matches_the_sd3_formulas():
    """x_s = (1 - s) x0 + s noise, target noise - x0, model time 1000 s; s shifted as the SD3 scheduler."""
    model = tiny("SD3")
    x, cond = inputs("SD3")
    flow = objective(model)
    assert isinstance(flow, fam.RectifiedFlowObjective) and flow.shift == 3.0
    draws = flow.draw(len(x), torch.Generator().manual_seed(0))
    loss, _ = flow.loss(model, x, cond, draws, 0)
    s = draws["s"].view(-1, 1, 1, 1)
    with torch.no_grad():
        v = model(hidden_states=(1 - s) * x + s * draws["noise"], encoder_hidden_states=cond["prompt_embeds"],
                  pooled_projections=cond["pooled_prompt_embeds"], timestep=1000 * draws["s"]).sample
    expected = ((v - (draws["noise"] - x)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss.detach(), expected, atol=1e-6)
    # the shift is the scheduler's: its sigmas for an unshifted grid u are k u / (1 + (k - 1) u)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    u = torch.linspace(1, 1 / 1000, 1000)  # the scheduler's own unshifted sigmas
    assert torch.allclose(scheduler.sigmas.float(), 3 * u / (1 + 2 * u), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    u_drawn = torch.sigmoid(torch.randn(len(x), generator=g))  # logit-normal(0, 1)
    assert torch.allclose(draws["s"], 3 * u_drawn / (1 + 2 * u_drawn))


def test_ddpm_objective_uses_the_pixart_schedule():
    """Training noises latents as PixArt's pipeline schedulers denoise them (linear betas 1e-4..0.02, 1000 steps)."""
    ddpm = objective(tiny("PixArt"), 0.1)
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    assert torch.allclose(torch.as_tensor(ddpm.diffusion.alphas_cumprod), scheduler.alphas_cumprod.double(),
                          atol=1e-6)


def test_conditioning_dropout():
    drop = torch.tensor([1, 0, 1])
    dit = tiny("DiT")
    assert fam.drop_conditioning(dit, torch.tensor([4, 5, 6]), drop).tolist() == [10, 5, 10]  # the null class
    _, cond = inputs("PixArt")
    null = {"prompt_embeds": torch.full((TOKENS, 12), 7.0), "prompt_attention_mask": torch.tensor([1, 0, 0, 0, 0])}
    out = fam.drop_conditioning(dit, cond, drop, null)
    assert torch.equal(out["prompt_embeds"][1], cond["prompt_embeds"][1])
    assert (out["prompt_embeds"][[0, 2]] == 7).all()
    assert out["prompt_attention_mask"].tolist() == [[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    with pytest.raises(UserError, match="empty prompt"):
        fam.drop_conditioning(dit, cond, drop)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_search_step(kind):
    """Mask learning with LoRA on every Linear (the official scope): at start the model is unchanged (LoRA B = 0),
    and one step's loss trains LoRA and the gates."""
    model = tiny(kind)
    kept = KEPT[kind]
    expected = run(pruned_by_hand(model, kept), kind)
    layer_mask, groups = prepare_mask_learning(model, [(len(kept), 4)], delta_w=True, lora=True, lora_rank=2)
    layer_mask.fix(layer_mask.choice_for_kept(kept))
    assert float((run(model.eval(), kind) - expected).abs().max()) <= 1e-5
    layer_mask.fix(None)
    x, cond = inputs(kind)
    loss, _ = objective(model).loss(model.train(), x, cond, objective(model).draw(len(x), torch.Generator()), 0)
    loss.mean().backward()
    assert all(p.grad is not None for g in groups for p in g["params"])
    assert float(sum(p.grad.abs().sum() for p in groups[0]["params"])) > 0

"""Export a DiT of any depth to diffusers' DiTTransformer2DModel (for DiTPipeline).

diffusers stores the timestep/class embedder once per block; we copy ours into each.
One numerical caveat: diffusers' DiT embeds timesteps with `downscale_freq_shift=1`
(frequencies exp(-ln(1e4) i / 127)) while the official DiT divides by 128. `to_diffusers`
sets the shift to 0 on the built model so it reproduces the official numbers; a model
re-loaded with `from_pretrained` gets diffusers' default back (a small, known drift).
"""


def diffusers_config(model):
    heads = model.num_heads
    hidden = model.pos_embed.shape[-1]
    return dict(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=model.in_channels,
                out_channels=model.out_channels, num_layers=model.depth, sample_size=model.input_size,
                patch_size=model.patch_size, num_embeds_ada_norm=model.num_classes, norm_eps=1e-6,
                activation_fn="gelu-approximate", norm_type="ada_norm_zero", attention_bias=True)


def diffusers_state_dict(state_dict, depth):
    """Map official DiT keys to DiTTransformer2DModel keys."""
    sd = state_dict
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = d + "norm1.emb."
        for j, name in ((0, "linear_1"), (2, "linear_2")):
            out[f"{emb}timestep_embedder.{name}.weight"] = sd[f"t_embedder.mlp.{j}.weight"]
            out[f"{emb}timestep_embedder.{name}.bias"] = sd[f"t_embedder.mlp.{j}.bias"]
        out[emb + "class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        out[d + "norm1.linear.weight"] = sd[b + "adaLN_modulation.1.weight"]
        out[d + "norm1.linear.bias"] = sd[b + "adaLN_modulation.1.bias"]
        for part in ("weight", "bias"):
            q, k, v = sd[b + f"attn.qkv.{part}"].chunk(3, dim=0)
            out[d + f"attn1.to_q.{part}"], out[d + f"attn1.to_k.{part}"], out[d + f"attn1.to_v.{part}"] = q, k, v
            out[d + f"attn1.to_out.0.{part}"] = sd[b + f"attn.proj.{part}"]
            out[d + f"ff.net.0.proj.{part}"] = sd[b + f"mlp.fc1.{part}"]
            out[d + f"ff.net.2.{part}"] = sd[b + f"mlp.fc2.{part}"]
    return {k: v.clone() for k, v in out.items()}


def to_diffusers(model):
    """A diffusers DiTTransformer2DModel with this model's weights (official timestep numerics)."""
    from diffusers import DiTTransformer2DModel

    target = DiTTransformer2DModel(**diffusers_config(model))
    target.load_state_dict(diffusers_state_dict(model.state_dict(), model.depth), strict=True)
    for block in target.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return target.eval()


def save_diffusers(model, folder):
    """Write `folder/` loadable with DiTTransformer2DModel.from_pretrained (e.g. as a DiTPipeline transformer)."""
    to_diffusers(model).save_pretrained(folder)

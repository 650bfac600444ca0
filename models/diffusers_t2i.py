"""diffusers transformers (DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel) as prunable models.

`load_transformer(folder)` reads a local diffusers folder offline (the class comes from config.json's
`_class_name`) and prepares the model for the project's layer mask: `model.block_lists` names its
`transformer_blocks`, and SD3 blocks get a `residual_stream` adapter (their stream is the pair
(hidden_states, encoder_hidden_states), passed by keyword and returned swapped).
`prune_transformer(model, kept)` keeps the given blocks and rewrites the config (`num_layers`; SD3's
`dual_attention_layers` remapped to the kept blocks), so `save_pretrained` writes a folder that
`from_pretrained` and the diffusers pipelines load unchanged.

Structural rules (`required_blocks`): SD3's last block is `context_pre_only` (it alone drops the text
stream) and must stay last; a diffusers DiT conditions its final layer on block 0's embedder, so block 0
stays unless every block's timestep/class embedder is the same (as in converted official weights).
"""
import json
import os
import re

import torch

from core.errors import UserError

SUPPORTED = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel")
PREFIX = "diffusers:"
VAE_SCALE = 8  # latent -> pixel size of the pipelines' VAEs (PixArt's resolution condition is in pixels)


def is_diffusers_spec(name):
    return isinstance(name, str) and name.startswith(PREFIX)


def spec_folder(name):
    """The folder of a model name 'diffusers:<folder>'."""
    return name[len(PREFIX):] if is_diffusers_spec(name) else name


def transformer_folder(path, hub_id=None):
    """The transformer's folder: `path` itself, or `path/transformer` for a pipeline folder. A missing `path`
    that looks like a hub id ('org/name') is named as the id to fetch."""
    if hub_id is None and not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        hub_id = path
    fetch = (f" (fetch it with `huggingface-cli download {hub_id} --local-dir <dir>` and pass "
             f"diffusers:<dir>/transformer)") if hub_id else ""
    if not os.path.exists(path):
        raise UserError(f"diffusers model folder {path} does not exist{fetch}")
    if not os.path.isdir(path):
        raise UserError(f"{path} is a file, not a diffusers model folder: give the folder holding config.json")
    if not os.path.isfile(os.path.join(path, "config.json")) and \
            os.path.isfile(os.path.join(path, "transformer", "config.json")):
        path = os.path.join(path, "transformer")
    config = os.path.join(path, "config.json")
    try:
        with open(config) as f:
            class_name = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        class_name = None
    if not isinstance(class_name, str):
        raise UserError(f"{path} is not a diffusers model folder (no config.json with a _class_name): give the "
                        f"transformer folder of a diffusers pipeline, e.g. <pipeline>/transformer")
    if class_name not in SUPPORTED:
        raise UserError(f"{path} holds a {class_name}; supported diffusers transformers: {', '.join(SUPPORTED)}")
    return path, class_name


def load_transformer(path, hub_id=None, dtype=None):
    """A supported diffusers transformer from a local folder (offline), prepared for the layer mask."""
    import diffusers
    folder, class_name = transformer_folder(spec_folder(path), hub_id)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    model = getattr(diffusers, class_name).from_pretrained(folder, local_files_only=True, **kwargs)
    return prepare(model)


def inner(model):
    """The transformer inside DDP / torch.compile wrappers."""
    while isinstance(getattr(model, "module", getattr(model, "_orig_mod", None)), torch.nn.Module):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def class_name(model):
    """The supported diffusers class `model` is (also wrapped, or re-classed by a layer mask), else its own name."""
    cls = type(inner(model))
    return next((c.__name__ for c in cls.__mro__ if c.__name__ in SUPPORTED), cls.__name__)


def prepare(model):
    """Give a diffusers transformer the project's block interface (in place). Returns it."""
    name = class_name(model)
    if name not in SUPPORTED:
        raise UserError(f"{name} is not supported; supported diffusers transformers: {', '.join(SUPPORTED)}")
    model.block_lists, model.depth = ("transformer_blocks",), len(model.transformer_blocks)
    if name == "SD3Transformer2DModel":
        for block in model.transformer_blocks:
            block.residual_stream = JOINT_STREAM
    if name == "DiTTransformer2DModel":
        # Label dropout is drawn by the objective (seeded, per step); the embedders' own random drop in
        # training mode would draw it again, independently in every block.
        for block in model.transformer_blocks:
            block.norm1.emb.class_embedder.dropout_prob = 0.0
    return model


class JointStream:
    """SD3's residual stream as one tensor: cat([hidden_states, encoder_hidden_states], dim=1).

    Both streams have the block width (the joint attention needs it). A skipped block then passes both
    through unchanged; the last block (context_pre_only) returns None for the text stream, as diffusers."""

    NAMES = ("hidden_states", "encoder_hidden_states", "temb", "joint_attention_kwargs")

    def pack(self, block, args, kwargs):
        bound = {**dict(zip(self.NAMES, args)), **kwargs}
        h, e = bound.pop("hidden_states"), bound.pop("encoder_hidden_states")
        return torch.cat([h, e], 1), (), {**bound, "image_tokens": h.shape[1]}

    def call(self, block, forward, x, args, kwargs):
        kwargs = dict(kwargs)
        n = kwargs.pop("image_tokens")
        e_out, h_out = forward(*args, hidden_states=x[:, :n], encoder_hidden_states=x[:, n:], **kwargs)
        return torch.cat([h_out, x[:, n:] if e_out is None else e_out], 1)

    def unpack(self, block, out, kwargs):
        n = kwargs["image_tokens"]
        return (None if block.context_pre_only else out[:, n:]), out[:, :n]

    def io(self, block, args, kwargs, output):
        """(input, output) image tokens of one block call (what block scores such as BI compare)."""
        return {**dict(zip(self.NAMES, args)), **kwargs}["hidden_states"], output[1]

    def __deepcopy__(self, memo):  # stateless: EMA copies share it
        return self


JOINT_STREAM = JointStream()


def image_stream(block_output):
    """The image tokens of a block's output (KD hidden states): SD3 blocks return (text, image)."""
    return block_output[1] if isinstance(block_output, tuple) else block_output


def required_blocks(model):
    """Block indices every pruning must keep (see the module docstring)."""
    return required_blocks_of(class_name(model), model.state_dict())


def required_blocks_of(name, state_dict):
    """required_blocks from a state dict of a model of class `name`."""
    prefix = "transformer_blocks."
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith(prefix))
    if name == "SD3Transformer2DModel":
        return [depth - 1]
    if name == "DiTTransformer2DModel":
        first = {k[len(prefix) + 2:]: v for k, v in state_dict.items() if k.startswith(prefix + "0.norm1.emb.")}
        same = all(torch.equal(v, state_dict[f"{prefix}{i}.{k}"]) for i in range(1, depth) for k, v in first.items())
        return [] if same else [0]
    return []


def _why(name):
    if name == "SD3Transformer2DModel":
        return "SD3's last block (context_pre_only) must be kept"
    return "the final layer of this DiT uses block 0's embedder and the blocks' embedders differ"


def check_groups(model, groups):
    """One line if an N:M group (N < M) could drop a required block: such a block needs a group of its own
    kind, e.g. end the pattern with [1,1]."""
    start = 0
    for g, (n, m) in enumerate(groups):
        for r in required_blocks(model):
            if start <= r < start + m and n < m:
                raise UserError(f"group {g} ({n}:{m}, blocks {start}-{start + m - 1}) may drop block {r}, but "
                                f"{_why(class_name(model))}: put it in a group that keeps all of its blocks, e.g. "
                                f"end the pattern with [1,1]")
        start += m


def check_kept(model, kept):
    check_kept_of(class_name(model), model.state_dict(), kept)


def check_kept_of(name, state_dict, kept):
    """One line if the kept blocks miss a required one or are not distinct block indices."""
    required = required_blocks_of(name, state_dict)
    missing = [r for r in required if r not in set(kept)]
    if missing:
        raise UserError(f"the kept blocks {sorted(kept)} drop block {missing[0]}, but {_why(name)}")
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("transformer_blocks."))
    if not kept or any(not 0 <= k < depth for k in kept) or len(set(kept)) != len(kept):
        raise UserError(f"kept blocks {list(kept)} must be distinct indices in 0..{depth - 1}")


def pruned_config(config, kept):
    """The config changes for keeping the blocks `kept` (ascending original indices)."""
    update = {"num_layers": len(kept)}
    if "dual_attention_layers" in config:
        dual = set(config["dual_attention_layers"])
        update["dual_attention_layers"] = tuple(new for new, old in enumerate(kept) if old in dual)
    return update


def prune_transformer(model, kept):
    """Keep the blocks `kept` (in place, in original order) and update the config. Returns the model."""
    kept = sorted(int(k) for k in kept)
    check_kept(model, kept)
    update = pruned_config(model.config, kept)
    model.transformer_blocks = torch.nn.ModuleList([model.transformer_blocks[k] for k in kept])
    model.register_to_config(**update)
    model.depth = len(kept)
    return model


def save_transformer(model, folder):
    """save_pretrained into a new (or empty) folder; never over an existing model."""
    if os.path.isdir(folder) and os.listdir(folder):
        raise UserError(f"{folder} already exists and is not empty: choose a new folder for the pruned model")
    model.save_pretrained(folder)
    return folder


def forward(model, x, t, cond):
    """The model's output tensor for latents x, timesteps t and conditioning `cond` (labels for DiT,
    a dict of text tensors for PixArt and SD3)."""
    name = class_name(model)
    if name == "DiTTransformer2DModel":
        return model(x, timestep=t, class_labels=cond).sample
    if name == "PixArtTransformer2DModel":
        added = {"resolution": None, "aspect_ratio": None}
        if inner(model).use_additional_conditions:  # PixArt-alpha 1024: image size and aspect ratio in pixels
            h, w = x.shape[-2] * VAE_SCALE, x.shape[-1] * VAE_SCALE
            added = {"resolution": torch.tensor([[h, w]], dtype=x.dtype, device=x.device).expand(len(x), 2),
                     "aspect_ratio": torch.tensor([[h / w]], dtype=x.dtype, device=x.device).expand(len(x), 1)}
        return model(x, encoder_hidden_states=cond["prompt_embeds"], timestep=t, added_cond_kwargs=added,
                     encoder_attention_mask=cond.get("prompt_attention_mask")).sample
    return model(x, encoder_hidden_states=cond["prompt_embeds"], pooled_projections=cond["pooled_prompt_embeds"],
                 timestep=t).sample

"""Prompt embeddings for the text-to-image families, from a local diffusers pipeline folder.

Only the tokenizers and text encoders are loaded (the transformer, VAE and scheduler are passed as None),
and the prompts go through the pipeline class's own `encode_prompt`, so the stored tensors are exactly
what its `__call__` hands the transformer (without classifier-free guidance's negative half).
"""
import inspect
import json
import os

import torch

from core.errors import UserError
from .families import FAMILIES


def text_pipelines():
    """Pipeline class name -> ({tensor name: position in encode_prompt's returned tuple}, extra encode_prompt
    arguments), as the text families declare them (tinyfusion/families/diffusers.py)."""
    return {cls: (fam.prompt_outputs, fam.encode_prompt_args)
            for fam in FAMILIES for cls in getattr(fam, "pipeline_classes", ())}


TEXT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TEXT_PARTS = ("tokenizer", "text_encoder")  # model_index.json entries starting with these are loaded


class PromptEncoder:
    """`encoder(prompts) -> {name: tensor (B, ...)}` on the CPU, through `pipeline.encode_prompt`."""

    def __init__(self, pipeline, folder, max_sequence_length, dtype):
        self.pipeline, self.folder, self.dtype = pipeline, folder, dtype
        self.class_name = type(pipeline).__name__
        self.outputs, self.extra_args = text_pipelines()[self.class_name]
        self.max_sequence_length = max_sequence_length

    @property
    def names(self):
        return tuple(self.outputs)

    def info(self):
        """What the manifest records about the encoding."""
        return {"pipeline": self.folder, "pipeline_class": self.class_name,
                "max_sequence_length": self.max_sequence_length, "dtype": self.dtype}

    @torch.no_grad()
    def __call__(self, prompts, device):
        out = self.pipeline.encode_prompt(list(prompts), do_classifier_free_guidance=False, device=device,
                                          max_sequence_length=self.max_sequence_length, **self.extra_args)
        return {name: out[i].cpu() for name, i in self.outputs.items()}


def _read_index(folder):
    path = os.path.join(folder, "model_index.json")
    if not os.path.isdir(folder):
        raise UserError(f"--pipeline {folder} does not exist: pass a local diffusers pipeline folder (model_index.json "
                        f"with tokenizer/ and text_encoder/), e.g. from `huggingface-cli download "
                        f"PixArt-alpha/PixArt-XL-2-512x512 --local-dir {folder}`")
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--pipeline {folder} is not a diffusers pipeline folder ({path}: "
                        f"{str(e).splitlines()[0][:100]}): pass the folder that holds model_index.json") from None
    name = index.get("_class_name")
    if name not in text_pipelines():
        raise UserError(f"--pipeline {folder} is a {name}; text encoding supports {', '.join(text_pipelines())}")
    return index


def load_prompt_encoder(folder, device="cpu", dtype="fp32", max_sequence_length=None):
    """The text components of the pipeline in `folder` (offline), on `device`, computing in `dtype`.
    `max_sequence_length` None = the pipeline's own default (PixArt-alpha 120, Sigma 300, SD3 256)."""
    import diffusers
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    if dtype not in TEXT_DTYPES:
        raise UserError(f"--text-dtype {dtype}: use one of {', '.join(TEXT_DTYPES)}")
    index = _read_index(folder)
    parts = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    text = [k for k, v in parts.items() if k.startswith(TEXT_PARTS) and v[0] is not None]
    for k in text:
        if not os.path.isdir(os.path.join(folder, k)):
            raise UserError(f"{os.path.join(folder, k)} does not exist, but {folder}/model_index.json lists it: "
                            f"download the pipeline's {k} into it")
    if "text_encoder_3" in parts and "text_encoder_3" not in text:  # SD3 without T5 needs the transformer's width
        raise UserError(f"--pipeline {folder} has no text_encoder_3 (T5): SD3 stores are extracted with all three "
                        f"text encoders; download text_encoder_3/ and tokenizer_3/")
    cls = getattr(diffusers, index["_class_name"])
    skip = {k: None for k in parts if k not in text}  # transformer, vae, scheduler, ...: not needed for text
    try:
        pipeline = cls.from_pretrained(folder, local_files_only=True, dtype=TEXT_DTYPES[dtype], **skip)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load the text encoders of {folder} ({str(e).splitlines()[0][:160]}): check that "
                        f"{', '.join(text)} are complete") from None
    pipeline.to(device)
    if max_sequence_length is None:
        max_sequence_length = inspect.signature(cls.encode_prompt).parameters["max_sequence_length"].default
    if max_sequence_length < 1:
        raise UserError(f"--max-sequence-length {max_sequence_length} must be >= 1")
    return PromptEncoder(pipeline, folder, int(max_sequence_length), dtype)

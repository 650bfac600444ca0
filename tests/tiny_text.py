"""Tiny diffusers text-to-image pipelines built locally (no download): PixArt-alpha (T5) and SD3 (2 CLIP + T5).

Tokenizers come from hand-written vocabularies (T5: a Unigram word list; CLIP: a BPE with one merge chain
per word), text encoders and transformers from small configs, seeded. `save_pretrained` writes normal
diffusers pipeline folders (model_index.json + subfolders) that the code under test loads offline.
"""
import numpy as np
import torch
from PIL import Image

WORDS = "a photo of cat dog red blue small big on the grass sky".split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def t5_tokenizer():
    from transformers import T5Tokenizer
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in LETTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def clip_tokenizer(max_length=8):
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for w in WORDS:  # merge each word left to right into one token
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_encoder(d_model=32):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=64, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8)).eval()


def clip_encoder(projection_dim):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=128, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        projection_dim=projection_dim, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)).eval()


def tiny_vae(scaling_factor=0.18215, shift_factor=None):
    from diffusers import AutoencoderKL
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                         scaling_factor=scaling_factor, shift_factor=shift_factor)


def pixart_pipeline(folder, seed=0):
    """PixArt-alpha: T5 (d 32), 2-block transformer on 4 x 8 x 8 latents (64 px images: VAE stride 2 here)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                           in_channels=4, out_channels=8, caption_channels=32, cross_attention_dim=16,
                                           norm_num_groups=4, patch_size=2)
    pipe = PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(), vae=tiny_vae(),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder)
    return folder


def sd3_pipeline(folder, seed=0):
    """SD3: CLIP (hidden 8, proj 4) + CLIP (hidden 8, proj 8) + T5 (d 32); VAE with SD3's scale and shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=12, out_channels=4, pos_embed_max_size=8)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(1.5305, 0.0609),
        text_encoder=clip_encoder(4), tokenizer=clip_tokenizer(), text_encoder_2=clip_encoder(8),
        tokenizer_2=clip_tokenizer(), text_encoder_3=t5_encoder(), tokenizer_3=t5_tokenizer())
    pipe.save_pretrained(folder)
    return folder


def save_random_image(path, rng, low, high):
    """A random RGB image with sides drawn from [low, high) (not square: the center crop matters)."""
    h, w = rng.integers(low, high, 2)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)

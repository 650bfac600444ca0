"""Gaussian diffusion for DiT and MAR's DiffLoss, with the official `create_diffusion` front end."""
from . import gaussian_diffusion as gd
from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
from .losses import REP_MASKS, discretized_gaussian_log_likelihood, masked_rep_loss, mean_flat, normal_kl
from .respace import SpacedDiffusion, space_timesteps


def create_diffusion(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False, diffusion_steps=1000):
    """A SpacedDiffusion with the official DiT defaults.

    timestep_respacing: "" or None (all steps), "250", "10,10,10", [250], "ddim50".
    noise_schedule: "linear" (DiT) or "cosine" (MAR).
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )


__all__ = ["create_diffusion", "GaussianDiffusion", "SpacedDiffusion", "space_timesteps", "get_named_beta_schedule",
           "ModelMeanType", "ModelVarType", "LossType", "normal_kl", "discretized_gaussian_log_likelihood",
           "mean_flat", "masked_rep_loss", "REP_MASKS", "gd"]

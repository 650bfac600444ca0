"""Timestep respacing: sample with a subset of a trained diffusion's steps (IDDPM section 4)."""
import numpy as np

from core.errors import UserError

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """Sorted step indices of a `num_timesteps` process to keep.

    section_counts: "ddimN" (the DDIM paper's fixed integer stride giving exactly N steps), or
    comma-separated counts such as "250" / "10,10,10" (or a list / int), in which case the
    process is cut into that many equal sections and each is strided evenly, both ends included.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        spec = section_counts
        if spec.startswith("ddim"):
            want = _parse_int(spec[len("ddim"):], spec)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise UserError(f"respacing {spec!r}: no integer stride gives exactly {want} of {num_timesteps} steps; "
                            f"pick another ddimN")
        section_counts = [_parse_int(c, spec) for c in spec.split(",")]

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)  # the first `extra` sections are one step longer
        if not 0 < count <= size:
            raise UserError(f"respacing {section_counts}: cannot take {count} steps from a section of {size} "
                            f"(total {num_timesteps} steps); use counts between 1 and {size}")
        stride = 1 if count == 1 else (size - 1) / (count - 1)
        # Accumulate the fractional stride (not i * stride) and round half to even, as the official rule.
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def _parse_int(text, spec):
    try:
        return int(text)
    except ValueError:
        raise UserError(f"bad timestep respacing {spec!r}: use '' (all steps), 'N', 'N1,N2,...' or 'ddimN'") from None


class SpacedDiffusion(GaussianDiffusion):
    """The process restricted to `use_timesteps` of a base process with `betas`.

    New betas keep the base alphas_cumprod at the kept steps: beta_i = 1 - ab(t_i) / ab(t_{i-1}).
    The model still receives the base step indices (timestep_map), never rescaled.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(int(s) for s in use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base_cumprod = np.cumprod(1.0 - np.asarray(kwargs["betas"], dtype=np.float64))
        self.timestep_map, new_betas, last = [], [], 1.0
        for i, ab in enumerate(base_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - ab / last)
                last = ab
                self.timestep_map.append(i)
        super().__init__(**{**kwargs, "betas": np.array(new_betas)})

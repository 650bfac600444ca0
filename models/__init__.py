"""Model zoo: `DiT_models`, `SiT_models` (and `MAR_models`), keyed by the official names."""
from .dit import DiT
from .registry import DiT_models, SiT_models, UnknownModelError
from .sit import SiT

REGISTRIES = {"DiT": DiT_models, "SiT": SiT_models}


def family_of(name):
    """'DiT', 'SiT' or 'MAR' for a registry name; one clear error for anything else."""
    for family, registry in REGISTRIES.items():
        if name in registry:
            return family
    valid = "; ".join(f"{fam}: {', '.join(list(reg)[:6])}, ..." for fam, reg in REGISTRIES.items())
    raise UnknownModelError(f"unknown model {name!r}. Valid names ({valid}); pruned depths as 'DiT-D14/2'")


def build_model(name, **kwargs):
    """Build a registry model by name, e.g. build_model('DiT-XL/2', input_size=32)."""
    return REGISTRIES[family_of(name)][name](**kwargs)


def set_grad_checkpointing(model, enabled=True):
    """Recompute block activations in the backward pass (DiT, SiT, MAR and its DiffLoss MLP)."""
    modules = [m for m in model.modules() if hasattr(m, "grad_checkpointing")]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no gradient checkpointing switch")
    for m in modules:
        m.grad_checkpointing = enabled
    return model


from .mar import MAR, MAR_models  # noqa: E402  (mar imports from this package)
REGISTRIES["MAR"] = MAR_models

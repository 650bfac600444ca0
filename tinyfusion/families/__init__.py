"""Model families, one module each (dit.py, sit.py, mar.py, diffusers.py); `family_for(name)` picks one.

Adding a family: one module with a `Family` subclass (base.py), one entry in FAMILIES, its tests.
"""
from models import UnknownModelError
from .base import Family, unwrap
from .diffusers import DiffusersDiTFamily, PixArtFamily, SD3Family
from .dit import DiTFamily
from .mar import MARFamily
from .sit import SiTFamily

FAMILIES = [DiTFamily(), SiTFamily(), MARFamily(), DiffusersDiTFamily(), PixArtFamily(), SD3Family()]


def family_for(name):
    """The family of a model name: a registry name (DiT-XL/2, MAR-L-D16) or a pruning preset (DiT-XL-1-2)."""
    from models.layer_mask import is_preset, resolve_preset
    base = resolve_preset(name)[0] if is_preset(name) else name
    for family in FAMILIES:
        if family.owns(base):
            return family
    valid = "; ".join(family.describe() for family in FAMILIES)
    raise UnknownModelError(f"unknown model {name!r}. Valid names ({valid}); pruned depths as 'DiT-D14/2'")


def family_of_model(model):
    """The family of a built model, or None. DDP / compile wrappers are looked through, and the most derived
    class decides (a SiT is a DiT subclass; a layer-masked MaskedSiT is a SiT subclass)."""
    for cls in type(unwrap(model)).__mro__:
        for family in FAMILIES:
            if cls in family.model_classes:
                return family
    return None


__all__ = ["FAMILIES", "Family", "family_for", "family_of_model", "unwrap"]

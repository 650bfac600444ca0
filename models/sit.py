"""SiT (Ma et al. 2024), state-dict compatible with willisma/SiT.

The network is DiT's; the only difference is that `forward` keeps the first
`in_channels` output channels when learn_sigma is set (the variance half is never
trained for SiT), and that t is continuous in [0, 1] (no x1000 scaling).
"""
from .dit import DiT


class SiT(DiT):
    family = "SiT"

    def forward(self, x, t, y, force_drop_ids=None):
        out = super().forward(x, t, y, force_drop_ids)
        return out[:, : self.in_channels] if self.learn_sigma else out

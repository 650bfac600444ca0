"""Model registries with the official names: `DiT_models['DiT-XL/2'](input_size=32)`.

Besides the fixed official names, a registry also answers depth-pruned names:
`DiT-D14/2` (XL width, 14 blocks, as in TinyFusion) and `DiT-S-D6/2` (any size at
any depth), so a pruned checkpoint can always be named and rebuilt.
"""
import re

from core.errors import UserError

from .dit import DiT
from .sit import SiT

# name: (depth, hidden_size, num_heads)
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
         "Tiny": (12, 96, 4)}  # Tiny is ours (not an official size): CPU tests and the digits demo
PATCHES = (2, 4, 8)


class UnknownModelError(UserError, KeyError):
    def __str__(self):
        return self.args[0]


class ModelRegistry(dict):
    """A dict of constructors that also resolves `{family}-D{K}/{p}` and `{family}-{size}-D{K}/{p}`."""

    def __init__(self, family, cls, fixed, examples):
        super().__init__(fixed)
        self.family, self.cls, self.examples = family, cls, examples
        self.pattern = re.compile(rf"^{family}-(?:(S|B|L|XL|Tiny)-)?D(\d+)/(\d+)$")

    def _resolve(self, name):
        m = self.pattern.match(name) if isinstance(name, str) else None
        if not m or int(m.group(2)) < 1:
            return None
        size, depth, patch = m.group(1) or "XL", int(m.group(2)), int(m.group(3))
        return _constructor(self.cls, size, patch, depth)

    def __missing__(self, name):
        ctor = self._resolve(name)
        if ctor is None:
            raise UnknownModelError(
                f"unknown {self.family} model {name!r}: choose one of {', '.join(self.keys())}, "
                f"or a depth-pruned name such as {self.examples}")
        return ctor

    def __contains__(self, name):
        return dict.__contains__(self, name) or self._resolve(name) is not None

    def get(self, name, default=None):
        return self[name] if name in self else default


def _constructor(cls, size, patch, depth=None):
    base_depth, hidden, heads = SIZES[size]

    def build(**kwargs):
        # Keywords override the named size, so tests and demos can shrink any preset.
        config = dict(depth=depth or base_depth, patch_size=patch, hidden_size=hidden, num_heads=heads)
        return cls(**{**config, **kwargs})

    build.__name__ = f"{cls.__name__}_{size}_{patch}"
    return build


def _fixed(cls, family):
    table = {f"{family}-{size}/{p}": _constructor(cls, size, p) for size in SIZES for p in PATCHES}
    for k in (19, 14, 7):  # the TinyFusion names
        table[f"{family}-D{k}/2"] = _constructor(cls, "XL", 2, k)
    return table


DiT_models = ModelRegistry("DiT", DiT, _fixed(DiT, "DiT"), "'DiT-D14/2' or 'DiT-S-D6/2'")
SiT_models = ModelRegistry("SiT", SiT, _fixed(SiT, "SiT"), "'SiT-D14/2' or 'SiT-S-D6/2'")

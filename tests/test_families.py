"""Model families: one module each (tinyfusion/families/), asked by name; nothing else branches on a family."""
import ast
import os
from types import SimpleNamespace

import pytest
import torch

from core.errors import UserError
from models import DiT, SiT
from tinyfusion.checkpoint import check_state_dict
from tinyfusion.families import FAMILIES, family_for, family_of_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where family names may be compared: the family modules themselves, the model definitions, the tests.
EXEMPT = {os.path.join("tinyfusion", "families"), "models", "core", "tests"}
FAMILY_NAMES = {f.name for f in FAMILIES}


def _strings(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_strings(e) for e in node.elts)) if node.elts else set()
    return set()


def family_branches(path):
    """(line, code) of every place that decides by a family's name: `x == "MAR"`, `"SiT" in name`,
    `family.name != ...`, `name.startswith("DiT")`, `name.split("-")[0]`."""
    source = open(path).read()
    found = []
    for node in ast.walk(ast.parse(source, path)):
        hit = False
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            hit = any(_strings(o) & FAMILY_NAMES for o in operands) or any(
                isinstance(o, ast.Attribute) and o.attr == "name" and "family" in ast.unparse(o.value) for o in operands)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            hit = node.func.attr in ("startswith", "endswith") and any(
                s.startswith(tuple(FAMILY_NAMES)) for a in node.args for s in _strings(a))
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call):
            func = node.value.func
            hit = isinstance(func, ast.Attribute) and func.attr == "split" and _strings(node.slice) == set() and \
                isinstance(node.slice, ast.Constant) and node.slice.value == 0 and \
                any(_strings(a) == {"-"} for a in node.value.args)
        if hit:
            found.append((node.lineno, ast.get_source_segment(source, node)))
    return found


def non_family_sources():
    for folder, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(folder, ROOT)
        dirs[:] = [d for d in dirs if not d.startswith((".", "__")) and os.path.normpath(os.path.join(rel, d)) not in EXEMPT]
        yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


def test_no_family_name_branches_outside_the_family_modules():
    sources = list(non_family_sources())
    assert any(p.endswith(os.path.join("tinyfusion", "trainer.py")) for p in sources)
    assert not any("families" in p for p in sources)
    found = {os.path.relpath(p, ROOT): family_branches(p) for p in sources}
    assert not {p: hits for p, hits in found.items() if hits}


def test_the_scan_sees_each_kind_of_branch(tmp_path):
    path = tmp_path / "x.py"
    path.write_text('if family == "MAR": pass\nok = "SiT" in name\nf.name != g\n'
                    'if family.name == other: pass\nname.startswith("DiT-")\nfam = name.split("-")[0]\n'
                    'x = name.split("/")[0]\nTABLE = {"DiT": 1}\n')
    assert [line for line, _ in family_branches(path)] == [1, 2, 4, 5, 6]


@pytest.mark.parametrize("name, family", [("DiT-XL/2", "DiT"), ("DiT-S-D6/2", "DiT"), ("SiT-D14/2", "SiT"),
                                          ("MAR-L-E10D6", "MAR"), ("DiT-XL-1-2", "DiT"), ("SiT-D14-2-4", "SiT"),
                                          ("MAR-L-1-2", "MAR")])
def test_family_for_registry_names_and_presets(name, family):
    assert family_for(name).name == family


def test_unknown_model_lists_every_family():
    with pytest.raises(UserError) as e:
        family_for("ViT-B/16")
    assert "'ViT-B/16'" in str(e.value) and all(f"{f.name}: " in str(e.value) for f in FAMILIES)


def test_family_of_model_looks_through_wrappers():
    dit = DiT(input_size=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    sit = SiT(input_size=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    assert family_of_model(dit).name == "DiT" and family_of_model(sit).name == "SiT"  # SiT subclasses DiT
    assert family_of_model(SimpleNamespace(module=sit)).name == "SiT"
    assert family_of_model(torch.nn.Linear(2, 2)) is None


def test_latent_shapes_and_constructor_keywords():
    args = SimpleNamespace(image_size=256, vae="ema", channels=3)
    assert family_for("DiT-XL/2").latent_shape(args) == (4, 32, 32)  # SD VAE: 4 channels, stride 8
    assert family_for("MAR-L").latent_shape(args) == (16, 16, 16)   # KL-16: 16 channels, stride 16
    assert family_for("MAR-L").model_kwargs("MAR-L", (16, 16, 16), 1000) == dict(img_size=256, vae_stride=16,
                                                                               class_num=1000)
    assert family_for("SiT-XL/2").model_kwargs("SiT-XL/2", (4, 32, 32), 10) == dict(input_size=32, in_channels=4,
                                                                                 num_classes=10)
    with pytest.raises(UserError, match="multiple of 16"):
        family_for("MAR-L").latent_shape(SimpleNamespace(image_size=264, vae="ema"))


def test_a_checkpoint_of_another_family_names_both():
    with torch.device("meta"):
        dit = family_for("DiT-S/2").build("DiT-S/2", (4, 8, 8), 10)
    mar_weights = {"encoder_blocks.0.attn.qkv.weight": torch.zeros(1)}
    with pytest.raises(UserError, match="is a MAR checkpoint but --model DiT-S/2 is a DiT model"):
        check_state_dict(dit, mar_weights, "DiT-S/2", "mar.pt")


def test_a_new_family_is_one_class_and_one_registry_entry(tmp_path, monkeypatch):
    """A family registered in FAMILIES (nothing else edited) trains with train.py and prunes with
    prune_by_index.py, its own names all the way through."""
    import prune_by_index
    import train
    from models.registry import ModelRegistry, _fixed
    from test_train import TINY, make_store
    from tinyfusion.families import dit
    from tinyfusion.pruning import read_record

    class ToyDiT(DiT):
        family = "Toy"

    class ToyFamily(dit.DiTFamily):
        name, model_classes = "Toy", (ToyDiT,)
        registry = ModelRegistry("Toy", ToyDiT, _fixed(ToyDiT, "Toy"), "'Toy-S-D2/2'")

    monkeypatch.setattr("tinyfusion.families.FAMILIES", [*FAMILIES, ToyFamily()])
    store = make_store(str(tmp_path / "store"), n=16)
    weights = str(tmp_path / "toy.pt")
    train.main(["--model", "Toy-S-D2/2", "--data-path", store, "--results-dir", str(tmp_path / "out"), "--prefix",
                "toy", "--max-steps", "2", "--global-batch-size", "8", "--device", "cpu", "--save-model", weights, *TINY])
    pruned = str(tmp_path / "pruned.pt")
    prune_by_index.main(prune_by_index.build_parser().parse_args(
        ["--model", "Toy-S-D2/2", "--ckpt", weights, "--kept-indices", "[1]", "--save-model", pruned, *TINY[:4]]))
    record = read_record(pruned)
    assert record["pruned_model"] == "Toy-S-D1/2" and record["kept"] == [1]
    model = family_for("Toy-S-D1/2").load("Toy-S-D1/2", (4, 4, 4), 4, pruned)
    assert type(model) is ToyDiT and family_of_model(model).name == "Toy" and model.depth == 1

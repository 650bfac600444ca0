"""FID Inception port: TF1 resize, pytorch-fid weight layout, the three ADM feature tensors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from core.errors import UserError
from tinyfusion.inception import FIDInception3, InceptionExtractor, load_inception, tf1_resize_bilinear


def _tf1_resize_numpy(img, out_h, out_w):
    """TF1 legacy ResizeBilinear written out per pixel: src = dst * in / out, no half-pixel shift."""
    in_h, in_w = img.shape[-2:]
    out = np.zeros(img.shape[:-2] + (out_h, out_w))
    for y in range(out_h):
        sy = y * (in_h / out_h)
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, in_h - 1), sy - y0
        for x in range(out_w):
            sx = x * (in_w / out_w)
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, in_w - 1), sx - x0
            top = img[..., y0, x0] + (img[..., y0, x1] - img[..., y0, x0]) * fx
            bot = img[..., y1, x0] + (img[..., y1, x1] - img[..., y1, x0]) * fx
            out[..., y, x] = top + (bot - top) * fy
    return out


def test_tf1_resize_matches_formula_not_half_pixel():
    img = np.random.default_rng(0).integers(0, 256, (1, 2, 5, 7)).astype(np.float32)
    for size in [(9, 4), (13, 11), (3, 3)]:
        got = tf1_resize_bilinear(torch.from_numpy(img), size).numpy()
        np.testing.assert_allclose(got, _tf1_resize_numpy(img.astype(np.float64), *size), atol=1e-3)
        half_pixel = F.interpolate(torch.from_numpy(img), size=size, mode="bilinear", align_corners=False)
        assert np.abs(half_pixel.numpy() - got).max() > 1.0


def _pytorch_fid_layout_state_dict():
    """A random state dict in pytorch-fid's layout: it builds torchvision's Inception3 with
    num_classes=1008, aux_logits=False and swaps in blocks that keep torchvision's parameter names."""
    torch.manual_seed(0)
    ref = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if t.is_floating_point():
                if name.endswith(("running_var", "bn.weight")):
                    t.uniform_(0.5, 1.5)
                elif name.endswith("conv.weight"):  # He-scaled so activations survive ~90 layers
                    t.normal_(0, (2 / t[0].numel()) ** 0.5)
                else:
                    t.normal_(0, 0.1)
    return ref.state_dict()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Load the pytorch-fid-layout file, run 2 images once with hooks on the tensors ADM reads."""
    state = _pytorch_fid_layout_state_dict()
    path = tmp_path_factory.mktemp("w") / "pt_inception.pth"
    torch.save(state, path)
    model = load_inception(str(path))
    seen = {}

    def keep(name):
        return lambda mod, args, out: seen.update({name: (args[0].clone(), out.clone())})

    for name in ("Conv2d_1a_3x3", "Mixed_5b", "Mixed_6d.branch1x1", "Mixed_7b", "Mixed_7c"):
        model.get_submodule(name).register_forward_hook(keep(name))
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    feats = InceptionExtractor(model)(images)
    return dict(state=state, model=model, seen=seen, images=images, feats=feats)


def test_loads_pytorch_fid_state_dict(run):
    loaded = run["model"].state_dict()
    assert set(loaded) == set(run["state"])
    for name, t in run["state"].items():
        torch.testing.assert_close(loaded[name], t, rtol=0, atol=0)


def test_output_shapes_and_input_preprocessing(run):
    feats = run["feats"]
    assert {k: v.shape for k, v in feats.items()} == {"pool": (2, 2048), "spatial": (2, 2023), "logits": (2, 1008)}
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in feats.values())
    assert feats["pool"].std() > 1e-3  # the random net does not collapse, so the checks below bite
    nchw = run["images"].transpose(0, 3, 1, 2).astype(np.float64)
    expected = (_tf1_resize_numpy(nchw, 299, 299) - 128) / 128
    np.testing.assert_allclose(run["seen"]["Conv2d_1a_3x3"][0].numpy(), expected, atol=1e-5)


def test_spatial_is_mixed_6d_branch1x1_in_nhwc_order(run):
    conv = run["seen"]["Mixed_6d.branch1x1"][1].numpy()  # (N, 192, 17, 17) post BN+ReLU
    assert conv.shape == (2, 192, 17, 17)
    nhwc = conv.transpose(0, 2, 3, 1)[..., :7].reshape(2, -1)
    np.testing.assert_array_equal(run["feats"]["spatial"], nhwc)
    assert not np.array_equal(run["feats"]["spatial"], conv[:, :7].reshape(2, -1))


def test_pool3_and_unbiased_logits(run):
    mixed_7c = run["seen"]["Mixed_7c"][1].numpy().astype(np.float64)
    pool = mixed_7c.mean((2, 3))
    np.testing.assert_allclose(run["feats"]["pool"], pool, rtol=1e-5, atol=1e-6)
    w, b = run["state"]["fc.weight"].double().numpy(), run["state"]["fc.bias"].double().numpy()
    np.testing.assert_allclose(run["feats"]["logits"], pool @ w.T, rtol=1e-4, atol=1e-4)
    assert np.abs(run["feats"]["logits"] - (pool @ w.T + b)).max() > 1e-2  # no bias, as ADM


def test_pool_branches_follow_the_tf_graph(run):
    """Pool branch = last channels of a block: padding-free average pool (5b, 7b), max pool (7c)."""
    model = run["model"]
    for name, pool in [("Mixed_5b", lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)),
                       ("Mixed_7b", lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)),
                       ("Mixed_7c", lambda x: F.max_pool2d(x, 3, 1, 1))]:
        x, out = run["seen"][name]
        branch = model.get_submodule(name).branch_pool
        with torch.no_grad():
            expected = branch(pool(x))
            torchvision_style = branch(F.avg_pool2d(x, 3, 1, 1))
        torch.testing.assert_close(out[:, -expected.shape[1]:], expected)
        assert (out[:, -expected.shape[1]:] - torchvision_style).abs().max() > 1e-4


def test_missing_or_wrong_weights_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("TINYFUSION_INCEPTION_WEIGHTS", raising=False)
    # no file given: the released weights are fetched (here offline, as conftest makes every test)
    with pytest.raises(UserError, match="cannot download pt_inception-2015-12-05-6726825d.pth.*"
                                        "python download.py pt_inception-2015-12-05-6726825d.pth"):
        load_inception()
    monkeypatch.setenv("TINYFUSION_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="nope.pth"):
        load_inception()
    torch.save(FIDInception3().Mixed_5b.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="not an FID Inception state dict"):
        load_inception(str(tmp_path / "wrong.pth"))

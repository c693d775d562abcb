"""Tests of cifar_ssl.py (Table 1) and the SSL losses in common.py, on tiny generated data."""
import itertools
import json
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

import cifar_ssl
import common
from common import GaussianHead, nt_xent, vicreg_loss

REPO = Path(__file__).resolve().parents[1]
FAST = ["--image-size", "16", "--batch-size", "8", "--hidden", "64", "--dim", "8",
        "--probe-steps", "30", "--subsample", "16", "--quiet", "--device", "cpu",
        "--warmup-epochs", "0", "--no-download"]
"""Flags for end-to-end runs of a few seconds: 16x16 images, batch 8, small projector."""


# --------------------------------------------------------------------------------------------
# Losses (common.py)
# --------------------------------------------------------------------------------------------

def nt_xent_by_loops(z1, z2, t):
    """Chen et al. 2020, eq. 1, one anchor at a time."""
    z = [v / np.linalg.norm(v) for v in np.concatenate([z1, z2])]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denominator = sum(math.exp(z[i] @ z[k] / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(z[i] @ z[j] / t) / denominator)
    return total / (2 * n)


def test_nt_xent_equals_eq1():
    # orthonormal pairs, t = 1: every anchor sees its positive at cos 1 and two others at 0, 1
    # -> l = -log(e / (e + 1 + e^0)) ... with candidates {0, 1, 0}: log(1 + 2 / e)
    eye = torch.eye(2)
    assert nt_xent(eye, eye, 1.0).item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)
    rng = np.random.default_rng(0)
    z1, z2 = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    expected = nt_xent_by_loops(z1, z2, 0.2)
    got = nt_xent(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32),
                  0.2).item()
    assert got == pytest.approx(expected, rel=1e-5)
    # cosine similarity: rescaling rows changes nothing
    assert nt_xent(3 * torch.tensor(z1).float(), torch.tensor(z2).float(), 0.2).item() == \
        pytest.approx(expected, rel=1e-5)


def test_vicreg_equals_its_terms_by_hand():
    z1 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    z2 = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    # invariance: squared differences (0, 1, 0, 1) / 4 = 0.5
    # variance: z1 stds sqrt(2 + 1e-4), sqrt(1e-4) = 0.01 -> (0 + 0.99) / 2 = 0.495; z2: 0
    # covariance: z1 off-diagonal 0; z2 off-diagonal 2 -> (2^2 + 2^2) / d = 4
    assert vicreg_loss(z1, z2).item() == pytest.approx(25 * 0.5 + 25 * 0.495 + 4, rel=1e-6)
    assert vicreg_loss(z1, z2, 1, 0, 0).item() == pytest.approx(0.5)
    assert vicreg_loss(z1, z2, 0, 1, 0).item() == pytest.approx(0.495, rel=1e-6)
    assert vicreg_loss(z1, z2, 0, 0, 1).item() == pytest.approx(4.0)


# --------------------------------------------------------------------------------------------
# LARS and the schedule
# --------------------------------------------------------------------------------------------

def test_lars_one_step_matches_the_update_rule():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))      # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = cifar_ssl.LARS([{"params": [w]},
                          {"params": [b], "weight_decay": 0.0, "adapt": False}],
                         lr=0.5, momentum=0.9, weight_decay=0.1, trust=0.02)
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])   # ||g|| = 1
    opt.step()
    # rate = 0.02 * 5 / (1 + 0.1 * 5) = 1 / 15; clipped: min(rate / 0.5, 1) = 2 / 15
    # d = (g + 0.1 w) * 2 / 15 = (0.9, 1.2) * 2 / 15 = (0.12, 0.16); w -= 0.5 d
    assert torch.allclose(w.detach(), torch.tensor([[2.94, 3.92]]), atol=1e-6)
    assert b.item() == pytest.approx(1 - 0.5 * 0.5)                      # plain SGD, no decay
    b.grad = torch.tensor([0.5])
    w.grad = torch.tensor([[0.0, 0.0]])
    opt.step()
    assert b.item() == pytest.approx(0.75 - 0.5 * (0.9 * 0.5 + 0.5))     # momentum
    # a zero gradient: no weight decay, no new step (solo-learn, lightly); v = 0.9 (0.12, 0.16)
    expected = torch.tensor([[2.94, 3.92]]) - 0.5 * 0.9 * torch.tensor([[0.12, 0.16]])
    assert torch.allclose(w.detach(), expected, atol=1e-6)


def test_lars_leaves_a_parameter_with_a_zero_gradient_alone():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = cifar_ssl.LARS([w], lr=0.5, momentum=0.9, weight_decay=0.1, trust=0.02)
    w.grad = torch.zeros(1, 2)
    opt.step()
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([[3.0, 4.0]]))  # no weight decay either
    zero = nn.Parameter(torch.zeros(1, 2))  # ||w|| = 0: the plain gradient, no decay, no rate
    opt = cifar_ssl.LARS([zero], lr=0.5, momentum=0.0, weight_decay=0.1, trust=0.02)
    zero.grad = torch.tensor([[1.0, 2.0]])
    opt.step()
    assert torch.allclose(zero.detach(), torch.tensor([[-0.5, -1.0]]))


def test_lars_clipping_caps_the_rate_at_the_learning_rate():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = cifar_ssl.LARS([w], lr=0.01, momentum=0.0, weight_decay=0.1, trust=0.02)
    w.grad = torch.tensor([[0.6, 0.8]])
    opt.step()
    # rate / lr = (1 / 15) / 0.01 > 1 -> 1: an SGD step on g + wd w
    assert torch.allclose(w.detach(), torch.tensor([[3 - 0.01 * 0.9, 4 - 0.01 * 1.2]]))


def test_optimizer_groups_exclude_biases_and_norms():
    args = cifar_ssl.parse_args(["--out", "unused", "--method", "vicreg", "--hidden", "32",
                                 "--dim", "8", "--batch-size", "512"])
    model = cifar_ssl.build_model(args, 10, torch.device("cpu"))
    weights, flat, probe = cifar_ssl.make_optimizer(model, args).param_groups
    assert weights["adapt"] and weights["weight_decay"] == 1e-4
    assert weights["base_lr"] == pytest.approx(0.3 * 512 / 256)
    assert all(p.ndim > 1 for p in weights["params"])
    assert not flat["adapt"] and flat["weight_decay"] == 0.0 and flat["params"]
    assert all(p.ndim == 1 for p in flat["params"])
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert norm_weights <= {id(p) for p in flat["params"]}
    assert {id(p) for p in probe["params"]} == {id(p) for p in model.probe.parameters()}
    n_params = sum(len(g["params"]) for g in (weights, flat, probe))
    assert n_params == len(list(model.parameters()))


def test_warmup_then_cosine():
    assert cifar_ssl.lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert cifar_ssl.lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert cifar_ssl.lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert cifar_ssl.lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert cifar_ssl.lr_factor(99, 10, 100) == pytest.approx(0.0, abs=1e-3)


# --------------------------------------------------------------------------------------------
# Augmentations: torchvision's parameter distributions and operations, batched
# --------------------------------------------------------------------------------------------

def test_crop_parameters_follow_random_resized_crop():
    torch.manual_seed(0)
    n, size = 4000, 32
    ours = cifar_ssl.sample_crops(n, size, size, torch.device("cpu")).numpy()
    image = torch.zeros(3, size, size)
    theirs = np.array([torchvision.transforms.RandomResizedCrop.get_params(
        image, list(cifar_ssl.CROP_SCALE), list(cifar_ssl.CROP_RATIO)) for _ in range(n)])
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= size).all() and (left + w <= size).all()
    for stat in (lambda b: b[:, 2] * b[:, 3] / size ** 2,     # area fraction
                 lambda b: np.log(b[:, 3] / b[:, 2]),         # log aspect ratio
                 lambda b: b[:, 0] + b[:, 2] / 2):            # vertical centre
        assert scipy.stats.ks_2samp(stat(ours), stat(theirs)).pvalue > 1e-3
    area = ours[:, 2] * ours[:, 3] / size ** 2
    assert area.min() < 0.12 and area.max() == 1.0
    # no try fits (ratio far outside a square image): torchvision's central fallback
    fallback = cifar_ssl.sample_crops(5, size, size, torch.device("cpu"), (0.9, 1.0), (3.0, 4.0))
    expected = torchvision.transforms.RandomResizedCrop.get_params(image, [0.9, 1.0], [3.0, 4.0])
    assert (fallback.numpy() == np.array(expected)).all()


def test_jitter_grey_flip_parameters_follow_torchvision():
    reference = torchvision.transforms.ColorJitter(**cifar_ssl.JITTER)
    ranges = cifar_ssl.jitter_ranges(cifar_ssl.JITTER)
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert ranges[name] == pytest.approx(getattr(reference, name))
    assert ranges["brightness"] == pytest.approx((0.6, 1.4))  # Appendix C
    assert ranges["saturation"] == pytest.approx((0.8, 1.2))
    torch.manual_seed(1)
    n = 20000
    params = cifar_ssl.sample_augment_params(n, 32, 32, torch.device("cpu"))
    for k, (lo, hi) in enumerate(ranges.values()):
        factors = params["factors"][:, k].numpy()
        assert lo <= factors.min() < lo + 0.01 and hi - 0.01 < factors.max() <= hi
        assert scipy.stats.kstest(factors, "uniform", args=(lo, hi - lo)).pvalue > 1e-3
    for key, p in (("jitter", 0.8), ("grey", 0.2), ("flip", 0.5)):
        rate = params[key].float().mean().item()
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), key
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in params["order"].tolist():
        counts[tuple(row)] += 1
    assert sum(counts.values()) == n  # every row is a permutation of the four operations
    assert scipy.stats.chisquare(list(counts.values())).pvalue > 1e-3


@pytest.fixture
def images():
    torch.manual_seed(2)
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)


def test_batched_operations_equal_torchvision_per_image(images):
    x = images.float() / 255
    boxes = torch.tensor([[0, 0, 32, 32], [3, 5, 10, 20], [10, 2, 22, 17], [0, 0, 5, 5],
                          [1, 1, 31, 30], [7, 9, 12, 12]])
    flip = torch.tensor([False, True, False, True, False, True])
    for size in (32, 16):  # upsampling, and the antialiased downsampling of large crops
        ours = cifar_ssl.resized_crop(x, boxes, size, flip)
        for k, (top, left, h, w) in enumerate(boxes.tolist()):
            ref = TF.resized_crop(x[k], top, left, h, w, [size, size],
                                  interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            ref = TF.horizontal_flip(ref) if flip[k] else ref
            assert torch.allclose(ours[k], ref.clamp(0, 1), atol=1e-5)
    factors = torch.linspace(0.6, 1.4, 6)
    shifts = torch.linspace(-0.1, 0.1, 6)
    references = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for op, ref in zip(cifar_ssl.JITTER_OPS[:3], references, strict=True):
        ours = op(x, factors)
        for k in range(6):
            assert torch.allclose(ours[k], ref(x[k], factors[k].item()), atol=1e-6)
    ours = cifar_ssl.shift_hue(x, shifts)
    for k in range(6):
        assert torch.allclose(ours[k], TF.adjust_hue(x[k], shifts[k].item()), atol=1e-5)
    assert torch.allclose(cifar_ssl.grey(x)[:, 0], TF.rgb_to_grayscale(x)[:, 0], atol=1e-6)


def test_augment_equals_the_appendix_c_pipeline_per_image(images):
    torch.manual_seed(3)
    params = cifar_ssl.sample_augment_params(6, 32, 32, torch.device("cpu"))
    params["jitter"][:2] = torch.tensor([True, False])  # both branches, whatever the seed
    mean, std = torch.tensor(cifar_ssl.CIFAR_MEAN), torch.tensor(cifar_ssl.CIFAR_STD)
    ours = cifar_ssl.augment(images, params, 32, mean, std)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k in range(6):
        top, left, h, w = params["crop"][k].tolist()
        y = TF.resized_crop(images[k].float() / 255, top, left, h, w, [32, 32],
                            interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        y = y.clamp(0, 1)
        if params["jitter"][k]:
            for op in params["order"][k].tolist():
                y = ops[op](y, params["factors"][k, op].item())
        if params["grey"][k]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        if params["flip"][k]:
            y = TF.horizontal_flip(y)
        y = TF.normalize(y, list(cifar_ssl.CIFAR_MEAN), list(cifar_ssl.CIFAR_STD))
        assert torch.allclose(ours[k], y, atol=1e-4), k


def test_imagenet_recipe_blur_and_solarization_equal_torchvision_per_image(images):
    x = images.float() / 255
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    ours = cifar_ssl.gaussian_blur(x, sigma, 5)
    for k in range(6):
        ref = TF.gaussian_blur(x[k], [5, 5], [sigma[k].item()] * 2)
        assert torch.allclose(ours[k], ref, atol=1e-6), k
    torch.manual_seed(4)
    params = {**cifar_ssl.sample_augment_params(6, 32, 32, torch.device("cpu")),
              **cifar_ssl.sample_imagenet_params(6, 1, torch.device("cpu"))}
    params.update(jitter=torch.zeros(6, dtype=torch.bool), grey=torch.zeros(6, dtype=torch.bool),
                  blur=torch.tensor([True, False] * 3),
                  solarize=torch.tensor([True] * 3 + [False] * 3))
    mean, std = torch.zeros(3), torch.ones(3)
    ours = cifar_ssl.augment(images, params, 32, mean, std)
    plain = cifar_ssl.resized_crop(x, params["crop"], 32, params["flip"])
    for k in range(6):
        # kernel: a tenth of the side, odd: 5 px at 32 px (23 px at 224 px)
        y = TF.gaussian_blur(plain[k], [5, 5], [params["blur_sigma"][k].item()] * 2) \
            if params["blur"][k] else plain[k]
        y = TF.solarize(y, 0.5) if params["solarize"][k] else y
        assert torch.allclose(ours[k], y, atol=1e-5), k
    # view 0 always blurs and never solarizes; view 1 blurs with p 0.1 and solarizes with p 0.2
    view0, view1 = (cifar_ssl.sample_imagenet_params(20_000, view, torch.device("cpu"))
                    for view in (0, 1))
    assert view0["blur"].all() and not view0["solarize"].any()
    assert view1["blur"].float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert view1["solarize"].float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert 0.1 <= view1["blur_sigma"].min() and view1["blur_sigma"].max() <= 2.0


def test_recipe_follows_the_image_size(tmp_path):
    def recipe(*flags):
        return cifar_ssl.parse_args(["--out", str(tmp_path / "r"), *flags]).recipe
    assert recipe() == "cifar" and recipe("--image-size", "224") == "imagenet"
    assert recipe("--image-size", "224", "--recipe", "cifar") == "cifar"


# --------------------------------------------------------------------------------------------
# Model: CIFAR stem, projectors, noise head
# --------------------------------------------------------------------------------------------

def test_resnet18_cifar_stem_and_projectors_of_appendix_c():
    backbone, features = cifar_ssl.resnet_backbone("resnet18", cifar_stem=True)
    assert features == 512
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, nn.Identity)
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    for method, dims in (("simclr", [2048, 256]), ("vicreg", [2048, 2048, 2048])):
        projector = cifar_ssl.make_projector(method, 512, 2048, cifar_ssl.PROJECTOR[method][1])
        linears = [m for m in projector if isinstance(m, nn.Linear)]
        assert [m.out_features for m in linears] == dims
        has_bn = any(isinstance(m, nn.BatchNorm1d) for m in projector)
        assert has_bn == (method == "vicreg")


def test_head_none_is_exactly_the_standard_method():
    x = torch.randn(8, 3, 16, 16)
    torch.manual_seed(4)
    model = cifar_ssl.SSLNet("simclr", "resnet18", True, 64, 8, 10, head="none").train()
    torch.manual_seed(4)
    backbone, features = cifar_ssl.resnet_backbone("resnet18", cifar_stem=True)
    projector = cifar_ssl.make_projector("simclr", features, 64, 8)
    baseline = nn.Sequential(backbone, projector).train()
    assert model.head is None
    assert not any(k.startswith("head.") for k in model.state_dict())
    h, z = model(x)
    assert torch.equal(z, baseline(x))
    assert torch.equal(h, backbone(x))


def test_the_head_normalizes_and_the_step_adds_noise_only_at_sigma_above_zero(monkeypatch):
    torch.manual_seed(4)
    model = cifar_ssl.SSLNet("simclr", "resnet18", True, 64, 8, 10).train()
    assert isinstance(model.head, GaussianHead)
    p = model.projector(model.backbone(torch.randn(8, 3, 16, 16)))
    z = model.head(p)
    assert torch.allclose(z, (p - p.mean(0)) / torch.sqrt(p.var(0, unbiased=False) + 1e-5))
    seen = {}
    for sigma in (0.0, 0.5):
        args = cifar_ssl.parse_args(["--out", "unused", "--sigma", str(sigma), "--no-amp"])
        trainer = cifar_ssl.Trainer(model, args, torch.zeros(3), torch.ones(3),
                                    torch.device("cpu"))
        monkeypatch.setattr(model, "forward", lambda x: (torch.zeros(len(x), 512), z.detach()))
        trainer.loss_fn = lambda z1, z2: seen.setdefault(sigma, (z1, z2))[0].sum() * 0
        trainer.step(torch.zeros(8, 3, 4, 4), torch.zeros(8, 3, 4, 4),
                     torch.zeros(8, dtype=torch.long), 1.0)
    assert torch.equal(seen[0.0][0], z) and torch.equal(seen[0.0][1], z)
    for view in seen[0.5]:  # z + Z, Z ~ N(0, 0.5^2 I), drawn anew for each view
        assert (view - z).std().item() == pytest.approx(0.5, rel=0.5)
    assert not torch.equal(*seen[0.5])


# --------------------------------------------------------------------------------------------
# Probe and normality
# --------------------------------------------------------------------------------------------

def test_linear_probe_separates_linearly_separable_features():
    gen = torch.Generator().manual_seed(6)
    directions = torch.randn(10, 64, generator=gen)

    def sample(n):
        y = torch.randint(0, 10, (n,), generator=gen)
        return 3 * directions[y] + torch.randn(n, 64, generator=gen), y
    (f_tr, y_tr), (f_te, y_te) = sample(2000), sample(1000)
    result = cifar_ssl.linear_probe(f_tr, y_tr, f_te, y_te, 10, steps=100)
    assert result["top1"] > 0.97 and result["top5"] == 1.0 and result["train_top1"] > 0.97
    shuffled = cifar_ssl.linear_probe(f_tr, y_tr[torch.randperm(2000, generator=gen)], f_te,
                                      y_te, 10, steps=100)
    assert shuffled["top1"] < 0.2  # labels without information: chance


def test_linear_probe_picks_its_weight_decay_on_a_held_out_fifth(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (500,), generator=gen)
    f = torch.randn(500, 8, generator=gen) + y[:, None]
    fits = []
    fit = cifar_ssl.fit_logistic

    def recorded(a, labels, n_classes, steps, weight_decay):
        fits.append((len(a), weight_decay))
        return fit(a, labels, n_classes, steps, weight_decay)
    monkeypatch.setattr(cifar_ssl, "fit_logistic", recorded)
    result = cifar_ssl.linear_probe(f, y, f, y, 3, steps=50, weight_decays=(1e-4, 1.0, 1e3))
    assert fits[:3] == [(400, 1e-4), (400, 1.0), (400, 1e3)]
    assert fits[3] == (500, result["weight_decay"]) and len(fits) == 4
    fits.clear()
    assert cifar_ssl.linear_probe(f, y, f, y, 3, steps=50)["weight_decay"] == 1e-4
    assert fits == [(500, 1e-4)]


def test_normality_skips_henze_zirkler_when_dim_reaches_the_subsample():
    rng = np.random.default_rng(7)
    low = common.normality_report(rng.standard_normal((1000, 2)), subsample=64, points=500)
    assert low["points"] == 500 and low["henze_zirkler_p"] > 0.05 and low["dagostino_p"] > 0.05
    high = common.normality_report(rng.standard_normal((1000, 100)), subsample=64, points=500)
    assert high["henze_zirkler_p"] is None and high["shapiro_p"] > 0.05
    skewed = common.normality_report(rng.exponential(size=(1000, 2)), subsample=64, points=500)
    assert skewed["dagostino_p"] < 0.05


# --------------------------------------------------------------------------------------------
# End to end on generated data in CIFAR's and ImageFolder's on-disk formats
# --------------------------------------------------------------------------------------------

def write_cifar(root, dataset, n_train=64, n_test=32, seed=0):
    """Random images in CIFAR's pickled-batch format; the class sets the mean colour."""
    folder, train_files, test_files, label_key, _ = cifar_ssl.CIFAR_FILES[dataset]
    rng = np.random.default_rng(seed)
    n_classes = 10 if dataset == "cifar10" else 100
    (root / folder).mkdir(parents=True)
    for files, n in ((train_files, n_train), (test_files, n_test)):
        for name in files:
            labels = rng.integers(0, n_classes, n)
            data = np.clip(rng.normal(25 * (labels % 10), 40, (3072, n)).T, 0, 255)
            with open(root / folder / name, "wb") as fh:
                pickle.dump({b"data": data.astype(np.uint8), label_key: labels.tolist()}, fh)
    return root


def run(out, *flags):
    cifar_ssl.main(["--out", str(out), *FAST, *flags])
    return json.loads((out / "metrics.json").read_text())


def test_two_steps_on_cifar10_pickles_write_metrics(tmp_path):
    root = write_cifar(tmp_path / "data", "cifar10", n_train=16)  # 5 batches of 16
    metrics = run(tmp_path / "run", "--data-dir", str(root), "--steps", "2", "--sigma", "0.3")
    assert metrics["method"] == "simclr" and metrics["sigma"] == 0.3 and metrics["head"] == "bn"
    assert metrics["data"]["n_train"] == 80 and metrics["data"]["n_test"] == 32
    assert metrics["steps"] == 2 and len(metrics["train_history"]) == 2
    assert math.isfinite(metrics["final_loss"])
    assert 0 <= metrics["probe"]["top1"] <= metrics["probe"]["top5"] <= 1
    assert 0 <= metrics["online_probe"]["test_top1"] <= 1
    assert metrics["capacity"] == pytest.approx(8 / 2 * math.log(1 + 1 / 0.09))  # eq. 5
    assert 0 <= metrics["normality"]["henze_zirkler_p"] <= 1  # d = 8 < subsample 16
    for name in ("args.json", "checkpoint.pt", "model.pt", "embeddings.npz", "scatter.png"):
        assert (tmp_path / "run" / name).is_file()
    z = np.load(tmp_path / "run" / "embeddings.npz")["z_test"]
    assert z.shape == (32, 8)


def test_vicreg_on_cifar100_pickles_and_random_init_baseline(tmp_path):
    root = write_cifar(tmp_path / "data", "cifar100")
    metrics = run(tmp_path / "run", "--dataset", "cifar100", "--data-dir", str(root), "--steps",
                  "2", "--method", "vicreg", "--dim", "32")
    assert metrics["method"] == "vicreg" and metrics["data"]["n_classes"] == 100
    assert metrics["normality"]["henze_zirkler_p"] is None  # d = 32 >= subsample 16
    assert metrics["class_information"] == pytest.approx(math.log(100))
    assert not (tmp_path / "run" / "scatter.png").exists()  # 100 classes: no colour legend
    baseline = run(tmp_path / "untrained", "--dataset", "cifar100", "--data-dir", str(root),
                   "--steps", "0")
    assert baseline["steps"] == 0 and baseline["train_history"] == []
    assert baseline["final_loss"] == "nan"


def test_image_folder_tree(tmp_path):
    gen = torch.Generator().manual_seed(8)
    for split, n in (("train", 10), ("val", 4)):
        for c, name in enumerate(("cat", "dog")):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(n):
                size = (20 + 3 * i, 24)  # not square, not at --image-size
                image = torch.randint(0, 128, (*size, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray((image + 100 * c).numpy()).save(
                    tmp_path / "tree" / split / name / f"{i}.png")
    metrics = run(tmp_path / "run", "--dataset", "folder", "--data-dir",
                  str(tmp_path / "tree"), "--steps", "2")
    assert metrics["data"]["n_train"] == 20 and metrics["data"]["n_test"] == 8
    assert metrics["data"]["n_classes"] == 2 and metrics["probe"]["top5"] == 1.0
    assert len(metrics["data"]["mean"]) == 3


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    root = write_cifar(tmp_path / "data", "cifar10", n_train=16)
    flags = ("--data-dir", str(root), "--steps", "4", "--ckpt-every", "0.2", "--sigma", "0.1")
    whole = run(tmp_path / "whole", *flags)  # 10 steps per epoch: checkpoints every 2 steps
    step = cifar_ssl.Trainer.step
    calls = []

    def crash_at_step_3(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self, *a)
    monkeypatch.setattr(cifar_ssl.Trainer, "step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", *flags)
    monkeypatch.setattr(cifar_ssl.Trainer, "step", step)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 2
    cifar_ssl.main(["--out", str(tmp_path / "resumed"), "--resume", "--quiet"])
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed["train_history"] == whole["train_history"]
    assert resumed["probe"] == whole["probe"]


def test_grey_dataset_becomes_3x32x32(tmp_path):
    (x_tr, y_tr, x_te, _), info = cifar_ssl.load_images(cifar_ssl.parse_args(
        ["--out", str(tmp_path / "r"), "--dataset", "mnist", "--no-download"]))
    assert x_tr.shape[1:] == (3, 32, 32) and x_te.shape[1:] == (3, 32, 32)
    assert x_tr.dtype == torch.uint8 and x_tr.max() == 255 and info["n_classes"] == 10
    assert (x_tr[:, :, :2] == 0).all() and torch.equal(x_tr[:, 0], x_tr[:, 2])
    assert info["n_train"] == len(x_tr) == len(y_tr) and len(info["mean"]) == 3


def test_missing_cifar_is_one_line_with_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "cifar_ssl.py"), "--data-dir",
                           str(tmp_path), "--no-download", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "data_batch_1" in proc.stderr and "--data-dir" in proc.stderr


def test_existing_run_directory_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        cifar_ssl.parse_args(["--out", str(tmp_path / "run")])
    assert exc.value.code == 2 and "--resume" in capsys.readouterr().err


def test_bench_reports_the_split_and_the_projection(capsys):
    cifar_ssl.main(["--bench", "1", "--batch-size", "4", "--image-size", "16", "--hidden", "32",
                    "--dim", "8", "--device", "cpu", "--no-amp", "--no-channels-last"])
    line = capsys.readouterr().out
    assert line.startswith("cpu (float32), 1 process")
    ms = float(re.search(r"= ([0-9.]+) ms/step", line).group(1))
    hours = float(re.search(r"take ([0-9.]+) h for 800 CIFAR-10 epochs", line).group(1))
    assert hours == pytest.approx(ms / 1e3 * 800 * (50_000 // 4) / 3600, rel=0.01)
    cifar_ssl.main(["--bench", "1", "--batch-size", "4", "--image-size", "72", "--hidden", "32",
                    "--dim", "8", "--device", "cpu", "--method", "vicreg"])
    line = capsys.readouterr().out  # above 64 px: the ImageNet recipe and Table 2's projection
    assert "72x72" in line and "100 ImageNet-100 epochs" in line
    assert "100 ImageNet-1k epochs" in line


def test_workers_decoding_from_disk_equal_the_in_memory_run(tmp_path):
    gen = torch.Generator().manual_seed(5)
    for split, n in (("train", 8), ("val", 5)):
        for c, name in enumerate(("a", "b")):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(n):
                image = torch.randint(0, 128, (18, 21, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray((image + 100 * c).numpy()).save(
                    tmp_path / "tree" / split / name / f"{i}.png")
    flags = ("--dataset", "folder", "--data-dir", str(tmp_path / "tree"), "--steps", "3",
             "--sigma", "0.2")
    memory = run(tmp_path / "memory", *flags)
    disk = run(tmp_path / "disk", *flags, "--workers", "1")
    assert disk["data"]["n_train"] == 16 and disk["data"]["n_test"] == 10
    assert disk["train_history"] == memory["train_history"]
    assert disk["probe"] == memory["probe"]
    with pytest.raises(SystemExit):
        cifar_ssl.parse_args(["--out", str(tmp_path / "x"), "--workers", "2"])  # CIFAR in memory


# --------------------------------------------------------------------------------------------
# --head none, --eval-only, bad input
# --------------------------------------------------------------------------------------------

def test_head_none_run_is_labelled_apart_and_eval_only_reproduces_it(tmp_path, capsys):
    root = write_cifar(tmp_path / "data", "cifar10", n_train=16)
    flags = ("--data-dir", str(root), "--steps", "2", "--head", "none")
    original = run(tmp_path / "run", *flags)
    assert original["head"] == "none" and original["sigma"] == 0
    assert "original" in original["label"] and original["settings"]["head"] == "none"
    assert "head." not in "".join(torch.load(tmp_path / "run" / "model.pt")["models"])
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    capsys.readouterr()
    again = cifar_ssl.main(["--out", str(tmp_path / "run"), "--eval-only", "--quiet"])
    assert "evaluating" in capsys.readouterr().out
    assert again["probe"] == original["probe"] and again["normality"] == original["normality"]
    assert again["train_history"] == original["train_history"] and again["steps"] == 2
    recomputed = json.loads((tmp_path / "run" / "metrics_recomputed.json").read_text())
    assert recomputed["head"] == "none"  # the run's own files stay as they are
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()
                      if p.name in before}


def damage(tmp_path, how):
    """A CIFAR-10 folder whose data_batch_1 is damaged in one way; returns --data-dir."""
    root = write_cifar(tmp_path / "data", "cifar10", n_train=16)
    file = root / "cifar-10-batches-py" / "data_batch_1"
    good = file.read_bytes()
    batch = pickle.loads(good, encoding="bytes")
    if how == "garbage":
        file.write_bytes(bytes(range(256)) * 4)
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "truncated":
        file.write_bytes(good[:len(good) // 2])
    elif how == "no data":
        file.write_bytes(pickle.dumps({b"labels": batch[b"labels"]}))
    elif how == "extra labels":
        file.write_bytes(pickle.dumps({**batch, b"labels": batch[b"labels"] * 2}))
    return root


def corrupt_tree(tmp_path):
    """An ImageFolder tree with one PNG cut short and one that is not an image at all."""
    gen = torch.Generator().manual_seed(1)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(4):
                image = torch.randint(0, 255, (16, 16, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(image.numpy()).save(tmp_path / "tree" / split / name / f"{i}.png")
    png = tmp_path / "tree" / "train" / "b" / "2.png"
    png.write_bytes(png.read_bytes()[:60])
    (tmp_path / "tree" / "val" / "a" / "0.png").write_bytes(b"not a png")
    return tmp_path / "tree"


def mnist_run(tmp_path):
    """An mnist_gauss.py run directory: args.json without cifar_ssl.py's keys."""
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "args.json").write_text(json.dumps(
        {"sigma": 0.5, "dim": 2, "critic": "separable", "loss": "infonce", "steps": 300,
         "batch_size": 256, "lr": 0.001, "seed": 0, "dataset": "mnist"}))
    return tmp_path / "mnist"


BAD_FLAGS = [  # (flags, text the one line names); argparse errors, exit code 2
    (["--vicreg-weights", "1", "1", "1e30"], "--vicreg-weights"),
    (["--vicreg-weights", "1", "nan", "1"], "--vicreg-weights"),
    (["--method", "vicreg", "--vicreg-weights", "0", "0", "0"], "--vicreg-weights"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "0"], "--temperature"),
    (["--online-lr", "nan"], "--online-lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--seed", "-1"], "--seed"),
    (["--batch-size", "1"], "--batch-size"),
    (["--log-every", "-1"], "--log-every"),
    (["--subsample", "3"], "--subsample"),
    (["--probe-test", "4"], "--probe-test"),
    (["--dim", "1"], "--dim"),
    (["--device", "foo"], "--device"),
    (["--head", "none", "--sigma", "0.3"], "--head"),
    (["--out", "{file}/run"], "--out"),
    (["--resume", "--out", "{mnist}"], "not a run of cifar_ssl.py"),
    (["--eval-only", "--out", "{mnist}"], "not a run of cifar_ssl.py"),
    (["--eval-only", "--out", "{started}"], "no model.pt or checkpoint.pt"),
]


@pytest.mark.parametrize(("flags", "named"), BAD_FLAGS)
def test_bad_flags_end_in_one_argparse_line(tmp_path, monkeypatch, capsys, flags, named):
    (tmp_path / "file").write_text("a file")
    mnist = mnist_run(tmp_path)
    before = (mnist / "args.json").read_text()
    started = tmp_path / "started"  # a run killed before its first checkpoint
    started.mkdir()
    args = vars(cifar_ssl.parse_args(["--out", str(tmp_path / "x"), *FAST]))
    (started / "args.json").write_text(json.dumps(
        {k: v for k, v in args.items() if k not in common.RUNTIME_FLAGS}))
    flags = [f.format(file=tmp_path / "file", mnist=mnist, started=started) for f in flags]
    if "--out" not in flags:
        flags += ["--out", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", ["cifar_ssl.py"])
    with pytest.raises(SystemExit) as exc:
        cifar_ssl.main(flags)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cifar_ssl.py: error:") and named in last, err
    assert (mnist / "args.json").read_text() == before and not (tmp_path / "run").exists()


BAD_FILES = [  # (how the data is damaged, extra flags, text the one line names)
    ("garbage", [], "data_batch_1"),
    ("empty", [], "data_batch_1"),
    ("truncated", [], "data_batch_1"),
    ("no data", [], "b'data'"),
    ("extra labels", [], "data_batch_1"),
    ("png", [], ".png"),
    ("png", ["--workers", "1"], ".png"),
    ("png", ["--workers", "1", "--probe-train", "10"], ".png"),
    ("diverges", ["--lr", "1e30"], "smaller --lr"),
]


@pytest.mark.parametrize(("how", "flags", "named"), BAD_FILES)
def test_damaged_files_and_divergence_end_in_one_line(tmp_path, capsys, how, flags, named):
    out = tmp_path / "run"
    if how == "png":
        flags = ["--dataset", "folder", "--data-dir", str(corrupt_tree(tmp_path)), *flags]
    else:
        flags = ["--data-dir", str(damage(tmp_path, how)), *flags]
    with pytest.raises(SystemExit) as exc:
        cifar_ssl.main(["--out", str(out), *FAST, "--steps", "3", *flags])
    err = capsys.readouterr().err
    assert exc.value.code == (3 if how == "diverges" else 2) and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and named in err, err
    assert not (out / "metrics.json").exists()
    if how == "diverges":
        assert "step" in err and "no checkpoint was written yet" in err

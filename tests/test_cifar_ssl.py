"""Tests of cifar_ssl.py (Table 1) with its SSL losses, on tiny generated data.

Bad input ends in exit code 2 (3: a diverged run) and one stderr line naming the flag or the file
(argparse prints its usage above a refused flag); each check is tested once."""
import argparse
import itertools
import json
import math
import pickle
import re
import shutil

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
from cifar_ssl import nt_xent, vicreg_loss

CPU = torch.device("cpu")
FAST = ["--image-size", "16", "--batch-size", "8", "--hidden", "64", "--dim", "8",
        "--probe-steps", "30", "--subsample", "16", "--quiet", "--device", "cpu",
        "--warmup-epochs", "0", "--no-download"]
"""Flags for end-to-end runs of a few seconds: 16x16 images, batch 8, small projector."""


def settings(*flags):
    return cifar_ssl.parse_args(["--out", "unused", *flags])


# --- Losses: NT-Xent (Chen et al. eq. 1), VICReg (Bardes et al. eq. 6) -------------------------

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


# --- LARS and the schedule ------------------------------------------------------------------

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
    args = settings("--method", "vicreg", "--hidden", "32", "--dim", "8", "--batch-size", "512")
    model = cifar_ssl.build_model(args, 10, CPU)
    trainer = cifar_ssl.Trainer(model, args, torch.zeros(3), torch.ones(3), CPU, torch.float32)
    weights, flat, probe = trainer.opt.param_groups
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


# --- Augmentations: torchvision's parameter distributions and operations, batched -----------

def test_crop_parameters_follow_random_resized_crop():
    torch.manual_seed(0)
    n, size = 4000, 32
    ours = cifar_ssl.sample_crops(n, size, size, CPU).numpy()
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
    fallback = cifar_ssl.sample_crops(5, size, size, CPU, (0.9, 1.0), (3.0, 4.0))
    expected = torchvision.transforms.RandomResizedCrop.get_params(image, [0.9, 1.0], [3.0, 4.0])
    assert (fallback.numpy() == np.array(expected)).all()


def test_jitter_grey_flip_parameters_follow_torchvision():
    reference = torchvision.transforms.ColorJitter(**cifar_ssl.JITTER)
    ranges = cifar_ssl.JITTER_RANGES
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert ranges[name] == pytest.approx(getattr(reference, name))
    assert ranges["brightness"] == pytest.approx((0.6, 1.4))  # Appendix C
    assert ranges["saturation"] == pytest.approx((0.8, 1.2))
    torch.manual_seed(1)
    n = 20000
    params = cifar_ssl.sample_augment_params(n, 32, 32, CPU)
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
    params = cifar_ssl.sample_augment_params(6, 32, 32, CPU)
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
    params = cifar_ssl.sample_augment_params(6, 32, 32, CPU, view=1)
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
    view0, view1 = (cifar_ssl.sample_augment_params(20_000, 8, 8, CPU, view=view)
                    for view in (0, 1))
    assert view0["blur"].all() and not view0["solarize"].any()
    assert view1["blur"].float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert view1["solarize"].float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert 0.1 <= view1["blur_sigma"].min() and view1["blur_sigma"].max() <= 2.0
    assert "blur" not in cifar_ssl.sample_augment_params(6, 32, 32, CPU)  # the CIFAR recipe


# --- Flags ----------------------------------------------------------------------------------

def test_number_takes_its_closed_or_open_range_and_nothing_else():
    closed, open_ = cifar_ssl.number(float, 0, 1), cifar_ssl.number(float, 0, 10, True)
    assert closed("0") == 0.0 and closed("1") == 1.0 and open_("0.3") == 0.3
    for parse, text in ((closed, "-1"), (closed, "1e30"), (closed, "nan"), (closed, "inf"),
                        (open_, "0"), (open_, "10")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    with pytest.raises(ValueError):  # argparse reports it as an invalid int, naming the flag
        cifar_ssl.number(int, 0, 10)("2.5")


def test_recipe_and_dim_follow_the_image_size_and_method():
    assert settings().recipe == "cifar" and settings("--image-size", "224").recipe == "imagenet"
    assert settings("--image-size", "224", "--recipe", "cifar").recipe == "cifar"
    assert settings().dim == 256 and settings("--method", "vicreg").dim == 2048  # Appendix C


def refusal(argv, capsys, code=2):
    """The stderr line with which main(argv) exits with `code`: the only line besides
    argparse's usage."""
    with pytest.raises(SystemExit) as exc:
        cifar_ssl.main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert exc.value.code == code, lines
    assert "error:" in lines[-1] and all(line.startswith(("usage:", " ")) for line in lines[:-1])
    return lines[-1]


BAD_FLAGS = [  # (flags, the flag or file the line names); {tmp}: the test's folder
    (["--momentum", "1e30"], "--momentum"),
    (["--sigma", "-1"], "--sigma"),
    (["--lr", "0"], "--lr"),
    (["--vicreg-weights", "1", "nan", "1"], "--vicreg-weights"),
    (["--hidden", "1000000"], "--hidden"),
    (["--steps", "5", "--epochs", "2"], "--steps"),
    (["--head", "none", "--sigma", "0.3"], "--head"),
    (["--method", "vicreg", "--vicreg-weights", "0", "0", "0"], "--vicreg-weights"),
    (["--dataset", "folder"], "--data-dir"),
    (["--workers", "2"], "--workers"),
    (["--out", "{tmp}/file"], "file"),
    (["--out", "{tmp}"], "{tmp}"),                       # a folder with files but no run
    (["--eval-only", "--out", "{tmp}/nothing"], "args.json"),
]


@pytest.mark.parametrize(("flags", "named"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_refused_by_the_parser(tmp_path, capsys, flags, named):
    (tmp_path / "file").write_text("keep me")
    flags = [f.format(tmp=tmp_path) for f in flags]
    argv = flags + ([] if "--out" in flags else ["--out", str(tmp_path / "run")])
    assert named.format(tmp=tmp_path) in refusal(argv, capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_is_refused(tmp_path, capsys):
    assert "--device" in refusal(["--device", "cuda", "--out", str(tmp_path / "r")], capsys)


# --- Model: CIFAR stem, projectors, noise head ----------------------------------------------

def test_resnet18_cifar_stem_and_projectors_of_appendix_c():
    for method, dims in (("simclr", [2048, 256]), ("vicreg", [2048, 2048, 2048])):
        model = cifar_ssl.SSLNet(settings("--method", method), 10)
        assert model.backbone.conv1.kernel_size == (3, 3) and model.backbone.conv1.stride == (1, 1)
        assert isinstance(model.backbone.maxpool, nn.Identity)
        assert model.probe.in_features == 512
        assert [m.out_features for m in model.projector if isinstance(m, nn.Linear)] == dims
        has_bn = any(isinstance(m, nn.BatchNorm1d) for m in model.projector)
        assert has_bn == (method == "vicreg")
    big = cifar_ssl.SSLNet(settings("--image-size", "72"), 10)  # above 64 px: ImageNet stem
    assert big.backbone.conv1.kernel_size == (7, 7) and isinstance(big.backbone.maxpool,
                                                                    nn.MaxPool2d)


def test_head_none_is_exactly_the_standard_method():
    x = torch.randn(8, 3, 16, 16)
    torch.manual_seed(4)
    model = cifar_ssl.SSLNet(settings("--head", "none", "--hidden", "64", "--dim", "8"), 10)
    torch.manual_seed(4)  # the same network built by hand: torchvision's ResNet-18, CIFAR stem
    backbone = torchvision.models.resnet18()
    backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    backbone.maxpool, backbone.fc = nn.Identity(), nn.Identity()
    projector = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 8))
    assert model.head is None
    assert not any(k.startswith("head.") for k in model.state_dict())
    h, z = model.train()(x)
    assert torch.equal(h, backbone.train()(x))
    assert torch.equal(z, projector(h))


def test_the_head_normalizes_and_the_step_adds_noise_only_at_sigma_above_zero(monkeypatch):
    torch.manual_seed(4)
    model = cifar_ssl.SSLNet(settings("--hidden", "64", "--dim", "8"), 10).train()
    assert isinstance(model.head, common.GaussianHead)
    p = model.projector(model.backbone(torch.randn(8, 3, 16, 16)))
    z = model.head(p)
    assert torch.allclose(z, (p - p.mean(0)) / torch.sqrt(p.var(0, unbiased=False) + 1e-5))
    seen = {}
    for sigma in (0.0, 0.5):
        args = settings("--sigma", str(sigma))
        trainer = cifar_ssl.Trainer(model, args, torch.zeros(3), torch.ones(3), CPU,
                                    torch.float32)
        monkeypatch.setattr(model, "forward", lambda x: (torch.zeros(len(x), 512), z.detach()))
        trainer.loss_fn = lambda z1, z2: seen.setdefault(sigma, (z1, z2))[0].sum() * 0
        trainer.step(torch.zeros(8, 3, 4, 4), torch.zeros(8, 3, 4, 4),
                     torch.zeros(8, dtype=torch.long), 1.0)
    assert torch.equal(seen[0.0][0], z) and torch.equal(seen[0.0][1], z)
    for view in seen[0.5]:  # z + Z, Z ~ N(0, 0.5^2 I), drawn anew for each view
        assert (view - z).std().item() == pytest.approx(0.5, rel=0.5)
    assert not torch.equal(*seen[0.5])


# --- Probe ----------------------------------------------------------------------------------

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


def test_linear_probe_picks_its_weight_decay_on_held_out_features():
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (500,), generator=gen)
    f = torch.randn(500, 8, generator=gen) + y[:, None]
    # a decay of 1e3 keeps the weights at zero: one class for all, the worse held-out top-1
    assert cifar_ssl.linear_probe(f, y, f, y, 3, 50, (1e3, 1e-4))["weight_decay"] == 1e-4
    assert cifar_ssl.linear_probe(f, y, f, y, 3, 50, (1e3,))["weight_decay"] == 1e3


# --- End to end on generated data in CIFAR's and ImageFolder's on-disk formats ---------------

def write_cifar(root, dataset, n_train=16, n_test=32, seed=0):
    """Random images in CIFAR's pickled-batch format; the class sets the mean colour."""
    folder, train_files, test_files, label_key = cifar_ssl.CIFAR_FILES[dataset]
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


def write_tree(root, n_train=10, n_test=4, seed=8):
    """An ImageFolder tree of two classes, images of other sizes than --image-size."""
    gen = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("val", n_test)):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                image = torch.randint(0, 128, (20 + 3 * i, 24, 3), generator=gen,
                                      dtype=torch.uint8)
                Image.fromarray((image + 100 * c).numpy()).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    """CIFAR-10 pickles of 5 x 16 training and 32 test images."""
    return write_cifar(tmp_path_factory.mktemp("data"), "cifar10")


@pytest.fixture(scope="module")
def finished(cifar10, tmp_path_factory):
    """A finished 2-step run on `cifar10` (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    cifar_ssl.main(["--out", str(out), *FAST, "--data-dir", str(cifar10), "--steps", "2"])
    return out


def run(out, *flags):
    cifar_ssl.main(["--out", str(out), *FAST, *flags])
    return json.loads((out / "metrics.json").read_text())


def test_two_steps_on_cifar10_pickles_write_metrics(cifar10, tmp_path):
    metrics = run(tmp_path / "run", "--data-dir", str(cifar10), "--steps", "2", "--sigma", "0.3")
    assert metrics["method"] == "simclr" and metrics["sigma"] == 0.3 and metrics["head"] == "bn"
    assert metrics["data"]["n_train"] == 80 and metrics["data"]["n_test"] == 32
    assert metrics["steps"] == 2 and len(metrics["train_history"]) == 2
    assert math.isfinite(metrics["final_loss"])
    assert 0 <= metrics["probe"]["top1"] <= metrics["probe"]["top5"] <= 1
    assert 0 <= metrics["online_probe"]["test_top1"] <= 1
    assert metrics["capacity"] == pytest.approx(8 / 2 * math.log(1 + 1 / 0.09))  # eq. 5
    assert 0 <= metrics["normality"]["henze_zirkler_p"] <= 1  # d = 8 < subsample 16
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "args.json", "checkpoint.pt", "embeddings.npz", "metrics.json", "model.pt", "scatter.png"]
    assert np.load(tmp_path / "run" / "embeddings.npz")["z_test"].shape == (32, 8)


def test_vicreg_on_cifar100_pickles_and_random_init_baseline(tmp_path):
    root = write_cifar(tmp_path / "data", "cifar100", n_train=64)
    metrics = run(tmp_path / "run", "--dataset", "cifar100", "--data-dir", str(root), "--steps",
                  "2", "--method", "vicreg", "--dim", "32", "--no-amp")
    assert metrics["method"] == "vicreg" and metrics["data"]["n_classes"] == 100
    assert metrics["normality"]["henze_zirkler_p"] is None  # d = 32 >= subsample 16
    assert metrics["class_information"] == pytest.approx(math.log(100))
    assert metrics["precision"] == {"dtype": "float32", "why": "--no-amp"}
    assert not (tmp_path / "run" / "scatter.png").exists()  # 100 classes: no colour legend
    baseline = run(tmp_path / "untrained", "--dataset", "cifar100", "--data-dir", str(root),
                   "--steps", "0")
    assert baseline["steps"] == 0 and baseline["train_history"] == []
    assert math.isnan(baseline["final_loss"])


def test_image_folder_tree(tmp_path):
    metrics = run(tmp_path / "run", "--dataset", "folder", "--data-dir",
                  str(write_tree(tmp_path / "tree")), "--steps", "2")
    assert metrics["data"]["n_train"] == 20 and metrics["data"]["n_test"] == 8
    assert metrics["data"]["n_classes"] == 2 and metrics["probe"]["top5"] == 1.0
    assert len(metrics["data"]["mean"]) == 3


def test_resume_after_a_crash_equals_an_uninterrupted_run(cifar10, tmp_path, monkeypatch):
    flags = ("--data-dir", str(cifar10), "--steps", "4", "--ckpt-every", "0.2", "--sigma", "0.1")
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


def test_grey_dataset_becomes_3x32x32(tiny_mnist):
    (x_tr, y_tr, x_te, _), info = cifar_ssl.load_images(settings(
        "--dataset", "mnist", "--data-dir", str(tiny_mnist)))
    assert x_tr.shape[1:] == (3, 32, 32) and x_te.shape[1:] == (3, 32, 32)
    assert x_tr.dtype == torch.uint8 and x_tr.max() == 255 and info["n_classes"] == 10
    assert (x_tr[:, :, :2] == 0).all() and torch.equal(x_tr[:, 0], x_tr[:, 2])
    assert info["n_train"] == len(x_tr) == len(y_tr) == 400 and len(info["mean"]) == 3


def test_bench_reports_the_split_and_the_projection(capsys, monkeypatch):
    # float32 for the run and for "the other precision": emulated bf16 would only be slow here
    monkeypatch.setattr(cifar_ssl, "precision", lambda device, amp: (torch.float32, "test"))
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
    flags = ("--dataset", "folder", "--data-dir", str(write_tree(tmp_path / "tree", 8, 5, 5)),
             "--steps", "3", "--sigma", "0.2")
    memory = run(tmp_path / "memory", *flags)
    disk = run(tmp_path / "disk", *flags, "--workers", "1")
    assert disk["data"]["n_train"] == 16 and disk["data"]["n_test"] == 10
    assert disk["train_history"] == memory["train_history"]
    assert disk["probe"] == memory["probe"]


def test_head_none_run_is_labelled_apart_and_eval_only_reproduces_it(cifar10, tmp_path, capsys):
    flags = ("--data-dir", str(cifar10), "--steps", "2", "--head", "none")
    original = run(tmp_path / "run", *flags)
    assert original["head"] == "none" and original["sigma"] == 0
    assert "original" in original["label"] and original["settings"]["head"] == "none"
    assert "head." not in "".join(torch.load(tmp_path / "run" / "model.pt")["models"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    capsys.readouterr()
    again = cifar_ssl.main(["--out", str(tmp_path / "run"), "--eval-only", "--quiet"])
    assert "evaluating" in capsys.readouterr().out
    assert again["probe"] == original["probe"] and again["normality"] == original["normality"]
    assert again["train_history"] == original["train_history"] and again["steps"] == 2
    recomputed = json.loads((tmp_path / "run" / "metrics_recomputed.json").read_text())
    assert recomputed["head"] == "none"  # the run's own files stay as they are
    assert cifar_ssl.main(["--out", str(tmp_path / "run"), "--resume", "--quiet"]) is None
    assert "is finished" in capsys.readouterr().out  # a repeated sweep passes it by
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()
            if p.name in before} == before


# --- Bad run folders and data: one line, exit code 2 (3: diverged) --------------------------

def damage(run, how):
    """Damage the finished run `run` in one way; returns the flags and what the line names."""
    args = json.loads((run / "args.json").read_text())
    if how == "another script's":  # a healthy mnist_gauss.py run
        (run / "args.json").write_text(json.dumps({"sigma": 0.5, "dim": 2, "seed": 0}))
        return ["--resume"], str(run)
    if how.startswith("args"):
        (run / "args.json").write_text("{not json" if how == "args garbage" else json.dumps(
            {**args, "sigma": "abc"} if how == "args value" else {**args, "bogus": 1}))
        return ["--resume"], "args.json"
    if how == "typed flag differs":
        return ["--resume", "--sigma", "0.5"], "--sigma"
    if how == "model empty":
        (run / "model.pt").write_bytes(b"")
        return ["--eval-only"], "model.pt"
    (run / "metrics.json").unlink()  # an unfinished run: --resume reads the checkpoint
    ckpt = run / "checkpoint.pt"
    if how == "checkpoint truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    else:  # another --dim's weights
        state = torch.load(ckpt, weights_only=True)
        state["models"] = {k: torch.cat([v, v]) if v.ndim and v.shape[0] == 8 else v
                           for k, v in state["models"].items()}
        torch.save(state, ckpt)
    return ["--resume"], "checkpoint.pt"


RUN_CASES = ["another script's", "args garbage", "args value", "args unknown",
             "typed flag differs", "model empty", "checkpoint truncated", "checkpoint other dim"]


@pytest.mark.parametrize("how", RUN_CASES)
def test_a_foreign_or_damaged_run_is_one_line_and_left_as_it_was(finished, tmp_path, capsys, how):
    shutil.copytree(finished, tmp_path / "run")
    flags, named = damage(tmp_path / "run", how)
    before = {p: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert named in refusal(["--out", str(tmp_path / "run"), "--quiet", *flags], capsys)
    assert {p: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def damage_data(root, how):
    """A data folder damaged in one way; returns the flags and the file the line names."""
    if how == "png":  # an ImageFolder tree with an image cut short
        png = write_tree(root / "tree", 4, 2) / "train" / "dog" / "2.png"
        png.write_bytes(png.read_bytes()[:60])
        return ["--dataset", "folder", "--data-dir", str(root / "tree")], "2.png"
    file = write_cifar(root, "cifar10") / "cifar-10-batches-py" / "data_batch_1"
    batch = pickle.loads(file.read_bytes(), encoding="bytes")
    if how == "missing":
        file.unlink()
    elif how == "truncated":
        file.write_bytes(file.read_bytes()[:1000])
    elif how == "extra labels":
        file.write_bytes(pickle.dumps({**batch, b"labels": batch[b"labels"] * 2}))
    else:
        return ["--data-dir", str(root), "--batch-size", "100"], "--batch-size"
    return ["--data-dir", str(root)], "data_batch_1"


DATA_CASES = [("missing", []), ("truncated", []), ("extra labels", []), ("png", []),
              ("png", ["--workers", "1"]), ("batch above the data", [])]


@pytest.mark.parametrize(("how", "extra"), DATA_CASES, ids=[" ".join([h, *e]) for h, e in
                                                             DATA_CASES])
def test_damaged_data_is_one_line(tmp_path, capsys, how, extra):
    flags, named = damage_data(tmp_path / "data", how)
    assert named in refusal(["--out", str(tmp_path / "run"), *FAST, "--steps", "2", *flags,
                             *extra], capsys)
    assert not (tmp_path / "run").exists()


def test_a_diverged_run_stops_with_exit_code_3_keeping_its_last_good_checkpoint(
        cifar10, tmp_path, capsys, monkeypatch):
    calls, loss = [], cifar_ssl.nt_xent

    def nan_from_step_2(z1, z2, temperature):
        calls.append(1)
        return loss(z1, z2, temperature) * (math.nan if len(calls) > 1 else 1.0)
    monkeypatch.setattr(cifar_ssl, "nt_xent", nan_from_step_2)
    ckpt = tmp_path / "run" / "checkpoint.pt"  # written every step (10 steps per epoch)
    line = refusal(["--out", str(ckpt.parent), *FAST, "--data-dir", str(cifar10), "--steps", "3",
                    "--ckpt-every", "0.1"], capsys, code=3)
    assert "step 2" in line and str(ckpt) in line
    assert torch.load(ckpt, weights_only=True)["step"] == 1
    assert not (ckpt.parent / "metrics.json").exists()

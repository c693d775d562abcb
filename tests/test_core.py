"""Tests of the losses, critics, noise heads, capacity bounds and data loading (common.py; the
uniform head and eq. 6 of mnist_uniform.py)."""
import gzip
import hashlib
import math
import re
import struct

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from common import (
    BilinearCritic,
    ConcatCritic,
    ConvEncoder,
    DataError,
    GaussianCritic,
    GaussianHead,
    SeparableCritic,
    SHIPPED_MNIST,
    bound_estimates,
    divergence,
    dv,
    gaussian_capacity,
    infonce,
    js,
    load_data,
    load_mnist,
    nwj,
    read_idx,
    recompute_bn_stats,
    redv,
    renwj,
)
from mnist_uniform import UniformHead, uniform_capacity

S = torch.tensor([[2.0, 0.5, -1.0],
                  [0.0, 1.5, 0.3],
                  [-0.7, 0.2, 3.0]])


def _offdiag(m):
    return [m[i][j] for i in range(len(m)) for j in range(len(m)) if i != j]


def test_infonce_equals_formula():
    m = S.tolist()
    expected = np.mean([m[i][i] - math.log(sum(math.exp(v) for v in m[i]) / 3) for i in range(3)])
    loss, mi = infonce(S)
    assert mi.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(-expected, abs=1e-6)


def test_dv_nwj_js_equal_formulas():
    m = S.tolist()
    pos = np.mean([m[i][i] for i in range(3)])
    neg = np.mean([math.exp(v) for v in _offdiag(m)])
    assert dv(S)[1].item() == pytest.approx(pos - math.log(neg), abs=1e-6)
    # eq. (3) at T = S + 1: E_P (S + 1) - E_Q exp(S + 1 - 1)
    assert nwj(S)[1].item() == pytest.approx(pos + 1 - neg, abs=1e-6)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    js_loss = np.mean([softplus(-m[i][i]) for i in range(3)]) + np.mean(
        [softplus(v) for v in _offdiag(m)])
    loss, mi = js(S)
    assert loss.item() == pytest.approx(js_loss, abs=1e-6)
    assert mi.item() == pytest.approx(pos + 1 - neg, abs=1e-6)


def test_regularized_losses_equal_formulas():
    m = S.tolist()
    pos = np.mean([m[i][i] for i in range(3)])
    log_neg = math.log(np.mean([math.exp(v) for v in _offdiag(m)]))
    loss, mi = redv(S, weight=0.5)
    assert mi.item() == pytest.approx(pos - log_neg, abs=1e-6)
    assert loss.item() == pytest.approx(-(pos - log_neg) + 0.5 * log_neg ** 2, abs=1e-6)
    loss, mi = renwj(S, weight=0.5, clip=None)
    assert mi.item() == pytest.approx(pos + 1 - math.exp(log_neg), abs=1e-6)
    assert loss.item() == pytest.approx(-(pos + 1 - math.exp(log_neg)) + 0.5 * log_neg ** 2,
                                        abs=1e-6)


def test_renwj_clips_the_nwj_terms_and_not_the_penalty():
    scores = torch.tensor([[20.0, -15.0], [0.5, 1.0]])
    t = (scores + 1).clamp(-10, 10)
    off = [t[0, 1].item(), t[1, 0].item()]
    nwj_clipped = t.diagonal().mean().item() - np.mean(np.exp(np.array(off) - 1))
    log_neg = math.log(np.mean(np.exp([-15.0, 0.5])))
    loss, mi = renwj(scores, weight=0.5, clip=10)
    assert mi.item() == pytest.approx(nwj_clipped, abs=1e-5)
    assert loss.item() == pytest.approx(-nwj_clipped + 0.5 * log_neg ** 2, abs=1e-5)
    # without clipping it is eq. 15 as written; with clipping the gradient of a huge score is 0
    assert renwj(scores, weight=0.5, clip=None)[1].item() == pytest.approx(
        (21 + 2) / 2 - 1 - np.mean(np.exp([-15.0, 0.5])) + 1, abs=1e-4)
    x = scores.clone().requires_grad_()
    renwj(x, weight=0.0, clip=10)[0].backward()
    assert x.grad[0, 0].item() == 0.0


def test_losses_are_shift_invariant_where_the_bound_is():
    assert infonce(S + 7)[1].item() == pytest.approx(infonce(S)[1].item(), abs=1e-5)
    assert dv(S + 7)[1].item() == pytest.approx(dv(S)[1].item(), abs=1e-5)
    assert nwj(S + 1)[1].item() < nwj(S)[1].item()


def test_capacities():
    assert gaussian_capacity(2, 1.0) == pytest.approx(math.log(2))
    assert gaussian_capacity(4, 0.5) == pytest.approx(2 * math.log(5))
    assert gaussian_capacity(2, 0.0) == math.inf
    assert uniform_capacity(3, 0.25) == pytest.approx(3 * math.log(3))


def test_gaussian_critic_is_the_pmi_of_the_gaussian_channel():
    sigma, d = 0.7, 3
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, d, generator=gen), torch.randn(4, d, generator=gen)
    scores = GaussianCritic(sigma)(x, y).double()
    for i in range(5):
        for j in range(4):
            pmi = (multivariate_normal(x[i].double(), sigma ** 2 * np.eye(d)).logpdf(y[j])
                   - multivariate_normal(np.zeros(d), (1 + sigma ** 2) * np.eye(d)).logpdf(y[j]))
            assert scores[i, j].item() == pytest.approx(pmi, abs=1e-4)
    # Theorem 4.1's second form, shifted by the capacity
    t_star = (x @ y.T - ((x ** 2).sum(1)[:, None] + (y ** 2).sum(1)[None] / (1 + sigma ** 2)) / 2)
    assert torch.allclose(scores.float(), t_star / sigma ** 2 + gaussian_capacity(d, sigma),
                          atol=1e-4)


@pytest.mark.parametrize("sigma,d", [(1.0, 2), (0.5, 2), (0.6, 4)])
def test_bounds_with_gaussian_critic_recover_known_mi(sigma, d):
    """f(X) = f(X') ~ N(0, I), Y = f(X) + Z: I = d/2 log(1 + 1/sigma^2) (Theorem 3.4 equality)."""
    gen = torch.Generator().manual_seed(1)
    critic, true_mi = GaussianCritic(sigma), gaussian_capacity(d, sigma)
    estimates = {"infonce": [], "nwj": [], "dv": []}
    for _ in range(20):
        x = torch.randn(512, d, generator=gen)
        scores = critic(x, x + sigma * torch.randn(512, d, generator=gen))
        for name, fn in (("infonce", infonce), ("nwj", nwj), ("dv", dv)):
            estimates[name].append(fn(scores)[1].item())
    for name, values in estimates.items():
        se = np.std(values, ddof=1) / math.sqrt(len(values))
        assert abs(np.mean(values) - true_mi) < 4 * se + 0.02, (name, np.mean(values), true_mi)


def test_infonce_saturates_at_log_batch():
    """InfoNCE cannot exceed log B: at C > log B it is far below the true MI."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 8, generator=gen)
    scores = GaussianCritic(0.1)(x, x + 0.1 * torch.randn(64, 8, generator=gen))
    assert gaussian_capacity(8, 0.1) > 18
    assert infonce(scores)[1].item() <= math.log(64) + 1e-5


def test_divergence_names_a_bound_below_zero_and_a_loss_that_turned():
    rng = np.random.default_rng(0)
    falling = list(np.linspace(0.0, -2.0, 200) + 0.05 * rng.standard_normal(200))
    assert divergence(1.0, 0.05, falling) == []
    # a held-out lower bound 4 SE below 0: not an MI; a run with < 10 logged losses is not judged
    assert divergence(-0.2, 0.05, falling) == ["held-out MI -0.200 +- 0.050: < -3 SE"]
    assert divergence(-0.2, 0.05, []) == divergence(-0.2, 0.05, falling[:9]) == []  # too short
    assert divergence(-0.2, math.nan, falling) == []  # no SE: nothing to judge
    # the loss falls to -2, then climbs back by 0.5 (noise sd 0.05): it ends worse than its best
    turned = falling + list(-2.0 + np.linspace(0, 0.5, 100) + 0.05 * rng.standard_normal(100))
    (why,) = divergence(1.0, 0.05, turned)
    rise, limit = map(float, re.fullmatch(r"training loss (.*) above its best, limit (.*)",
                                          why).groups())
    assert 0.3 < rise < 0.5 and limit < 0.1
    assert divergence(1.0, 0.05, turned[:-100]) == []  # the same run before it turned


@pytest.mark.parametrize("n", [10, 40, 200, 1600])
def test_divergence_keeps_its_level_on_a_flat_noisy_loss(n):
    """Logged losses i.i.d. N(0, 1), a run that neither improves nor worsens: flagged in at most
    1 % of 1000 runs (the rule's rate, simulated over 4000 runs, is at most 0.15 %)."""
    rng = np.random.default_rng(n)
    flagged = sum(bool(divergence(1.0, 0.05, list(rng.standard_normal(n)))) for _ in range(1000))
    assert flagged <= 10


def test_bound_estimates_equal_the_losses_values():
    scores = torch.randn(40, 40, generator=torch.Generator().manual_seed(3)) * 2
    values = bound_estimates(scores)
    for name, fn in (("infonce", infonce), ("nwj", nwj), ("dv", dv)):
        assert values[name][0] == pytest.approx(fn(scores)[1].item(), abs=1e-5)
        assert values[name][1] > 0


def _gaussian_channel(y, sigma, seed):
    return GaussianCritic(sigma)(y, y + sigma * torch.randn(
        y.shape, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("seed", range(4))
def test_nwj_and_dv_certify_beyond_log_batch(seed):
    """The Theorem 4.1 critic on the ideal channel at d = 8, sigma = 0.3: C = 9.98 > log B = 7.6.

    NWJ and DV recover C within 3 of their standard errors; InfoNCE stays below log B.
    """
    n, d, sigma = 2000, 8, 0.3
    capacity = gaussian_capacity(d, sigma)
    y = torch.randn(n, d, generator=torch.Generator().manual_seed(100 + seed))
    values = bound_estimates(_gaussian_channel(y, sigma, seed))
    assert capacity > math.log(n) + 2
    for name in ("nwj", "dv"):
        value, se = values[name]
        assert abs(value - capacity) < 3 * se, (name, value, se, capacity)
    assert values["infonce"][0] <= math.log(n)


def test_dv_with_the_theorem41_critic_rejects_a_uniform_encoder():
    """Standardized U[-sqrt 3, sqrt 3]^8 instead of N(0, I): DV falls more than 3 SE below C,
    while InfoNCE, capped at log B, cannot tell the two apart."""
    n, d, sigma = 2000, 8, 0.3
    gen = torch.Generator().manual_seed(5)
    uniform = (torch.rand(n, d, generator=gen) - 0.5) * math.sqrt(12)
    gauss = torch.randn(n, d, generator=gen)
    v_uniform = bound_estimates(_gaussian_channel(uniform, sigma, 6))
    v_gauss = bound_estimates(_gaussian_channel(gauss, sigma, 6))
    value, se = v_uniform["dv"]
    assert value < gaussian_capacity(d, sigma) - 3 * se
    assert abs(v_uniform["infonce"][0] - v_gauss["infonce"][0]) < 0.2


def test_critics_score_every_pair():
    torch.manual_seed(0)
    a, b = torch.randn(4, 3), torch.randn(6, 3)
    for critic in (ConcatCritic(3), SeparableCritic(3), BilinearCritic(3), GaussianCritic(0.5)):
        scores = critic(a, b)
        assert scores.shape == (4, 6)
        for i in range(4):
            for j in range(6):
                single = critic(a[i:i + 1], b[j:j + 1])[0, 0]
                assert scores[i, j].item() == pytest.approx(single.item(), abs=1e-5)


def test_concat_critic_matches_table2():
    critic = ConcatCritic(2)
    shapes = [tuple(p.shape) for p in critic.parameters()]
    assert shapes == [(256, 4), (256,), (256, 256), (256,), (1, 256), (1,)]


def test_encoder_shape_and_table2_layers():
    enc = ConvEncoder(5)
    assert enc(torch.rand(7, 1, 24, 24)).shape == (7, 5)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 32, (3, 3)), (32, 64, (3, 3)), (64, 128, (3, 3))]


def test_gaussian_head_normalizes_by_the_batch_in_training_and_by_running_stats_in_eval():
    torch.manual_seed(0)
    f = 3 + 5 * torch.randn(20000, 3) ** 3  # far from standard, far from Gaussian
    head = GaussianHead(3).train()
    z = head(f)
    eps = head.norm.eps
    by_hand = (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + eps)
    torch.testing.assert_close(z, by_hand, rtol=1e-4, atol=1e-4)
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(z.var(0, unbiased=False), torch.ones(3), atol=1e-3)
    assert torch.equal(z, head(f))  # the scripts add Z; the head draws nothing
    # eval: the running statistics, not the batch's; a shifted batch stays shifted
    head.eval()
    other = f[:500] + 40
    out = head(other)
    expected = (other - head.norm.running_mean) / torch.sqrt(head.norm.running_var + eps)
    torch.testing.assert_close(out, expected)
    assert (out.mean(0) > 1).all()
    assert not list(head.parameters())  # affine=False: nothing to learn (Theorem 3.4)


def test_uniform_head_squashes_into_the_unit_cube():
    torch.manual_seed(0)
    head = UniformHead(2).train()
    f = 2 + 3 * torch.randn(20000, 2)
    u = head(f)
    assert isinstance(head, GaussianHead)
    normalized = (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + head.norm.eps)
    torch.testing.assert_close(u, torch.special.ndtr(normalized), rtol=1e-4, atol=1e-5)
    assert u.min() >= 0 and u.max() <= 1
    assert torch.allclose(u.mean(0), torch.full((2,), 0.5), atol=0.01)
    assert torch.allclose(u.var(0), torch.full((2,), 1 / 12), atol=0.005)


def test_recompute_bn_stats_uses_the_given_data():
    torch.manual_seed(0)
    head = GaussianHead(2)
    for _ in range(5):
        head(torch.randn(64, 2) * 10 + 50)  # running statistics from other data
    x = torch.randn(1000, 2) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -3.0])
    recompute_bn_stats(head, head, x, bs=100)
    assert torch.allclose(head.norm.running_mean, x.mean(0), atol=1e-5)
    assert torch.allclose(head.norm.running_var, x.var(0), rtol=0.02)
    assert head.norm.momentum == 0.1
    head.eval()
    z = head(x)
    assert torch.allclose(z.mean(0), torch.zeros(2), atol=1e-4)


def test_idx_round_trip_and_missing_files(tmp_path, write_idx):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz").numpy(), images)
    x, y = load_mnist(tmp_path, train=False)
    assert x.shape == (5, 1, 28, 28) and x.max() <= 1 and y.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path, train=True)


def _idx_bytes(array, dtype=0x08, zero=0):
    array = np.asarray(array, dtype=np.uint8)
    return (struct.pack(">HBB", zero, dtype, array.ndim)
            + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.mark.parametrize("damage", ["truncated data", "extra data", "float dtype", "bad magic",
                                    "short header", "truncated gzip", "not gzip", "empty"])
def test_damaged_idx_file_raises_data_error_naming_it(tmp_path, damage):
    good = _idx_bytes(np.arange(60).reshape(3, 4, 5))
    content = {"truncated data": good[:-7], "extra data": good + b"\0",
               "float dtype": _idx_bytes(np.zeros((3, 4)), dtype=0x0D),
               "bad magic": _idx_bytes(np.zeros((3, 4)), zero=0x1F8B),
               "short header": good[:6], "empty": b""}.get(damage, good)
    gz = damage in ("truncated gzip", "not gzip")
    path = tmp_path / ("images.gz" if gz else "images")
    if damage == "truncated gzip":
        content = gzip.compress(good)[:-12]
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(str(path))):
        read_idx(path)


def test_load_mnist_names_the_damaged_file_and_refuses_unequal_counts(tmp_path, write_idx):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(5))[:-2])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path, train=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(4))
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        load_mnist(tmp_path, train=False)


def test_shipped_mnist_files_match_the_published_md5():
    """All four official files, uncompressed, against data/mnist/MD5SUMS (the published MD5)."""
    expected = dict(line.split()[::-1] for line in
                    (SHIPPED_MNIST / "MD5SUMS").read_text().splitlines() if line.strip())
    assert sorted(expected) == sorted(f"{split}-{kind}-ubyte" for split in ("train", "t10k")
                                      for kind in ("images-idx3", "labels-idx1"))
    for name, md5 in expected.items():
        with gzip.open(SHIPPED_MNIST / f"{name}.gz", "rb") as fh:
            assert hashlib.md5(fh.read()).hexdigest() == md5, name


def test_load_data_reads_the_official_60k_10k_split():
    x_tr, y_tr, x_te, y_te, info = load_data("mnist")
    assert x_tr.shape == (60000, 1, 24, 24) and x_te.shape == (10000, 1, 24, 24)
    assert (len(y_tr), len(y_te)) == (60000, 10000) and y_tr.dtype == torch.int64
    assert info["n_train"] == 60000 and info["n_test"] == 10000
    assert info["dataset"] == "mnist" and info["source"] == "data/mnist"
    assert "split_seed" not in info
    assert set(y_tr.tolist()) == set(y_te.tolist()) == set(range(10))
    assert 0 <= x_tr.min() and x_tr.max() <= 1


def test_mnist_test_split_is_the_seeded_split_of_the_committed_runs():
    x_tr, y_tr, x_te, y_te, info = load_data("mnist-test-split")
    assert (len(x_tr), len(x_te)) == (8000, 2000) and x_tr.shape[1:] == (1, 24, 24)
    assert info["split_seed"] == 0 and (info["n_train"], info["n_test"]) == (8000, 2000)
    # the split of the committed runs (seeded_split of the 10k test images, seed 0)
    assert y_tr[:12].tolist() == [1, 7, 7, 5, 9, 1, 8, 6, 7, 8, 0, 1]
    assert torch.bincount(y_te).tolist() == [210, 215, 212, 204, 202, 174, 191, 183, 195, 214]
    other = load_data("mnist-test-split", split_seed=1)
    assert other[4]["split_seed"] == 1 and not torch.equal(other[1], y_tr)
    assert torch.equal(torch.bincount(other[1]) + torch.bincount(other[3]),
                       torch.bincount(y_tr) + torch.bincount(y_te))


def _write_split(root, write_idx, train_size, test_size, n=30):
    for split, size in (("train", train_size), ("t10k", test_size)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", np.full((n, size, size), 128))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_load_data_refuses_images_smaller_than_the_crop(tmp_path, write_idx):
    _write_split(tmp_path, write_idx, 8, 8)
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        load_data("mnist", str(tmp_path))
    assert load_data("mnist", str(tmp_path), crop=None)[0].shape == (30, 1, 8, 8)
    assert load_data("mnist", str(tmp_path), crop=8)[2].shape == (30, 1, 8, 8)


def test_load_data_refuses_test_images_smaller_than_the_crop(tmp_path, write_idx):
    _write_split(tmp_path, write_idx, 28, 8)
    with pytest.raises(DataError):
        load_data("mnist", str(tmp_path))


def test_load_data_refuses_too_few_images_or_labels_and_a_missing_folder(tmp_path, write_idx):
    _write_split(tmp_path, write_idx, 28, 28, n=19)
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        load_data("mnist", str(tmp_path))
    _write_split(tmp_path, write_idx, 28, 28)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(30))  # one label only
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        load_data("mnist", str(tmp_path))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_data("mnist", str(tmp_path / "nowhere"))

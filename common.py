"""Shared pieces of the Noise-Injected Deep InfoMax reproduction (Butakov et al.).

Each function stands alone so that it can be copied into a notebook: inputs and outputs are
tensors or arrays, and the docstring names the equation or theorem of the paper
(`noise-injected-infomax.md`) it implements. Equation numbers of Choi & Lee and Tschannen et al.
refer to `choi-regularized-mi-losses.md` and `tschannen-mi-maximization.md`.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing
import os
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from torch import nn
from tqdm import tqdm

LOG10 = math.log(10.0)
"""Information of a balanced 10-class label in nats: a channel below it cannot carry the digit."""

REPO = Path(__file__).resolve().parent
SHIPPED_MNIST = REPO / "data" / "mnist"
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

class DataError(RuntimeError):
    """Data that is neither on disk nor downloadable; the message says what to provide."""


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file (MNIST's on-disk format, optionally gzipped) into a uint8 tensor."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise DataError(f"{path} is truncated: expected {math.prod(shape)} values, "
                        f"found {array.size}")
    return torch.from_numpy(array.reshape(shape).copy())


def _find_idx(root: Path, name: str) -> Path | None:
    """Look for NAME or NAME.gz directly in ROOT or in torchvision's ROOT/<Dataset>/raw layout."""
    for folder in (root, root / "MNIST" / "raw", root / "FashionMNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_mnist(root: str | Path, train: bool, download: bool = False,
               dataset: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float in [0, 1] and labels (N,) int64 of MNIST or Fashion-MNIST.

    Local IDX files in `root` are used first; otherwise, with `download`, torchvision fetches the
    split into `root`. Raises DataError naming the expected files when neither works.
    """
    root = Path(root)
    names = IDX_FILES[train]
    paths = [_find_idx(root, name) for name in names]
    if all(paths):
        images, labels = read_idx(paths[0]), read_idx(paths[1])
    elif download:
        from torchvision import datasets
        cls = datasets.FashionMNIST if dataset == "fashion-mnist" else datasets.MNIST
        try:
            ds = cls(str(root), train=train, download=True)
        except Exception as err:  # network errors come in many types
            raise DataError(f"{dataset} is not in {root} and could not be downloaded "
                            f"({str(err).splitlines()[0][:80]})") from err
        images, labels = ds.data, ds.targets
    else:
        raise DataError(f"{root} lacks {' and '.join(n + '[.gz]' for n in names)} "
                        f"(IDX format); point --data-dir at a folder that holds them")
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{root}: images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                        "do not form an MNIST-style split")
    return images.unsqueeze(1).float().div_(255.0), labels.long()


def center_crop(x: torch.Tensor, size: int = 24) -> torch.Tensor:
    """Crop (N, C, H, W) images to the central size x size window (Table 2: 28 -> 24)."""
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size].contiguous()


def seeded_split(n: int, n_train: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint random index sets of sizes n_train and n - n_train, fixed by `seed`."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:]


def _where(root: Path) -> str:
    """A data folder as metrics.json records it: relative to the repository when inside it."""
    root = root.resolve()
    return str(root.relative_to(REPO)) if root.is_relative_to(REPO) else str(root)


def load_data(dataset: str, data_dir: str | None, download: bool = True, split_seed: int = 0,
              crop: int | None = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor, dict[str, Any]]:
    """Train and test images center-cropped to crop x crop (Table 2: 24; None: the full 28x28),
    their labels, and a record of what was used.

    dataset: "mnist" (60k/10k), "fashion-mnist" (60k/10k) or "mnist-test-split" (the 10k MNIST
    test split, seeded 8k/2k split, since its first and last 5k come from different writers).
    Without `data_dir`, "mnist" looks in ./data, then downloads, then falls back to the test split
    shipped in data/mnist/ (the record's "note" says so). A given `data_dir` without the files
    raises DataError.
    """
    info: dict[str, Any] = {"dataset": dataset}
    unavailable = None
    if dataset != "mnist-test-split":
        if data_dir:
            root, can_download = Path(data_dir), False
        elif dataset == "fashion-mnist" and _find_idx(FASHION_MNIST_DEBIAN, IDX_FILES[True][0]):
            root, can_download = FASHION_MNIST_DEBIAN, False
        else:
            root, can_download = REPO / "data", download
        try:
            x_tr, y_tr = load_mnist(root, True, can_download, dataset)
            x_te, y_te = load_mnist(root, False, can_download, dataset)
            info.update(source=_where(root), split="official train/test")
        except DataError as err:
            if data_dir or dataset != "mnist":
                raise
            unavailable, dataset = err, "mnist-test-split"
    if dataset == "mnist-test-split":
        root = Path(data_dir) if data_dir else SHIPPED_MNIST
        x, y = load_mnist(root, train=False)
        tr, te = seeded_split(len(x), int(0.8 * len(x)), split_seed)
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
        info.update(dataset=dataset, source=_where(root), split_seed=split_seed,
                    split=f"seeded {len(tr)}/{len(te)} split of the MNIST test split")
        if unavailable:
            info["note"] = (f"full MNIST unavailable ({unavailable}): using the MNIST test split "
                            f"shipped in data/mnist/, seeded {len(tr)}/{len(te)} train/test")
    info.update(n_train=len(x_tr), n_test=len(x_te))
    if crop is not None:
        x_tr, x_te = center_crop(x_tr, crop), center_crop(x_te, crop)
    return x_tr, y_tr, x_te, y_te, info


# --------------------------------------------------------------------------------------------
# Encoder and noise heads
# --------------------------------------------------------------------------------------------

class ConvEncoder(nn.Module):
    """Table 2 ConvNet on 1x24x24 images: 3 x [Conv3x3, MaxPool2, BN, LeakyReLU], 2 dense layers."""

    def __init__(self, dim: int, channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3), nn.MaxPool2d(2), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.01)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in, 128), nn.LeakyReLU(0.01),
                                  nn.Linear(128, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class GaussianNoise(nn.Module):
    """Normalize, then inject Z ~ N(0, sigma^2 I) (Theorem 3.4).

    BatchNorm1d(affine=False) enforces E f(X) = 0 and Var f(X)_i = 1, the constraint under which
    I(f(X'); f(X) + Z) <= d/2 log(1 + 1/sigma^2) (eq. 5) with equality only for f(X) ~ N(0, I).
    Call it separately on each branch so that each is normalized over its own batch; the noise is
    added only in training mode and only when `noisy` (the clean branch f(X)).

    `gather` (several processes, DDP): a differentiable function returning the rows of every
    process. In training the mean and variance are then those of the global batch, because the
    loss sees the gathered batch and the constraint must hold for the distribution it sees.
    """

    def __init__(self, dim: int, sigma: float,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma, self.gather = sigma, gather
        self.norm = nn.BatchNorm1d(dim, affine=False)

    def global_norm(self, f: torch.Tensor) -> torch.Tensor:
        """BatchNorm1d's training-mode output and running-statistics update, computed with the
        statistics of the rows of every process."""
        every = self.gather(f)
        mean, var = every.mean(0), every.var(0, unbiased=False)
        with torch.no_grad():
            self.norm.running_mean.lerp_(mean, self.norm.momentum)
            self.norm.running_var.lerp_(every.var(0), self.norm.momentum)
            self.norm.num_batches_tracked += 1
        return (f - mean) / torch.sqrt(var + self.norm.eps)

    def forward(self, f: torch.Tensor, noisy: bool = True) -> torch.Tensor:
        z = self.global_norm(f) if self.training and self.gather else self.norm(f)
        if self.training and noisy and self.sigma > 0:
            z = z + self.sigma * torch.randn_like(z)
        return z


class UniformNoise(nn.Module):
    """Squash to [0, 1]^d with Phi(BN(f)), then inject Z ~ U[-eps, eps]^d (Theorem 3.5).

    Phi, the standard normal CDF, maps the normalized output into [0, 1] and turns N(0, 1) into
    U[0, 1]; I(f(X'); f(X) + Z) <= d log(1 + 1/(2 eps)) (eq. 6).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        if not 0 < eps < 0.5:
            raise ValueError(f"eps must lie in (0, 1/2), got {eps}")
        self.eps = eps
        self.norm = nn.BatchNorm1d(dim, affine=False)

    def forward(self, f: torch.Tensor, noisy: bool = True) -> torch.Tensor:
        u = torch.special.ndtr(self.norm(f))
        if self.training and noisy:
            u = u + self.eps * (2 * torch.rand_like(u) - 1)
        return u


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, forward: Callable[[torch.Tensor], Any],
                       x: torch.Tensor, batch_size: int) -> None:
    """Replace every BatchNorm's running statistics by their average over batches of `x`.

    Used after training on the clean training images, so that evaluation-mode embeddings are
    normalized with the statistics of the clean branch rather than the momentum averages, which
    mix clean and augmented batches from many parameter values.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches of this pass
    was_training = model.training
    model.train()
    for i in range(0, len(x), batch_size):
        forward(x[i:i + batch_size])
    model.train(was_training)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


# --------------------------------------------------------------------------------------------
# Critics: (a, b) -> S with S[i, j] = T(a_i, b_j), a = f(X') rows, b = f(X) + Z columns
# --------------------------------------------------------------------------------------------

def _hidden(p: torch.Tensor, q: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
            h1: torch.Tensor, h2: torch.Tensor) -> None:
    """Both hidden layers of the concat critic for rows p (r x H) against all columns q, written
    into the buffers h1 and h2 (r * len(q) x H): no allocation per chunk."""
    torch.add(p[:, None, :], q[None, :, :], out=h1.view(len(p), len(q), -1))
    F.leaky_relu_(h1, 0.01)
    torch.addmm(b2, h1, w2.T, out=h2)
    F.leaky_relu_(h2, 0.01)


class _PairwiseMLP(torch.autograd.Function):
    """Scores s[i, j] = w3 . lrelu(W2 lrelu(p[i] + q[j]) + b2) + b3 without storing B x B x H.

    p = W_a a + b1 and q = W_b b are the first layer split by input (W [a; b] = W_a a + W_b b),
    so the B x B x 2d pair tensor is never built. Rows are processed in chunks of `rows` through
    buffers allocated once per call, small enough to stay in cache; the backward pass recomputes
    each chunk's activations instead of keeping them, so memory is O(rows x B x H) at the price
    of one extra matmul per chunk.
    """

    @staticmethod
    def forward(ctx, p, q, w2, b2, w3, b3, dtype, rows):
        ctx.save_for_backward(p, q, w2, b2, w3, b3)
        ctx.dtype, ctx.rows = dtype, rows
        p_, q_, w2_, b2_, w3_ = (t.to(dtype) for t in (p, q, w2, b2, w3))
        h1, h2 = (p_.new_empty(min(rows, len(p)) * len(q), w2.shape[0]) for _ in range(2))
        out = torch.empty(len(p), len(q), dtype=torch.float32, device=p.device)
        for i in range(0, len(p), rows):
            n = min(rows, len(p) - i) * len(q)
            _hidden(p_[i:i + rows], q_, w2_, b2_, h1[:n], h2[:n])
            out[i:i + rows] = (h2[:n] @ w3_.T).view(-1, len(q)).float()
        return out + b3

    @staticmethod
    def backward(ctx, grad):
        p, q, w2, b2, w3, b3 = ctx.saved_tensors
        dtype, rows, n_q = ctx.dtype, ctx.rows, len(q)
        p_, q_, w2_, b2_, w3_ = (t.to(dtype) for t in (p, q, w2, b2, w3))
        h1, h2, g1, g2 = (p_.new_empty(min(rows, len(p)) * n_q, w2.shape[0]) for _ in range(4))
        dp = torch.empty_like(p)
        dq, dw2, db2, dw3 = (torch.zeros_like(t) for t in (q, w2, b2, w3))
        slope_of = torch.ops.aten.leaky_relu_backward.grad_input
        for i in range(0, len(p), rows):
            n = min(rows, len(p) - i) * n_q
            _hidden(p_[i:i + rows], q_, w2_, b2_, h1[:n], h2[:n])
            g = grad[i:i + rows].reshape(-1, 1).to(dtype)
            dw3 += (g.T @ h2[:n]).float()
            # the slope of LeakyReLU is read off its output's sign (self_is_result=True)
            slope_of(torch.mul(g, w3_, out=g1[:n]), h2[:n], 0.01, True, grad_input=g2[:n])
            dw2 += (g2[:n].T @ h1[:n]).float()
            db2 += g2[:n].sum(0).float()
            slope_of(torch.mm(g2[:n], w2_, out=g1[:n]), h1[:n], 0.01, True, grad_input=h2[:n])
            per_pair = h2[:n].view(-1, n_q, h2.shape[1])
            dp[i:i + rows] = per_pair.sum(1).float()
            dq += per_pair.sum(0).float()
        return dp, dq, dw2, db2, dw3, grad.sum().reshape(b3.shape), None, None


class ConcatCritic(nn.Module):
    """Table 2 critic T([a; b]): Dense(2d,256), LeakyReLU, Dense(256,256), LeakyReLU, Dense(256,1).

    Two implementations of the same function and parameters. `reference` materialises all
    B_a x B_b concatenated pairs and runs the MLP on them: the definition, simple and
    memory-hungry (B^2 x 256 activations kept for backward). `fast` (default) splits the first
    layer, W [a; b] = W_a a + W_b b, computes it once per row and column, and scores row chunks
    in the autocast dtype (bfloat16) with activations recomputed in backward (_PairwiseMLP).
    """

    def __init__(self, dim: int, hidden: int = 256, fast: bool = True, rows: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.LeakyReLU(0.01),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.01),
                                 nn.Linear(hidden, 1))
        self.fast, self.rows = fast, rows

    def reference(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        pairs = torch.cat([a[:, None, :].expand(-1, len(b), -1),
                           b[None, :, :].expand(len(a), -1, -1)], dim=-1)
        return self.net(pairs).squeeze(-1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return self.reference(a, b)
        first, second, last = self.net[0], self.net[2], self.net[4]
        device = a.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else torch.float32)
        # CPU: about 2M activations per chunk stay in cache; CUDA: one chunk
        rows = self.rows or (max(1, 2 ** 21 // (len(b) * first.out_features))
                             if device == "cpu" else len(a))
        with torch.autocast(device, enabled=False):
            d = a.shape[1]
            p = F.linear(a.float(), first.weight[:, :d], first.bias)
            q = F.linear(b.float(), first.weight[:, d:])
            return _PairwiseMLP.apply(p, q, second.weight, second.bias, last.weight, last.bias,
                                      dtype, rows)


class SeparableCritic(nn.Module):
    """T(a, b) = <phi(a), psi(b)>, phi and psi one-hidden-layer MLPs (Tschannen et al., 3.2)."""

    def __init__(self, dim: int, hidden: int = 256, out: int = 128):
        super().__init__()

        def mlp() -> nn.Module:
            return nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, out))

        self.phi, self.psi = mlp(), mlp()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.phi(a) @ self.psi(b).T


class BilinearCritic(nn.Module):
    """T(a, b) = a^T W b (Tschannen et al., Sec. 2), W initialised to the identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ self.weight @ b.T


class GaussianCritic(nn.Module):
    """Parameter-free critic of Theorem 4.1, shifted to be the exact PMI of the ideal channel.

    T*(x, y) = ||y||^2 / (2(1 + sigma^2)) - ||y - x||^2 / (2 sigma^2), x = f(X'), y = f(X) + Z.
    Appendix A: PMI_{Y, Y+Z}(x, y) = T*(x, y) + d/2 log(1 + 1/sigma^2) for Y ~ N(0, I); this
    returns that PMI, the optimal critic of every loss below. The InfoNCE/DV bound with it is tight
    exactly when f is weakly invariant and f(X) ~ N(0, I). Computed in float32 whatever the
    autocast: at small sigma the scores reach hundreds, beyond bfloat16's resolution.
    """

    def __init__(self, sigma: float):
        super().__init__()
        if sigma <= 0:
            raise ValueError("the Theorem 4.1 critic divides by sigma^2: it needs sigma > 0")
        self.sigma = sigma

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.autocast(a.device.type, enabled=False):
            a, b = a.float(), b.float()
            s2 = self.sigma ** 2
            sq_a, sq_b = (a * a).sum(1), (b * b).sum(1)
            sq_dist = sq_a[:, None] + sq_b[None, :] - 2 * a @ b.T
            return (sq_b[None, :] / (2 * (1 + s2)) - sq_dist / (2 * s2)
                    + gaussian_capacity(a.shape[1], self.sigma))


# --------------------------------------------------------------------------------------------
# MI lower bounds on a score matrix (positives on the diagonal); each returns (loss, MI in nats)
# Convention: scores estimate the PMI; the NWJ family, whose optimum is PMI + 1 (Remark 2.5,
# alpha = 1), is evaluated at T = scores + 1, so the same critic serves every loss.
# --------------------------------------------------------------------------------------------

def _offdiag_logmeanexp(scores: torch.Tensor) -> torch.Tensor:
    """log of the mean of exp(scores) over the off-diagonal (product-of-marginals) pairs."""
    n = scores.shape[0]
    masked = scores.masked_fill(torch.eye(n, dtype=torch.bool, device=scores.device), -math.inf)
    return masked.logsumexp(dim=(0, 1)) - math.log(n * (n - 1))


def infonce(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE (van den Oord et al.; Section 4): mean_i [S_ii - log mean_j exp S_ij] <= log B.

    The Monte-Carlo form of eq. (2) used for the paper's figures; row i classifies the positive
    b_i among all b_j for a_i.
    """
    mi = (scores.diagonal() - scores.logsumexp(dim=1)).mean() + math.log(scores.shape[1])
    return -mi, mi.detach()


def dv(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Donsker-Varadhan / MINE, eq. (2): E_P T - log E_Q e^T, Q over the off-diagonal pairs."""
    mi = scores.diagonal().mean() - _offdiag_logmeanexp(scores)
    return -mi, mi.detach()


def nwj(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nguyen-Wainwright-Jordan, eq. (3) at T = scores + 1: E_P scores + 1 - E_Q e^scores."""
    mi = scores.diagonal().mean() + 1 - _offdiag_logmeanexp(scores).exp()
    return -mi, mi.detach()


def js(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jensen-Shannon (f-GAN) loss of Deep InfoMax (Hjelm et al.), MI estimated with NWJ.

    Loss: E_P softplus(-T) + E_Q softplus(T), whose optimal T is the PMI; its MI value is not an
    MI bound, so the returned estimate is NWJ on the same scores (Choi & Lee, Table 1).
    """
    n = scores.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=scores.device)
    loss = F.softplus(-scores.diagonal()).mean() + F.softplus(scores[off]).mean()
    return loss, nwj(scores)[1]


def redv(scores: torch.Tensor, weight: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Regularized DV (Choi & Lee, eq. 14): DV - weight * (log E_Q e^T - C*)^2 with C* = 0.

    The penalty pins the free additive constant of the DV critic ("drifting") to the PMI's.
    """
    lme = _offdiag_logmeanexp(scores)
    mi = scores.diagonal().mean() - lme
    return -mi + weight * lme ** 2, mi.detach()


def renwj(scores: torch.Tensor, weight: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Regularized NWJ (Choi & Lee, eq. 15): NWJ - weight * (log E_Q e^(T-1))^2, T = scores + 1."""
    lme = _offdiag_logmeanexp(scores)
    mi = scores.diagonal().mean() + 1 - lme.exp()
    return -mi + weight * lme ** 2, mi.detach()


LOSSES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "infonce": infonce, "nwj": nwj, "dv": dv, "js": js, "redv": redv, "renwj": renwj}


# --------------------------------------------------------------------------------------------
# Capacity bounds
# --------------------------------------------------------------------------------------------

def gaussian_capacity(d: int, sigma: float) -> float:
    """C = d/2 log(1 + 1/sigma^2), eq. (5): the maximum of I(f(X'); f(X) + Z); inf at sigma = 0."""
    return math.inf if sigma == 0 else 0.5 * d * math.log1p(1.0 / sigma ** 2)


def uniform_capacity(d: int, eps: float) -> float:
    """C = d log(1 + 1/(2 eps)), eq. (6): the bound for Z ~ U[-eps, eps]^d, f(X) in [0, 1]^d."""
    return d * math.log1p(1.0 / (2.0 * eps))


# --------------------------------------------------------------------------------------------
# Normality tests and downstream metrics (Section 5)
# --------------------------------------------------------------------------------------------

_UNIVARIATE_TESTS = {
    "dagostino": scipy.stats.normaltest,
    "shapiro": scipy.stats.shapiro,
}
# scipy.stats.normaltest needs at least 8 observations (kurtosis test).
_MIN_POINTS = 8
_SILHOUETTE_MAX_POINTS = 5000


def _as_2d(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2:
        raise ValueError(f"expected an (n, d) array, got shape {z.shape}")
    return z


def _subsample_indices(rng: np.random.Generator, n: int,
                       subsample: int) -> np.ndarray:
    if subsample >= n:
        return np.arange(n)
    return rng.choice(n, size=subsample, replace=False)


def projected_pvalues(z, test: str = "dagostino", n_proj: int = 10,
                      n_boot: int = 20, subsample: int = 128,
                      seed: int = 0) -> float:
    """Mean p-value of a univariate normality test on random 1-D projections.

    Paper Section 5: the sample is projected onto directions drawn uniformly
    on the unit sphere (any projection of a Gaussian is Gaussian) and tested
    on bootstrap subsamples. ``test`` is "dagostino" (D'Agostino 1971;
    D'Agostino & Pearson 1973, scipy.stats.normaltest) or "shapiro"
    (Shapiro-Wilk, scipy.stats.shapiro).
    """
    if test not in _UNIVARIATE_TESTS:
        raise ValueError(f"unknown test {test!r}; "
                         f"expected one of {sorted(_UNIVARIATE_TESTS)}")
    z = _as_2d(z)
    n, d = z.shape
    if n < _MIN_POINTS:
        raise ValueError(f"need at least {_MIN_POINTS} points, got {n}")
    test_fn = _UNIVARIATE_TESTS[test]
    rng = np.random.default_rng(seed)
    pvalues = []
    for _ in range(n_proj):
        u = rng.standard_normal(d)
        u /= np.linalg.norm(u)
        projection = z @ u
        for _ in range(n_boot):
            idx = _subsample_indices(rng, n, subsample)
            pvalues.append(float(test_fn(projection[idx]).pvalue))
    return float(np.mean(pvalues))


def henze_zirkler(z) -> tuple[float, float]:
    """Henze-Zirkler multivariate normality test (Henze & Zirkler 1990).

    Returns the statistic HZ and its p-value from the log-normal
    approximation of the null distribution.
    """
    z = _as_2d(z)
    n, d = z.shape
    centred = z - z.mean(axis=0)
    # The original test uses the maximum-likelihood covariance (divisor n).
    cov = centred.T @ centred / n
    try:
        precision = np.linalg.inv(cov)
    except np.linalg.LinAlgError:
        precision = np.linalg.pinv(cov)
    whitened = centred @ precision
    d_i = np.einsum("ij,ij->i", whitened, centred)
    gram = whitened @ centred.T
    d_ij = d_i[:, None] + d_i[None, :] - 2.0 * gram

    beta2 = 0.5 * ((2 * d + 1) * n / 4.0) ** (2.0 / (d + 4))
    beta4 = beta2 ** 2
    beta8 = beta4 ** 2
    statistic = (np.exp(-0.5 * beta2 * d_ij).sum() / n
                 - 2.0 * (1.0 + beta2) ** (-d / 2)
                 * np.exp(-beta2 / (2.0 * (1.0 + beta2)) * d_i).sum()
                 + n * (1.0 + 2.0 * beta2) ** (-d / 2))

    a = 1.0 + 2.0 * beta2
    w = (1.0 + beta2) * (1.0 + 3.0 * beta2)
    mean = 1.0 - a ** (-d / 2) * (1.0 + d * beta2 / a
                                  + d * (d + 2) * beta4 / (2.0 * a ** 2))
    var = (2.0 * (1.0 + 4.0 * beta2) ** (-d / 2)
           + 2.0 * a ** (-d) * (1.0 + 2.0 * d * beta4 / a ** 2
                                + 3.0 * d * (d + 2) * beta8 / (4.0 * a ** 4))
           - 4.0 * w ** (-d / 2) * (1.0 + 3.0 * d * beta4 / (2.0 * w)
                                    + d * (d + 2) * beta8 / (2.0 * w ** 2)))
    log_mean = np.log(mean ** 2 / np.sqrt(var + mean ** 2))
    log_sd = np.sqrt(np.log((var + mean ** 2) / mean ** 2))
    p_value = scipy.stats.lognorm.sf(statistic, s=log_sd,
                                     scale=np.exp(log_mean))
    return float(statistic), float(p_value)


def henze_zirkler_pvalue(z, n_boot: int = 20, subsample: int = 128,
                         seed: int = 0) -> float:
    """Henze-Zirkler (1990) p-value averaged over random subsamples.

    Paper Section 5: bootstrapping small subsamples lowers the variance of
    the p-value and smooths its transition from low to high values.
    """
    z = _as_2d(z)
    rng = np.random.default_rng(seed)
    pvalues = [henze_zirkler(z[_subsample_indices(rng, len(z), subsample)])[1]
               for _ in range(n_boot)]
    return float(np.mean(pvalues))


def to_gaussian(u, eps: float = 1e-6) -> np.ndarray:
    """Probability integral transform of [0, 1]^d embeddings to Gaussian.

    Paper Section 3.3: testing uniformity reduces to testing normality of
    the inverse normal CDF; clipping keeps boundary points finite.
    """
    u = np.asarray(u, dtype=np.float64)
    return scipy.stats.norm.ppf(np.clip(u, eps, 1.0 - eps))


def uniformity_report(u: np.ndarray) -> dict:
    """Kolmogorov-Smirnov test of each coordinate against U[0, 1]: mean p-value, largest D."""
    tests = [scipy.stats.kstest(u[:, i], "uniform") for i in range(u.shape[1])]
    return {"ks_p_mean": float(np.mean([t.pvalue for t in tests])),
            "ks_stat_max": float(max(t.statistic for t in tests)),
            "ks_p": [float(t.pvalue) for t in tests]}


def normality_report(z, seed: int = 0, subsample: int = 128,
                     n_proj: int = 10, n_boot: int = 20) -> dict:
    """All normality tests of paper Section 5 on one embedding sample.

    D'Agostino-Pearson and Shapiro-Wilk on random projections, and
    Henze-Zirkler (1990) on subsamples and on the full sample. Henze-Zirkler
    whitens with the subsample covariance, singular unless d < subsample: for
    d >= subsample its entries are None.
    """
    z = _as_2d(z)
    kwargs = dict(n_proj=n_proj, n_boot=n_boot, subsample=subsample,
                  seed=seed)
    whitenable = z.shape[1] < min(subsample, len(z))
    return {
        "dagostino_p": projected_pvalues(z, test="dagostino", **kwargs),
        "shapiro_p": projected_pvalues(z, test="shapiro", **kwargs),
        "henze_zirkler_p": henze_zirkler_pvalue(
            z, n_boot=n_boot, subsample=subsample, seed=seed) if whitenable else None,
        "henze_zirkler_stat": henze_zirkler(z)[0] if whitenable else None,
        "subsample": int(min(subsample, len(z))),
        "n_proj": int(n_proj),
        "n_boot": int(n_boot),
    }


def downstream_report(z_tr, y_tr, z_te, y_te, seed: int = 0) -> dict:
    """Downstream classification and clustering scores (paper Section 5).

    Test accuracy of Gaussian naive Bayes, 5-nearest neighbours and a
    shallow MLP trained on the train embeddings, and the silhouette score
    (Rousseeuw 1987) of the test embeddings grouped by label.
    """
    z_tr, z_te = _as_2d(z_tr), _as_2d(z_te)
    y_tr, y_te = np.asarray(y_tr), np.asarray(y_te)
    classifiers = {
        "gnb_acc": GaussianNB(),
        "knn_acc": KNeighborsClassifier(n_neighbors=5),
        "mlp_acc": MLPClassifier(hidden_layer_sizes=(64,), max_iter=500,
                                 random_state=seed),
    }
    report = {}
    for name, clf in classifiers.items():
        # A non-converged MLP is still a valid (if weaker) probe.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(z_tr, y_tr)
        report[name] = float(clf.score(z_te, y_te))
    # Silhouette is O(n^2) in memory and time, so large test sets are
    # subsampled.
    sample_size = (_SILHOUETTE_MAX_POINTS
                   if len(z_te) > _SILHOUETTE_MAX_POINTS else None)
    report["silhouette"] = float(silhouette_score(
        z_te, y_te, sample_size=sample_size, random_state=seed))
    return report


# --------------------------------------------------------------------------------------------
# Run utilities
# --------------------------------------------------------------------------------------------

def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bfloat16 autocast (float16 on GPUs without bf16).

    With channels-last it made the encoder 3.8x faster on 2 cores of a Xeon with native bf16
    (AMX); CPUs without native bf16 may run faster in float32 (enabled=False).
    """
    dtype = torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temporary file name beside `path`; rename it to `path` once the block succeeds.

    Readers see the old file or the complete new one, never a half-written file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_json(obj: Any, path: str | Path) -> None:
    """Atomic, indented JSON (inf and nan are written as strings so that the file stays valid)."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return v
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(clean(obj), indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    """A file written by write_json, with its "nan" / "inf" / "-inf" strings as floats again;
    one line and exit code 2 when it cannot be read."""
    special = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

    def restore(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: restore(x) for k, x in v.items()}
        if isinstance(v, list):
            return [restore(x) for x in v]
        return special.get(v, v) if isinstance(v, str) else v
    try:
        return restore(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as err:
        fail(f"{path} is not valid JSON ({err})")


def save_figure(fig: Any, path: str | Path) -> None:
    """Save a matplotlib figure atomically, in the format named by the path's suffix."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix[1:], dpi=150, bbox_inches="tight")
    pyplot().close(fig)


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def scatter_embeddings(z: np.ndarray, y: np.ndarray, title: str) -> Any:
    """Figure 2: test embeddings coloured by label; for d > 2, the first two principal axes."""
    plt = pyplot()
    z = np.asarray(z, dtype=np.float64)
    xlabel, ylabel = "$z_1$", "$z_2$"
    if z.shape[1] > 2:
        centered = z - z.mean(0)
        z = centered @ np.linalg.svd(centered, full_matrices=False)[2][:2].T
        xlabel, ylabel = "PC 1", "PC 2"
    fig, ax = plt.subplots(figsize=(5.5, 5))
    points = ax.scatter(z[:, 0], z[:, 1], c=y, cmap="tab10", s=3, alpha=0.7, vmin=-0.5, vmax=9.5)
    fig.colorbar(points, ax=ax, ticks=range(10), label="label")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, aspect="equal")
    return fig


def time_per_step(step: Callable[[], Any], n: int, device: torch.device, warmup: int = 2) -> float:
    """Seconds per call of `step`, averaged over n calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


# --------------------------------------------------------------------------------------------
# InfoMax runs: flags, objective, training loop, checkpoints (mnist_gauss.py, mnist_uniform.py)
# --------------------------------------------------------------------------------------------

PAPER = {"batch_size": 1024, "epochs": 2000, "steps": None, "critic": "concat", "loss": "infonce",
         "lr": 1e-3, "aug_sigma": 0.6}
"""Appendix C: batch 1024, 2000 epochs, Adam 1e-3, Table 2 critic, InfoNCE, pixel noise 0.6."""
RUNTIME_FLAGS = ("out", "resume", "device", "quiet", "bench", "compile", "jobs")
"""Flags that --resume takes from the command line; every other setting comes from args.json."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_data_flags(p: argparse.ArgumentParser, note: str = "") -> None:
    """--dataset, --data-dir, --no-download: the arguments of load_data."""
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist", "mnist-test-split"],
                   default="mnist",
                   help="mnist falls back to the shipped MNIST test split (8k/2k) when the full "
                        "set is neither on disk nor downloadable" + note)
    p.add_argument("--data-dir", default=None, help="folder with the IDX files (optionally .gz)")
    p.add_argument("--no-download", action="store_true", help="never try to download data")


def add_run_flags(p: argparse.ArgumentParser, critics: Sequence[str], default_critic: str) -> None:
    """The flags every InfoMax script shares; the script adds its noise flag (--sigma, --eps)."""
    p.add_argument("--dim", type=positive_int, default=2,
                   help="embedding dimension d (Figure 1: 2)")
    p.add_argument("--aug-sigma", type=nonnegative_float, default=0.6,
                   help="std of the pixel noise X -> X' (Appendix C: 0.6)")
    about = {"separable": "<phi(a), psi(b)> (Tschannen et al.), cheap, and the best trained "
                          "in 2000 steps (README)",
             "gaussian": "the parameter-free Theorem 4.1 critic (needs sigma > 0)",
             "concat": "Table 2 (the paper's); 2.5x the time per step of separable on CPU",
             "bilinear": "a^T W b"}
    p.add_argument("--critic", choices=critics, default=default_critic,
                   help="; ".join(f"{name}: {about[name]}" for name in critics))
    p.add_argument("--critic-impl", choices=["fast", "reference"], default="fast",
                   help="concat critic: fast (first layer split, bfloat16 row chunks, same "
                        "function) or reference (all B x B pairs materialised, the definition)")
    p.add_argument("--loss", choices=sorted(LOSSES), default="infonce",
                   help="MI bound (paper: infonce, eq. 2); redv/renwj: Choi & Lee")
    p.add_argument("--reg-weight", type=nonnegative_float, default=0.1,
                   help="lambda of the redv/renwj penalty (Choi & Lee try 0.1, 0.01, 0.001)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="paper: 1024")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (Appendix C: 1e-3)")
    p.add_argument("--steps", type=int, default=2000,
                   help="optimizer steps (paper: 2000 epochs = 117k steps on 60k images)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="train for this many passes over the training set instead of --steps")
    p.add_argument("--seed", type=int, default=0, help="fixes data order, noise and init")
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="sweep: N runs with seeds --seed ... --seed + N - 1, each in its own "
                        "sub-directory of --out")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="sweep: runs at once, each in its own process with CPU threads / N "
                        "threads; default 2 on a CPU with 2 or more threads (the most runs per "
                        "hour on 2 cores, README), else 1")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    add_data_flags(p)
    p.add_argument("--out", default=None,
                   help="run directory, or a sweep's parent directory; None: a new directory "
                        "under runs/<script>/")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--subsample", type=positive_int, default=128,
                   help="subsample size of the bootstrapped normality tests (sets their power)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="full evaluation every N steps, stored as a convergence curve (0: off)")
    p.add_argument("--log-every", type=positive_int, default=10, help="progress update interval")
    p.add_argument("--ckpt-every", type=positive_int, default=500, help="checkpoint interval")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast for encoder and learned critics (fp16 on GPUs without "
                        "bf16); --no-amp: float32, faster on CPUs without native bf16")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder and the critic (for CUDA)")
    p.add_argument("--bench", type=positive_int, default=0, metavar="N",
                   help="time N training steps on synthetic data with this run's settings and "
                        "with the reference path (concat critic's definition, float32), print "
                        "ms/step, their ratio and projected run times, and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--paper", action="store_true",
                   help="the paper's settings: " + ", ".join(f"{k}={v}" for k, v in PAPER.items()))


def is_sweep(args: argparse.Namespace, key: str) -> bool:
    """Whether the command asks for a sweep: a --<key>s list or more than one seed."""
    return getattr(args, f"{key}s") is not None or args.seeds > 1


def resolve_out(p: argparse.ArgumentParser, args: argparse.Namespace, stem: str) -> None:
    """The --out / --resume rules of every script. --resume takes every setting except the
    RUNTIME_FLAGS from --out/args.json; an --out that holds files is refused without --resume;
    no --out gives a new directory named `stem` + a time stamp (not needed for --bench).
    """
    if args.resume:
        if args.out is None or not (Path(args.out) / "args.json").is_file():
            p.error("--resume needs --out pointing at a run directory with args.json")
        saved = read_json(Path(args.out) / "args.json")
        vars(args).update({k: v for k, v in saved.items() if k not in RUNTIME_FLAGS})
    elif args.out is not None and Path(args.out).exists() and any(Path(args.out).iterdir()):
        p.error(f"--out {args.out} already holds files; pass --resume to continue that run "
                "or choose another directory")
    elif args.out is None and not args.bench:
        base = f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}"
        args.out = next(name for name in (base, *(f"{base}-{i}" for i in range(2, 1000)))
                        if not Path(name).exists())


def check_run_args(p: argparse.ArgumentParser, args: argparse.Namespace, key: str,
                   script: str) -> argparse.Namespace:
    """Apply --paper and --resume, pick a fresh --out, and reject inconsistent settings.

    key names the noise flag ("sigma", "eps"); the default --out is a new directory under
    runs/<script>/. A sweep's --out is a parent directory that may already exist: repeating the
    sweep's command skips its finished runs and resumes the others (see sweep_runs).
    """
    if args.paper:
        vars(args).update(PAPER)
    if is_sweep(args, key):
        args.out = args.out or f"runs/{script}/sweep_{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        resolve_out(p, args, f"runs/{script}/{key}{getattr(args, key):g}_seed{args.seed}")
    if args.steps is not None and args.steps < 0:
        p.error("--steps must be >= 0")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    return args


def sweep_runs(args: argparse.Namespace, key: str, values: Sequence[float],
               list_flag: str) -> list[argparse.Namespace]:
    """One run's arguments per (value, seed) of a sweep, each in --out/<key><value>_seed<seed>.

    A finished run (metrics.json) is skipped by run_infomax and a started one is resumed; if any
    run directory was written with other settings, nothing runs and the sweep stops with an error.
    """
    runs = []
    for value in values:
        for seed in range(args.seed, args.seed + args.seeds):
            out = Path(args.out) / f"{key}{value:g}_seed{seed}"
            run = argparse.Namespace(**{**vars(args), key: value, "seed": seed, "seeds": 1,
                                        list_flag: None, "out": str(out),
                                        "resume": (out / "args.json").is_file()})
            if run.resume:
                saved = read_json(out / "args.json")
                differ = [k for k, v in vars(run).items()
                          if k in saved and saved[k] != v and k not in RUNTIME_FLAGS
                          and not (k == "steps" and run.epochs is not None)]
                if differ:
                    fail(f"{out} was run with other settings ({', '.join(differ)}); "
                         "choose another --out")
            runs.append(run)
    return runs


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr and a non-zero exit: bad input is not a stack trace."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def make_critic(name: str, dim: int, sigma: float = 0.0, fast: bool = True) -> nn.Module:
    """The critic called `name` for d-dimensional embeddings (sigma for the Gaussian one;
    fast=False: the concat critic's reference implementation)."""
    if name == "gaussian":
        return GaussianCritic(sigma)
    if name == "concat":
        return ConcatCritic(dim, fast=fast)
    return {"separable": SeparableCritic, "bilinear": BilinearCritic}[name](dim)


def mi_loss(name: str, reg_weight: float = 0.1) -> Callable[[torch.Tensor], tuple]:
    """The loss called `name`, with the penalty weight bound for redv / renwj."""
    loss = LOSSES[name]
    return partial(loss, weight=reg_weight) if name in ("redv", "renwj") else loss


def infomax_objective(models: nn.ModuleDict, x: torch.Tensor, aug_sigma: float,
                      loss_fn: Callable[[torch.Tensor], tuple], amp: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, MI estimate) of I(f(X'); f(X) + Z) on one batch of clean images x (Section 3).

    models holds the encoder f, the noise head (normalization + Z) and the critic T. The head is
    called once per branch, so each branch is normalized over its own batch (Theorems 3.4 and 3.5
    constrain f(X) alone), and Z goes on the clean branch only.
    """
    x_aug = x + aug_sigma * torch.randn_like(x)
    with autocast(x.device, amp):
        f, f_aug = models["encoder"](x), models["encoder"](x_aug)
        b = models["head"](f.float())
        a = models["head"](f_aug.float(), noisy=False)
        scores = models["critic"](a, b).float()
    return loss_fn(scores)


def objective_of(args: argparse.Namespace) -> Callable[[nn.ModuleDict, torch.Tensor], tuple]:
    """infomax_objective with the run's augmentation, loss and precision bound."""
    loss_fn = mi_loss(args.loss, args.reg_weight)
    return lambda models, x: infomax_objective(models, x, args.aug_sigma, loss_fn, args.amp)


def make_train_step(models: nn.ModuleDict, opt: torch.optim.Optimizer,
                    args: argparse.Namespace) -> Callable[[torch.Tensor], tuple]:
    """One Adam step on a batch; returns the (loss, MI estimate) tensors without syncing."""
    objective = objective_of(args)
    if args.compile:
        models = nn.ModuleDict({"encoder": torch.compile(models["encoder"]),
                                "head": models["head"],
                                "critic": torch.compile(models["critic"])})

    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, mi = objective(models, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach(), mi
    return step


def _rng_devices(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []


def measure_step(build_models: Callable[[argparse.Namespace, torch.device], nn.ModuleDict],
                 args: argparse.Namespace, device: torch.device, n: int, warmup: int = 2,
                 channels_last: bool = True) -> float:
    """Seconds per training step of `args` on synthetic images, with throw-away models and RNG
    (channels_last=False: models and images in the default NCHW memory format)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    with torch.random.fork_rng(devices=_rng_devices(device)):
        models = build_models(args, device).to(memory_format=layout)
        step = make_train_step(models, torch.optim.Adam(models.parameters(), lr=args.lr), args)
        x = torch.rand(args.batch_size, 1, 24, 24, device=device).contiguous(memory_format=layout)
        return time_per_step(lambda: step(x), n, device, warmup)


def _describe(args: argparse.Namespace, channels_last: bool = True) -> str:
    impl = {"fast": "first layer split, row chunks",
            "reference": "all pairs materialised"}[args.critic_impl]
    return (f"critic {args.critic}{f' ({impl})' if args.critic == 'concat' else ''}, "
            f"{'bf16 autocast' if args.amp else 'float32'}, "
            f"{'channels-last' if channels_last else 'NCHW'}{', compiled' if args.compile else ''}")


def bench(args: argparse.Namespace,
          build_models: Callable[[argparse.Namespace, torch.device], nn.ModuleDict],
          device: torch.device) -> dict[str, float]:
    """--bench N: ms per training step of this run's settings next to the reference path (none
    of the speed-ups: the concat critic's definition, float32, NCHW images), their ratio, and
    the projected time of this run and of --paper (2000 epochs of the 60k MNIST training split
    at batch 1024, Appendix C).
    Returns the seconds per step of "run", "reference" and "paper".
    """
    def variant(**changes: Any) -> argparse.Namespace:
        return argparse.Namespace(**{**vars(args), **changes})

    runs = {"run": args, "reference": variant(critic_impl="reference", amp=False, compile=False),
            "paper": variant(**PAPER)}
    sec = {"run": measure_step(build_models, args, device, args.bench)}
    print(f"{device.type}, batch {args.batch_size}, loss {args.loss}, {args.bench} steps each")
    print(f"  this run:  {1e3 * sec['run']:8.1f} ms/step   {_describe(args)}", flush=True)
    sec["reference"] = measure_step(build_models, runs["reference"], device, args.bench,
                                    channels_last=False)
    print(f"  reference: {1e3 * sec['reference']:8.1f} ms/step   "
          f"{_describe(runs['reference'], channels_last=False)}"
          f"\n  speed-up {sec['reference'] / sec['run']:.1f}x; "
          f"{args.batch_size / sec['run']:.0f} pairs/s", flush=True)
    same = all(getattr(args, k) == v for k, v in PAPER.items() if k != "steps")
    sec["paper"] = sec["run"] if same else measure_step(build_models, runs["paper"], device,
                                                        args.bench)
    steps = args.steps if args.epochs is None else args.epochs * (60_000 // args.batch_size)
    paper_steps = PAPER["epochs"] * (60_000 // PAPER["batch_size"])
    print(f"  projected: this run ({steps} steps) {sec['run'] * steps / 60:.1f} min; --paper "
          f"({paper_steps} steps at batch {PAPER['batch_size']}, {_describe(runs['paper'])}: "
          f"{1e3 * sec['paper']:.0f} ms/step) {sec['paper'] * paper_steps / 3600:.1f} h")
    return sec


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """Permutation of epoch `epoch`, a function of (seed, epoch) so that --resume needs no state."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


@torch.no_grad()
def heldout_mi(models: nn.ModuleDict, x: torch.Tensor,
               args: argparse.Namespace) -> tuple[float, float]:
    """Mean and standard error over held-out batches of the training objective's MI estimate.

    Train-mode pass: each branch is normalized over its own batch exactly as in training; the
    running statistics it touches are recomputed afterwards by `embed_train_test`.
    """
    models.train()
    objective, bs = objective_of(args), min(args.batch_size, len(x))
    with torch.random.fork_rng(devices=_rng_devices(x.device)):
        torch.manual_seed(args.seed + 1)
        values = [objective(models, x[i:i + bs])[1].item() for i in range(0, len(x) - bs + 1, bs)]
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(np.mean(values)), se


@torch.no_grad()
def embed_train_test(models: nn.ModuleDict, x_tr: torch.Tensor, x_te: torch.Tensor,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation embeddings (clean branch, eval mode, no noise, float32) of train and test.

    The BatchNorm statistics are first recomputed on the clean training images.
    """
    recompute_bn_stats(models, lambda x: models["head"](models["encoder"](x), noisy=False),
                       x_tr, batch_size)
    models.eval()

    def embed(x: torch.Tensor) -> np.ndarray:
        return torch.cat([models["head"](models["encoder"](x[i:i + 2048]))
                          for i in range(0, len(x), 2048)]).float().cpu().numpy()
    return embed(x_tr), embed(x_te)


def evaluate_infomax(models: nn.ModuleDict, data: tuple, args: argparse.Namespace,
                     capacity: float,
                     transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Section 5 protocol: held-out MI against the capacity C (and the DM gap C - I, Lemmas B.1
    and B.4), normality tests of the test embeddings (after `transform`: Phi^-1 for uniform DM,
    Section 3.3), downstream accuracies and silhouette; "embeddings" holds (z_train, z_test).
    """
    x_tr, y_tr, x_te, y_te = data
    mi, mi_se = heldout_mi(models, x_te, args)
    z_tr, z_te = embed_train_test(models, x_tr, x_te, args.batch_size)
    return {"capacity": capacity, "mi_heldout": mi, "mi_heldout_se": mi_se,
            "dm_gap": capacity - mi, "class_information": LOG10,
            "normality": normality_report(z_te if transform is None else transform(z_te),
                                          seed=args.seed, subsample=args.subsample),
            "downstream": downstream_report(z_tr, y_tr.cpu().numpy(), z_te, y_te.cpu().numpy(),
                                            seed=args.seed),
            "embeddings": (z_tr, z_te)}


def save_checkpoint(out: Path, models: nn.ModuleDict, opt: torch.optim.Optimizer, step: int,
                    history: list, curve: list) -> None:
    """Everything --resume needs: weights, optimizer, RNG state, logs (written atomically)."""
    atomic_save({"step": step, "models": models.state_dict(), "optimizer": opt.state_dict(),
                 "rng": torch.get_rng_state(), "history": history, "curve": curve},
                out / "checkpoint.pt")


def load_checkpoint(out: Path, models: nn.ModuleDict, opt: torch.optim.Optimizer,
                    device: torch.device) -> tuple[int, list, list]:
    """Restore a checkpoint written by save_checkpoint; returns (step, history, curve)."""
    ckpt = torch.load(out / "checkpoint.pt", map_location=device, weights_only=False)
    models.load_state_dict(ckpt["models"])
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt["history"], ckpt["curve"]


def train_infomax(models: nn.ModuleDict, opt: torch.optim.Optimizer, x_tr: torch.Tensor,
                  args: argparse.Namespace, out: Path, start: int, history: list, curve: list,
                  evaluate: Callable[[], dict], desc: str) -> None:
    """Adam on the InfoMax objective from step `start` to args.steps.

    Logs mean (step, loss, MI) every --log-every steps to `history`, evaluates every
    --eval-every steps into `curve`, checkpoints every --ckpt-every steps, and stops with exit
    code 3 (keeping the last good checkpoint) when the loss stops being finite.
    """
    per_epoch = len(x_tr) // args.batch_size
    step_fn = make_train_step(models, opt, args)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.quiet,
               desc=desc, dynamic_ncols=True)
    losses, mis = [], []
    for step in bar:
        epoch, k = divmod(step, per_epoch)
        if k == 0 or step == start:
            order = epoch_order(len(x_tr), args.seed, epoch, x_tr.device)
        models.train()
        loss, mi = step_fn(x_tr[order[k * args.batch_size:(k + 1) * args.batch_size]])
        losses.append(loss)
        mis.append(mi)
        done = step + 1
        if done % args.log_every == 0 or done % args.ckpt_every == 0 or done == args.steps:
            mean_loss, mean_mi = torch.stack(losses).mean().item(), torch.stack(mis).mean().item()
            losses, mis = [], []
            if not (math.isfinite(mean_loss) and math.isfinite(mean_mi)):
                fail(f"the loss became {mean_loss} at step {done}; the last good checkpoint is "
                     f"kept in {out / 'checkpoint.pt'}", code=3)
            history.append([done, mean_loss, mean_mi])
            bar.set_postfix(epoch=epoch, loss=f"{mean_loss:.3f}", mi=f"{mean_mi:.3f}",
                            refresh=False)
        if args.eval_every and done % args.eval_every == 0 and done < args.steps:
            m = evaluate()
            curve.append({"step": done, "mi_heldout": m["mi_heldout"],
                          "knn_acc": m["downstream"]["knn_acc"],
                          "henze_zirkler_p": m["normality"]["henze_zirkler_p"]})
        if done % args.ckpt_every == 0 or done == args.steps:
            save_checkpoint(out, models, opt, done, history, curve)


def summary(metrics: dict[str, Any]) -> str:
    """The end-of-run report: capacity, MI, gap, normality, downstream, time."""
    n, d = metrics["normality"], metrics["downstream"]
    return "\n".join([
        f"capacity C = {metrics['capacity']:.3f} nats   (class information log 10 = {LOG10:.3f})",
        f"MI estimate (held-out) = {metrics['mi_heldout']:.3f} +- {metrics['mi_heldout_se']:.3f}"
        f"   DM gap C - I = {metrics['dm_gap']:.3f}",
        f"normality p (subsample {n['subsample']}): D'Agostino {n['dagostino_p']:.3f}   "
        f"Shapiro-Wilk {n['shapiro_p']:.3f}   Henze-Zirkler {n['henze_zirkler_p']:.3f}",
        *([f"uniformity: Kolmogorov-Smirnov mean p {metrics['uniformity']['ks_p_mean']:.3f}   "
           f"max D {metrics['uniformity']['ks_stat_max']:.3f}"] if "uniformity" in metrics else []),
        f"accuracy: k-NN {d['knn_acc']:.4f}   GaussianNB {d['gnb_acc']:.4f}   "
        f"MLP {d['mlp_acc']:.4f}   silhouette {d['silhouette']:.3f}",
        f"wall time {metrics['wall_time_s']:.0f} s ({metrics['steps']} steps)"])


def run_data(args: argparse.Namespace, device: torch.device
             ) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """(x_train, y_train, x_test, y_test) of a run on its device, and the record of the data.

    Images are channels-last; missing data ends the program with one line (exit code 2).
    """
    try:
        x_tr, y_tr, x_te, y_te, info = load_data(args.dataset, args.data_dir,
                                                 download=not args.no_download)
    except DataError as err:
        fail(str(err))
    if "note" in info:
        print(info["note"])
    return (x_tr.to(device).contiguous(memory_format=torch.channels_last), y_tr.to(device),
            x_te.to(device).contiguous(memory_format=torch.channels_last), y_te.to(device)), info


def run_record(args: argparse.Namespace, device: torch.device, data_info: dict[str, Any],
               started: float) -> dict[str, Any]:
    """The settings and circumstances metrics.json stores beside the numbers."""
    return {"dim": args.dim, "critic": args.critic, "loss": args.loss, "steps": args.steps,
            "batch_size": args.batch_size, "seed": args.seed, "data": data_info,
            "device": str(device), "wall_time_s": time.time() - started}


def run_infomax(args: argparse.Namespace,
                build_models: Callable[[argparse.Namespace, torch.device], nn.ModuleDict],
                evaluate: Callable[[nn.ModuleDict, tuple], dict],
                figures: Callable[[dict, np.ndarray, np.ndarray], dict[str, Any]],
                desc: str) -> dict | None:
    """One run, start to end: --bench, data, models, --resume, training, evaluation, saving.

    build_models(args, device) makes the ModuleDict (encoder, head, critic); evaluate(models,
    data) returns the metrics plus "embeddings": (z_train, z_test); figures(metrics, z_test,
    y_test) names the figures to save. Returns the metrics (None for --bench).
    """
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    if args.bench:
        bench(args, build_models, device)
        return None
    started = time.time()
    data, data_info = run_data(args, device)
    if args.batch_size > len(data[0]):
        fail(f"--batch-size {args.batch_size} exceeds the {len(data[0])} training images")
    if args.epochs is not None:
        args.steps = args.epochs * (len(data[0]) // args.batch_size)

    out = Path(args.out)
    if args.resume and (out / "metrics.json").is_file():
        metrics = read_json(out / "metrics.json")
        print(f"{out} is finished:\n" + summary(metrics))
        return metrics
    out.mkdir(parents=True, exist_ok=True)
    write_json({k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS}, out / "args.json")

    models = build_models(args, device)
    opt = torch.optim.Adam(models.parameters(), lr=args.lr)
    start, history, curve = 0, [], []
    if args.resume and (out / "checkpoint.pt").is_file():
        start, history, curve = load_checkpoint(out, models, opt, device)
        print(f"resuming {out} at step {start}")
    if args.paper:
        print("paper settings (Table 2, Appendix C): "
              + ", ".join(f"{k}={getattr(args, k)}" for k in PAPER)
              + f" -> {args.steps} steps; timing 3 steps ...", flush=True)
        sec = measure_step(build_models, args, device, 2, warmup=1)
        print(f"{sec:.2f} s/step on {device.type}: the run takes about "
              f"{sec * (args.steps - start) / 3600:.1f} h", flush=True)

    train_infomax(models, opt, data[0], args, out, start, history, curve,
                  lambda: evaluate(models, data), desc)
    metrics = evaluate(models, data)
    z_tr, z_te = metrics.pop("embeddings")
    y_tr_np, y_te_np = data[1].cpu().numpy(), data[3].cpu().numpy()
    with atomic_path(out / "embeddings.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, z_train=z_tr, y_train=y_tr_np, z_test=z_te, y_test=y_te_np)
    atomic_save({"models": models.state_dict(), "args": vars(args)}, out / "model.pt")
    metrics.update(run_record(args, device, data_info, started), train_history=history,
                   curve=curve)
    for name, fig in figures(metrics, z_te, y_te_np).items():
        save_figure(fig, out / name)
    write_json(metrics, out / "metrics.json")
    print(summary(metrics) + f"\nsaved to {out}")
    return metrics


def _sweep_job(job: tuple) -> tuple[str, int]:
    """Run one run of a sweep; returns its label and exit code (0: finished)."""
    run, key, build_models, evaluate, figures = job
    label = f"{key}={getattr(run, key):g} seed={run.seed}"
    try:
        run_infomax(run, build_models, partial(evaluate, args=run), figures, label)
    except SystemExit as stop:
        return label, stop.code if isinstance(stop.code, int) else 1
    return label, 0


def run_all(args: argparse.Namespace, key: str,
            build_models: Callable[[argparse.Namespace, torch.device], nn.ModuleDict],
            evaluate: Callable[..., dict],
            figures: Callable[[dict, np.ndarray, np.ndarray], dict[str, Any]]) -> None:
    """The single run of `args`, or every (value, seed) of its sweep (--<key>s, --seeds).

    evaluate(models, data, args) computes a run's metrics. With --jobs N > 1 the sweep's runs go
    to N worker processes with CPU threads / N threads each (measured on 2 cores: two 1-thread
    processes finish two runs 1.2x sooner than one 2-thread process, and a torch.func batch of
    models is slower still); a failed run is reported at the end and sets the exit code, the
    others complete. A run's numbers depend on its thread count at the level of float rounding.
    """
    if not is_sweep(args, key):
        run_infomax(args, build_models, partial(evaluate, args=args), figures,
                    f"{key}={getattr(args, key):g} seed={args.seed}")
        return
    runs = sweep_runs(args, key, getattr(args, f"{key}s") or [getattr(args, key)], f"{key}s")
    jobs = [(run, key, build_models, evaluate, figures) for run in runs]
    workers = args.jobs or (2 if pick_device(args.device).type == "cpu"
                            and torch.get_num_threads() >= 2 else 1)
    if workers == 1 or len(jobs) == 1:
        codes = [_sweep_job(job)[1] for job in jobs]
    else:
        for run in runs:
            run.quiet = True
        threads = max(1, torch.get_num_threads() // workers)
        context = multiprocessing.get_context("spawn")
        codes = []
        with context.Pool(min(workers, len(jobs)), initializer=torch.set_num_threads,
                          initargs=(threads,), maxtasksperchild=1) as pool:
            for done, (label, code) in enumerate(pool.imap_unordered(_sweep_job, jobs), 1):
                status = f"failed (exit code {code})" if code else "finished"
                print(f"[{done}/{len(jobs)}] {label} {status}", flush=True)
                codes.append(code)
    failed = [code for code in codes if code]
    if failed:
        fail(f"{len(failed)} of {len(codes)} runs failed; repeat the command to resume them",
             code=max(failed))


# --------------------------------------------------------------------------------------------
# Self-supervised losses of Table 1 (cifar_ssl.py): SimCLR and VICReg on two views' projections
# --------------------------------------------------------------------------------------------

def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent, the SimCLR loss (Chen et al. 2020, eq. 1), averaged over all 2N anchors.

    z1[k] and z2[k] (N x d) are projections of two views of image k. With u = z / ||z|| over the
    2N rows, l(i, j) = -log exp(u_i.u_j / t) / sum_{m != i} exp(u_i.u_m / t), and the loss is the
    mean of l(k, k + N) and l(k + N, k) over k. It is InfoNCE (Section 4) with 2N - 1 candidates
    per anchor. Temperature t = 0.2 in Appendix C.
    """
    u = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = len(z1)
    logits = (u @ u.T / temperature).fill_diagonal_(-math.inf)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(u.device)
    return F.cross_entropy(logits, positives)


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_weight: float = 25.0,
                var_weight: float = 25.0, cov_weight: float = 1.0,
                eps: float = 1e-4) -> torch.Tensor:
    """VICReg (Bardes et al. 2022, eq. 6): sim s(Z, Z') + var [v(Z) + v(Z')] + cov [c(Z) + c(Z')].

    s: mean squared difference over all N x d entries (the authors' code, for which the weights
    25 / 25 / 1 of Appendix C were tuned); v(Z) = mean_j max(0, 1 - sqrt(Var z_j + eps)) (eq. 1,
    gamma = 1); c(Z) = sum of squared off-diagonal entries of the covariance (divisor N - 1) / d
    (eq. 3).
    """
    z1, z2 = z1.float(), z2.float()

    def variance(z: torch.Tensor) -> torch.Tensor:
        return F.relu(1.0 - torch.sqrt(z.var(dim=0) + eps)).mean()

    def covariance(z: torch.Tensor) -> torch.Tensor:
        n, d = z.shape
        centred = z - z.mean(dim=0)
        cov = centred.T @ centred / (n - 1)
        return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / d

    return (sim_weight * F.mse_loss(z1, z2)
            + var_weight * (variance(z1) + variance(z2))
            + cov_weight * (covariance(z1) + covariance(z2)))

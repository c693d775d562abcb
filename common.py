"""Shared pieces of the reproduction of Butakov et al., "Efficient Distribution Matching of
Representations via Noise-Injected Deep InfoMax" (the paper). Docstrings cite its equations and
theorems, Choi & Lee (UAI 2022: ReDV, ReNWJ) and Tschannen et al. (ICLR 2020: the critics)."""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import pickle
import platform
import shlex
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from functools import lru_cache, partial
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

LOG10 = math.log(10.0)
"""Information of a balanced 10-class label in nats: a channel below it cannot carry the digit."""

REPO = Path(__file__).resolve().parent
SHIPPED_MNIST = REPO / "data" / "mnist"
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


# --- Data ------------------------------------------------------------------------------------

class DataError(RuntimeError):
    """A missing, damaged or mismatched file; the scripts print it as one line, exit code 2."""


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file (optionally gzipped) into a uint8 tensor; DataError if damaged."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is damaged ({err}); download it again") from None
    if len(data) < 4:
        raise DataError(f"{path} is damaged: {len(data)} bytes, shorter than an IDX header")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 4 or len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad header)")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise DataError(f"{path} is truncated: expected {math.prod(shape)} values, "
                        f"found {array.size}")
    return torch.from_numpy(array.reshape(shape).copy())


def _find_idx(root: Path, name: str) -> Path | None:
    """NAME or NAME.gz in ROOT or in torchvision's ROOT/<Dataset>/raw layout, else None."""
    for folder in (root, root / "MNIST" / "raw", root / "FashionMNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_mnist(root: str | Path, train: bool, download: bool = False,
               dataset: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) in [0, 1] and int64 labels of MNIST or Fashion-MNIST: IDX files in
    `root`, else (with `download`) torchvision; DataError when neither works."""
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
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
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
    """(x_train, y_train, x_test, y_test, record), images center-cropped to crop x crop (Table 2:
    24; None: 28x28). dataset: "mnist", "fashion-mnist" or "mnist-test-split" (seeded 8k/2k split
    of the 10k MNIST test split). Without `data_dir`, "mnist" falls back to the split shipped in
    data/mnist/ (noted in the record); a given `data_dir` without the files raises DataError."""
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
    if min(len(x_tr), len(x_te)) < 20 or len(y_tr.unique()) < 2 or len(y_te.unique()) < 2:
        raise DataError(f"{info['source']}: {len(x_tr)} training and {len(x_te)} test images with "
                        f"{len(y_tr.unique())} labels; the evaluation needs at least 20 images "
                        "and 2 labels in each split")
    if crop is not None:
        x_tr, x_te = center_crop(x_tr, crop), center_crop(x_te, crop)
    return x_tr, y_tr, x_te, y_te, info


OOD_SETS = ("fashion-mnist", "inverted", "noise")
"""Out-of-distribution test sets for MNIST encoders: another data set, and two synthetic shifts."""


def shifted_images(name: str, x_test: torch.Tensor, data_dir: str | None = None,
                   download: bool = True, seed: int = 0) -> torch.Tensor:
    """As many out-of-distribution images as x_test: "fashion-mnist" (a seeded sample of its test
    split; DataError if missing), "inverted" (1 - x_test) or "noise" (i.i.d. U[0, 1] pixels)."""
    gen = torch.Generator().manual_seed(seed)
    if name == "inverted":
        return 1.0 - x_test
    if name == "noise":
        return torch.rand(x_test.shape, generator=gen).to(x_test.device)
    if name != "fashion-mnist":
        raise ValueError(f"unknown out-of-distribution set {name!r}; expected one of {OOD_SETS}")
    x = load_data("fashion-mnist", data_dir, download)[2]
    pick = torch.randperm(len(x), generator=gen)[:len(x_test)]
    return x[pick].to(x_test.device).contiguous(memory_format=torch.channels_last)


# --- Encoder and noise heads -----------------------------------------------------------------

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


class GaussianHead(nn.Module):
    """BatchNorm1d(affine=False): E f(X) = 0, Var f(X)_i = 1 (Theorem 3.4; C of eq. 5). No noise:
    each script adds Z itself, in one line. `gather` (DDP): a differentiable function returning
    every process's rows, so that training normalizes with the global batch's statistics."""

    def __init__(self, dim: int, gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.gather = gather
        self.norm = nn.BatchNorm1d(dim, affine=False)

    def global_norm(self, f: torch.Tensor) -> torch.Tensor:
        """BatchNorm1d's training output and running-statistics update over every process's rows."""
        every = self.gather(f)
        mean, var = every.mean(0), every.var(0, unbiased=False)
        with torch.no_grad():
            self.norm.running_mean.lerp_(mean, self.norm.momentum)
            self.norm.running_var.lerp_(every.var(0), self.norm.momentum)
            self.norm.num_batches_tracked += 1
        return (f - mean) / torch.sqrt(var + self.norm.eps)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.global_norm(f) if self.training and self.gather else self.norm(f)


class UniformHead(nn.Module):
    """Phi(BatchNorm1d(affine=False)(f)): f(X) squashed into [0, 1]^d, the support Theorem 3.5
    assumes for f(X) + Z, Z ~ U[-eps, eps]^d (eq. 6). The script adds Z itself."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.special.ndtr(self.norm(f))


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, forward: Callable[[torch.Tensor], Any],
                       x: torch.Tensor, batch_size: int) -> None:
    """Replace every BatchNorm's running statistics by their average over batches of `x`
    (the clean training images, after training)."""
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


# --- Critics: (a, b) -> S, S[i, j] = T(a_i, b_j), a = f(X') rows, b = f(X) + Z columns -----

def _hidden(p: torch.Tensor, q: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
            h1: torch.Tensor, h2: torch.Tensor) -> None:
    """Both hidden layers of the concat critic for rows p against all columns q, into h1, h2."""
    torch.add(p[:, None, :], q[None, :, :], out=h1.view(len(p), len(q), -1))
    F.leaky_relu_(h1, 0.01)
    torch.addmm(b2, h1, w2.T, out=h2)
    F.leaky_relu_(h2, 0.01)


class _PairwiseMLP(torch.autograd.Function):
    """s[i, j] = w3 . lrelu(W2 lrelu(p[i] + q[j]) + b2) + b3, p = W_a a + b1, q = W_b b (first
    layer split by input), in chunks of `rows` rows; backward recomputes each chunk."""

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
    `reference` runs it on all concatenated pairs; `fast` uses _PairwiseMLP in the autocast dtype.
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
    """Theorem 4.1 critic ||y||^2 / (2(1 + sigma^2)) - ||y - x||^2 / (2 sigma^2), x = f(X'),
    y = f(X) + Z, plus d/2 log(1 + 1/sigma^2): the exact PMI (Appendix A). Always float32."""

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


def make_critic(name: str, dim: int, sigma: float = 0.0, fast: bool = True) -> nn.Module:
    """The critic `name` for d-dimensional embeddings (sigma: Theorem 4.1's; fast: concat)."""
    if name == "gaussian":
        return GaussianCritic(sigma)
    if name == "concat":
        return ConcatCritic(dim, fast=fast)
    return {"separable": SeparableCritic, "bilinear": BilinearCritic}[name](dim)


# --- MI bounds on a score matrix (positives on the diagonal); each returns (loss, MI in nats) --
# Scores estimate the PMI; the NWJ family (optimum PMI + 1, Remark 2.5) uses T = scores + 1.

def _offdiag_logmeanexp(scores: torch.Tensor) -> torch.Tensor:
    """log of the mean of exp(scores) over the off-diagonal (product-of-marginals) pairs."""
    n = scores.shape[0]
    masked = scores.masked_fill(torch.eye(n, dtype=torch.bool, device=scores.device), -math.inf)
    return masked.logsumexp(dim=(0, 1)) - math.log(n * (n - 1))


def infonce(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE (Section 4, eq. 2): mean_i [S_ii - log mean_j exp S_ij] <= log B."""
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
    """Jensen-Shannon loss of Deep InfoMax, E_P softplus(-T) + E_Q softplus(T); MI is NWJ's
    (Choi & Lee, Table 1)."""
    n = scores.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=scores.device)
    loss = F.softplus(-scores.diagonal()).mean() + F.softplus(scores[off]).mean()
    return loss, nwj(scores)[1]


def redv(scores: torch.Tensor, weight: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Regularized DV (Choi & Lee, eq. 14): DV - weight * (log E_Q e^T - C*)^2 with C* = 0."""
    lme = _offdiag_logmeanexp(scores)
    mi = scores.diagonal().mean() - lme
    return -mi + weight * lme ** 2, mi.detach()


def renwj(scores: torch.Tensor, weight: float = 0.1,
          clip: float | None = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Regularized NWJ (Choi & Lee, eq. 15): NWJ - weight * (log E_Q e^(T-1))^2, T = scores + 1,
    with T clipped to [-clip, clip] in the NWJ terms only (their eq. 9; None: no clipping)."""
    lme = _offdiag_logmeanexp(scores)
    clipped = scores if clip is None else (scores + 1).clamp(-clip, clip) - 1
    mi = clipped.diagonal().mean() + 1 - _offdiag_logmeanexp(clipped).exp()
    return -mi + weight * lme ** 2, mi.detach()


LOSSES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "infonce": infonce, "nwj": nwj, "dv": dv, "js": js, "redv": redv, "renwj": renwj}


def mi_loss(name: str, reg_weight: float = 0.1,
            clip: float | None = 10.0) -> Callable[[torch.Tensor], tuple]:
    """The loss `name` with weight for redv / renwj and clip for renwj (Choi & Lee Table 1)."""
    loss = LOSSES[name]
    if name == "renwj":
        return partial(loss, weight=reg_weight, clip=clip)
    return partial(loss, weight=reg_weight) if name == "redv" else loss


def bound_estimates(scores: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{name: (value, se)} of InfoNCE, NWJ and DV (eqs. 2-3) on one score matrix, in float64:
    means of per-row terms (DV linearized) with sd / sqrt(B), approximate as rows share columns.

    InfoNCE cannot exceed log B; NWJ and DV can, but their E_Q e^T term has a variance of about
    e^(2I) near the PMI critic ((1 + 1/sigma^2)^d = e^(2C) on the ideal channel of eq. 5).
    """
    s = scores.detach().double()
    n = s.shape[0]
    off = s.masked_fill(torch.eye(n, dtype=torch.bool, device=s.device), -math.inf)
    row_lme = off.logsumexp(dim=1) - math.log(n - 1)           # log mean_{j != i} e^S_ij
    lme = row_lme.logsumexp(dim=0) - math.log(n)               # log mean_{i != j} e^S_ij
    diag = s.diagonal()
    terms = {"infonce": diag - s.logsumexp(dim=1) + math.log(n),
             "nwj": diag + 1 - row_lme.exp(),
             "dv": diag - (row_lme - lme).exp() + 1 - lme}
    return {name: (float(t.mean()), float(t.std() / math.sqrt(n))) for name, t in terms.items()}


def bound_estimates_table(batches: Sequence[torch.Tensor], whole: torch.Tensor) -> dict:
    """{estimator: {"batch": [mean, se over batches], "whole": [value, row se]}} of
    bound_estimates over disjoint batches and over one whole batch."""
    rows = [bound_estimates(s) for s in batches]
    table = {}
    for name, whole_value in bound_estimates(whole).items():
        values = [r[name][0] for r in rows]
        se = np.std(values, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan
        table[name] = {"batch": [float(np.mean(values)), float(se)], "whole": list(whole_value)}
    return table


# --- Capacity bounds -------------------------------------------------------------------------

def gaussian_capacity(d: int, sigma: float) -> float:
    """C = d/2 log(1 + 1/sigma^2), eq. (5): the maximum of I(f(X'); f(X) + Z); inf at sigma = 0."""
    return math.inf if sigma == 0 else 0.5 * d * math.log1p(1.0 / sigma ** 2)


def uniform_capacity(d: int, eps: float) -> float:
    """C = d log(1 + 1/(2 eps)), eq. (6): the bound for Z ~ U[-eps, eps]^d, f(X) in [0, 1]^d."""
    return d * math.log1p(1.0 / (2.0 * eps))


# --- Normality tests and downstream metrics (Section 5) --------------------------------------

def _as_2d(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z[:, None] if z.ndim == 1 else z
    if z.ndim != 2:
        raise ValueError(f"expected an (n, d) array, got shape {z.shape}")
    return z


def _subsample_indices(rng: np.random.Generator, n: int, subsample: int) -> np.ndarray:
    return np.arange(n) if subsample >= n else rng.choice(n, size=subsample, replace=False)


def projected_pvalues(z, test: str = "dagostino", n_proj: int = 10, n_boot: int = 20,
                      subsample: int = 128, seed: int = 0) -> float:
    """Mean p-value of a univariate normality test on subsamples of random 1-D projections
    (Section 5); test: "dagostino" (scipy.stats.normaltest) or "shapiro"."""
    tests = {"dagostino": scipy.stats.normaltest, "shapiro": scipy.stats.shapiro}
    if test not in tests:
        raise ValueError(f"unknown test {test!r}; expected one of {sorted(tests)}")
    z = _as_2d(z)
    n, d = z.shape
    if n < 8:  # normaltest's kurtosis test needs 8 points
        raise ValueError(f"need at least 8 points, got {n}")
    rng = np.random.default_rng(seed)
    pvalues = []
    for _ in range(n_proj):
        u = rng.standard_normal(d)
        projection = z @ (u / np.linalg.norm(u))
        for _ in range(n_boot):
            idx = _subsample_indices(rng, n, subsample)
            pvalues.append(float(tests[test](projection[idx]).pvalue))
    return float(np.mean(pvalues))


def henze_zirkler(z) -> tuple[float, float]:
    """Henze-Zirkler (1990) test: statistic HZ and its p-value (log-normal null approximation)."""
    z = _as_2d(z)
    n, d = z.shape
    centred = z - z.mean(axis=0)
    cov = centred.T @ centred / n  # maximum-likelihood covariance, as in the original test
    try:
        precision = np.linalg.inv(cov)
    except np.linalg.LinAlgError:
        precision = np.linalg.pinv(cov)
    whitened = centred @ precision
    d_i = np.einsum("ij,ij->i", whitened, centred)
    d_ij = d_i[:, None] + d_i[None, :] - 2.0 * (whitened @ centred.T)
    beta2 = 0.5 * ((2 * d + 1) * n / 4.0) ** (2.0 / (d + 4))
    beta4 = beta2 ** 2
    beta8 = beta4 ** 2
    statistic = (np.exp(-0.5 * beta2 * d_ij).sum() / n
                 - 2.0 * (1.0 + beta2) ** (-d / 2)
                 * np.exp(-beta2 / (2.0 * (1.0 + beta2)) * d_i).sum()
                 + n * (1.0 + 2.0 * beta2) ** (-d / 2))
    a = 1.0 + 2.0 * beta2
    w = (1.0 + beta2) * (1.0 + 3.0 * beta2)
    mean = 1.0 - a ** (-d / 2) * (1.0 + d * beta2 / a + d * (d + 2) * beta4 / (2.0 * a ** 2))
    var = (2.0 * (1.0 + 4.0 * beta2) ** (-d / 2)
           + 2.0 * a ** (-d) * (1.0 + 2.0 * d * beta4 / a ** 2
                                + 3.0 * d * (d + 2) * beta8 / (4.0 * a ** 4))
           - 4.0 * w ** (-d / 2) * (1.0 + 3.0 * d * beta4 / (2.0 * w)
                                    + d * (d + 2) * beta8 / (2.0 * w ** 2)))
    log_mean = np.log(mean ** 2 / np.sqrt(var + mean ** 2))
    log_sd = np.sqrt(np.log((var + mean ** 2) / mean ** 2))
    p_value = scipy.stats.lognorm.sf(statistic, s=log_sd, scale=np.exp(log_mean))
    return float(statistic), float(p_value)


def henze_zirkler_pvalue(z, n_boot: int = 20, subsample: int = 128, seed: int = 0) -> float:
    """Henze-Zirkler p-value averaged over n_boot random subsamples (Section 5)."""
    z = _as_2d(z)
    rng = np.random.default_rng(seed)
    return float(np.mean([henze_zirkler(z[_subsample_indices(rng, len(z), subsample)])[1]
                          for _ in range(n_boot)]))


def to_gaussian(u, eps: float = 1e-6) -> np.ndarray:
    """Phi^-1 of [0, 1]^d embeddings clipped to [eps, 1 - eps]: uniformity becomes normality
    (Section 3.3)."""
    u = np.asarray(u, dtype=np.float64)
    return scipy.stats.norm.ppf(np.clip(u, eps, 1.0 - eps))


def uniformity_report(u: np.ndarray) -> dict:
    """Kolmogorov-Smirnov test of each coordinate against U[0, 1]: mean p-value, largest D."""
    tests = [scipy.stats.kstest(u[:, i], "uniform") for i in range(u.shape[1])]
    return {"ks_p_mean": float(np.mean([t.pvalue for t in tests])),
            "ks_stat_max": float(max(t.statistic for t in tests)),
            "ks_p": [float(t.pvalue) for t in tests]}


NULL_DRAWS = 39
"""Reference draws behind every null level: with 39, the Monte Carlo test at 5% is exact."""
LEVEL = 0.05
"""Level of the calibrated normality decision."""
BAND_SHARE = 0.95
"""Share of N(0, I) samples (or of means of k samples) a null band holds: its central 95 %."""
COLLAPSED = 0.05
"""A correlation eigenvalue below this marks a (nearly) collapsed direction of the embedding."""
_NULL_CACHE: dict[tuple[int, ...], dict] = {}


def _directions(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    """k directions uniform on the unit sphere of R^d, as the columns of a (d, k) array."""
    u = rng.standard_normal((d, k))
    return u / np.linalg.norm(u, axis=0)


def sliced_w2(z, n_dirs: int = 200, seed: int = 0) -> float:
    """Sliced W2 between the coordinate-standardized sample and N(0, I): root mean over n_dirs
    random directions of W2^2 between sorted projections and N(0, 1) quantiles at (i - 0.5) / n."""
    z = _as_2d(z)
    if not np.isfinite(z).all():
        raise ValueError("the sample holds NaN or infinite values")
    scale = np.abs(z).max()
    z = z / scale if 0 < scale < np.inf else z  # keeps 1e-300 or 1e200 data from under/overflow
    z = z - z.mean(axis=0)
    sd = z.std(axis=0)
    z = z / np.where(sd > 0, sd, 1.0)
    n = len(z)
    quantiles = scipy.stats.norm.ppf((np.arange(1, n + 1) - 0.5) / n)
    projections = _directions(np.random.default_rng(seed), z.shape[1], n_dirs).T @ z.T
    projections = np.sort(projections.astype(np.float32), axis=1)  # float32 sorts faster
    return float(np.sqrt(np.mean((projections - quantiles) ** 2)))


def correlation_spectrum(z, keep: int = 5) -> dict:
    """Eigenvalues of the sample correlation matrix of z (they sum to d): the `keep` smallest,
    how many fall below COLLAPSED (directions the embedding has collapsed, which the constraint
    Var f_i = 1 of Theorem 3.4 does not prevent), and the effective rank exp(H(lambda / d))."""
    z = _as_2d(z)
    z = z - z.mean(axis=0)
    sd = z.std(axis=0)
    z = z / np.where(sd > 0, sd, 1.0)  # a constant column: a zero eigenvalue, not NaN
    eig = np.clip(np.linalg.eigvalsh(z.T @ z / len(z)), 0.0, None)
    p = eig[eig > 0] / eig.sum()
    return {"smallest_eigenvalues": [float(v) for v in eig[:keep]],
            "collapsed": int(np.sum(eig < COLLAPSED)),
            "effective_rank": float(np.exp(-np.sum(p * np.log(p))))}


def null_band(values, k: int = 1, share: float = BAND_SHARE, resamples: int = 20000) -> list:
    """[low, high]: the central `share` of the mean of k null draws, from `values` (draws of a
    statistic on N(0, I) samples, normality_null); for k > 1 from means of k values resampled
    with replacement (seeded), about sqrt(k) narrower than the band of one draw."""
    values = np.asarray(values, dtype=np.float64)
    means = values if k == 1 else np.random.default_rng(k).choice(
        values, size=(resamples, k)).mean(axis=1)
    return [float(q) for q in np.quantile(means, [(1 - share) / 2, (1 + share) / 2])]


def normality_null(n: int, d: int, subsample: int = 128, n_proj: int = 10, n_boot: int = 20,
                   seed: int = 0, draws: int = NULL_DRAWS) -> dict:
    """normality_report's statistics on `draws` N(0, I_d) samples of size n (own generator,
    cached): per statistic its mean, sd, null_band of one sample and the draws themselves
    ("values", from which null_band gives the band of a mean over runs); None for
    Henze-Zirkler when d >= min(subsample, n)."""
    key = (n, d, subsample, n_proj, n_boot, seed, draws)
    if key not in _NULL_CACHE:
        rng = np.random.default_rng((seed, 16))
        whitenable = d < min(subsample, n)
        stats: dict[str, list] = {"dagostino_p": [], "shapiro_p": [], "henze_zirkler_p": [],
                                  "sliced_w2": [], "min_eigenvalue": []}
        for _ in range(draws):
            z = rng.standard_normal((n, d))
            projections = z @ _directions(rng, d, n_proj)
            columns = np.repeat(np.arange(n_proj), n_boot)[:, None]
            rows = np.stack([_subsample_indices(rng, n, subsample) for _ in columns])
            samples = projections[rows, columns]  # (n_proj * n_boot, subsample)
            stats["dagostino_p"].append(scipy.stats.normaltest(samples, axis=1).pvalue.mean())
            stats["shapiro_p"].append(scipy.stats.shapiro(samples, axis=1).pvalue.mean())
            if whitenable:
                stats["henze_zirkler_p"].append(henze_zirkler_pvalue(
                    z, n_boot=n_boot, subsample=subsample, seed=int(rng.integers(2 ** 32))))
            stats["sliced_w2"].append(sliced_w2(z, seed=seed))
            stats["min_eigenvalue"].append(correlation_spectrum(z)["smallest_eigenvalues"][0])
        _NULL_CACHE[key] = {name: np.array(values) for name, values in stats.items()}
    return {"draws": draws, "share": BAND_SHARE,
            **{name: {"mean": float(v.mean()), "sd": float(v.std(ddof=1)),
                      "band": null_band(v), "values": [float(x) for x in v]} if len(v) else None
               for name, v in _NULL_CACHE[key].items()}}


def normality_decision(hz_p: float | None, w2: float, w2_draws: np.ndarray,
                       level: float = LEVEL) -> dict:
    """Normality test at `level`: Henze-Zirkler on the whole sample when hz_p is given, else a
    Monte Carlo test on sliced W2, p = (1 + #{null draws >= w2}) / (draws + 1)."""
    if hz_p is not None:
        test, p = "henze-zirkler", float(hz_p)
    else:
        test = "sliced-w2-monte-carlo"
        p = float((1 + np.sum(w2_draws >= w2)) / (len(w2_draws) + 1))
    return {"test": test, "level": level, "p": p, "reject": bool(p <= level)}


def normality_report(z, seed: int = 0, subsample: int = 128, n_proj: int = 10,
                     n_boot: int = 20, points: int | None = None) -> dict:
    """Section 5 normality tests: averaged p-values of D'Agostino-Pearson, Shapiro-Wilk and
    Henze-Zirkler (None when d >= subsample), the HZ statistic, the sliced W2 distance, the
    correlation_spectrum, "null" (normality_null) and "decision" (normality_decision); with
    `points`, on that many rows drawn at random by `seed` (recorded as "points")."""
    z = _as_2d(z)
    if points is not None:
        z = z[np.random.default_rng(seed).permutation(len(z))[:points]]
    kwargs = dict(n_proj=n_proj, n_boot=n_boot, subsample=subsample, seed=seed)
    whitenable = z.shape[1] < min(subsample, len(z))
    hz_stat, hz_p = henze_zirkler(z) if whitenable else (None, None)
    null = normality_null(len(z), z.shape[1], subsample, n_proj, n_boot, seed)
    w2 = sliced_w2(z, seed=seed)
    return {
        "dagostino_p": projected_pvalues(z, test="dagostino", **kwargs),
        "shapiro_p": projected_pvalues(z, test="shapiro", **kwargs),
        "henze_zirkler_p": henze_zirkler_pvalue(
            z, n_boot=n_boot, subsample=subsample, seed=seed) if whitenable else None,
        "henze_zirkler_stat": hz_stat,
        "subsample": int(min(subsample, len(z))), "n_proj": int(n_proj), "n_boot": int(n_boot),
        "sliced_w2": w2, "correlation": correlation_spectrum(z), "null": null,
        "decision": normality_decision(hz_p, w2, np.array(null["sliced_w2"]["values"])),
        **({} if points is None else {"points": len(z)})}


def normality_lines(report: dict) -> list[str]:
    """normality_report as text lines, each statistic beside its null band (the central 95 % of
    one N(0, I) sample's value); DataError for a report of an older version."""
    names = {"dagostino_p": "D'Agostino-Pearson averaged p", "shapiro_p": "Shapiro-Wilk "
             "averaged p", "henze_zirkler_p": "Henze-Zirkler averaged p",
             "sliced_w2": "sliced W2 to N(0, I)",
             "henze-zirkler": "Henze-Zirkler on the whole sample",
             "sliced-w2-monte-carlo": "Monte Carlo test on sliced W2"}
    if missing := {"null", "correlation", "decision"} - report.keys():
        raise DataError(f"a normality block without {', '.join(sorted(missing))}, written by an "
                        "older version: renew it with python evaluate.py renormalize RUN_DIR")
    null, spectrum, decision = report["null"], report["correlation"], report["decision"]
    lines = [f"normality: p-values averaged over {report['n_proj']} projections x "
             f"{report['n_boot']} subsamples of {report['subsample']} points; null band: the "
             f"central {100 * null['share']:g}% of the same statistic on {null['draws']} N(0, I) "
             "samples of the same n and d"]
    for key in ("dagostino_p", "shapiro_p", "henze_zirkler_p", "sliced_w2"):
        value = report[key]
        lines.append(f"  {names[key]:<30}" + ("n/a (d >= subsample)" if value is None else
                                              "{:.4f}   null band {:.4f} to {:.4f}".format(
                                                  value, *null[key]["band"])))
    lines.append(f"  {'correlation eigenvalues':<30}smallest "
                 + ", ".join(f"{v:.3f}" for v in spectrum["smallest_eigenvalues"])
                 + "   null band of the smallest {:.3f} to {:.3f}".format(
                     *null["min_eigenvalue"]["band"])
                 + f"; {spectrum['collapsed']} below {COLLAPSED:g} (collapsed directions), "
                 f"effective rank {spectrum['effective_rank']:.2f}")
    lines.append(f"  decision at level {decision['level']:g}: {names[decision['test']]}, "
                 f"p = {decision['p']:.3g}: normality "
                 + ("rejected" if decision["reject"] else "not rejected"))
    return lines


def downstream_report(z_tr, y_tr, z_te, y_te, seed: int = 0) -> dict:
    """Test accuracy of Gaussian naive Bayes, 5-NN and a shallow MLP trained on the train
    embeddings, and the silhouette of the test embeddings by label (Section 5)."""
    z_tr, z_te = _as_2d(z_tr), _as_2d(z_te)
    y_tr, y_te = np.asarray(y_tr), np.asarray(y_te)
    classifiers = {"gnb_acc": GaussianNB(), "knn_acc": KNeighborsClassifier(n_neighbors=5),
                   "mlp_acc": MLPClassifier(hidden_layer_sizes=(64,), max_iter=500,
                                            random_state=seed)}
    report = {}
    for name, clf in classifiers.items():
        with warnings.catch_warnings():  # a non-converged MLP is still a valid probe
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(z_tr, y_tr)
        report[name] = float(clf.score(z_te, y_te))
    sample_size = 5000 if len(z_te) > 5000 else None  # silhouette is O(n^2)
    report["silhouette"] = float(silhouette_score(z_te, y_te, sample_size=sample_size,
                                                  random_state=seed))
    return report


# --- Run utilities ---------------------------------------------------------------------------

def _isa_cap() -> str | None:
    """The instruction-set cap a user set for torch or oneDNN below bfloat16, if any."""
    capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
    if capability not in ("AVX512", "AVX512_BF16", "AMX"):
        return f"torch runs {capability} kernels"
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "ALL").upper()
        if value != "ALL" and not any(s in value for s in ("BF16", "AMX", "FP16", "AVX10")):
            return f"{name}={value} keeps oneDNN below its bfloat16 instructions"
    return None


@lru_cache(maxsize=None)
def cpu_bf16() -> tuple[bool, str]:
    """(native, why): does this CPU run bfloat16 matrix work natively?

    Native means AVX-512 BF16 or AMX (x86), read from the CPU's own capability flags through
    torch.cpu (CPUID): exact, free, and unaffected by a busy machine, where a start-up timing of a
    bf16 and a float32 matmul costs time and can flip under load. Elsewhere bf16 autocast is
    emulated: 8-21x slower than float32 for these scripts on an AVX2 CPU (results/README.md,
    Precision).
    torch.ops.mkldnn._is_mkldnn_bf16_supported() is not used: it is True on every AVX-512 CPU,
    bf16 instructions or not. Caps that torch and oneDNN honour (ATEN_CPU_CAPABILITY,
    ONEDNN_MAX_CPU_ISA) count: under them oneDNN emulates bf16 as well. Non-x86 CPUs get float32.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False, f"bfloat16 is taken as native only on x86 CPUs ({platform.machine()})"
    units = [name for name, has in (("AMX", torch.cpu._is_amx_tile_supported()),
                                    ("AVX-512 BF16", torch.cpu._is_avx512_bf16_supported())) if has]
    if not units:
        return False, "this CPU has no native bfloat16 (no AVX-512 BF16, no AMX)"
    cap = _isa_cap()
    if cap:
        return False, f"this CPU has {units[0]}, but {cap}"
    return True, f"this CPU has native bfloat16 ({units[0]})"


def precision(device: torch.device, amp: bool | None = None) -> tuple[torch.dtype, str]:
    """(compute dtype, why) of a run: `amp` True or False (--amp / --no-amp) forces autocast or
    float32; None (the default, "auto") takes bf16 autocast on CUDA (float16 with a gradient
    scaler where the GPU lacks bf16) and on a CPU that runs bf16 natively (cpu_bf16), float32
    everywhere else (other CPUs, MPS)."""
    half = (torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported()
            else torch.bfloat16)
    if amp is not None:
        return (half, "--amp") if amp else (torch.float32, "--no-amp")
    if device.type == "cuda":
        return half, ("CUDA" if half == torch.bfloat16
                      else "this GPU has no bfloat16: float16 with a gradient scaler")
    if device.type == "cpu":
        native, why = cpu_bf16()
        return (half if native else torch.float32), why
    return torch.float32, f"autocast on {device.type} only with --amp"


def precision_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16 autocast' or 'float16 autocast'."""
    return "float32" if dtype == torch.float32 else f"{str(dtype)[6:]} autocast"


def autocast(device: torch.device, amp: bool | None = None) -> torch.autocast:
    """Autocast in the run's precision (see precision); float32 turns it off."""
    dtype = precision(device, amp)[0]
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == torch.float32 else dtype,
                          enabled=dtype != torch.float32)


def grad_scaler(device: torch.device, amp: bool | None = None) -> torch.amp.GradScaler:
    """The loss scaler float16 autocast needs (a no-op pass-through in bf16 and float32)."""
    return torch.amp.GradScaler(device.type, enabled=precision(device, amp)[0] == torch.float16)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temporary file name beside `path`; rename it to `path` once the block succeeds."""
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
    """A file written by write_json, "nan" / "inf" / "-inf" as floats; fail() if unreadable."""
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
    """Figure 2: test embeddings coloured by label; d > 2: first two principal axes; d = 1: the
    embedding against the jittered label."""
    plt = pyplot()
    z = np.asarray(z, dtype=np.float64)
    xlabel, ylabel = "$z_1$", "$z_2$"
    if z.shape[1] == 1:
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(z))
        z, ylabel = np.column_stack([z[:, 0], np.asarray(y) + jitter]), "label (jittered)"
    elif z.shape[1] > 2:
        centered = z - z.mean(0)
        z = centered @ np.linalg.svd(centered, full_matrices=False)[2][:2].T
        xlabel, ylabel = "PC 1", "PC 2"
    fig, ax = plt.subplots(figsize=(5.5, 5))
    points = ax.scatter(z[:, 0], z[:, 1], c=y, cmap="tab10", s=3, alpha=0.7, vmin=-0.5, vmax=9.5)
    fig.colorbar(points, ax=ax, ticks=range(10), label="label")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel,
           aspect="auto" if ylabel.startswith("label") else "equal")
    return fig


def time_per_step(step: Callable[[], Any], n: int, device: torch.device, warmup: int = 2) -> float:
    """Seconds per call of `step`, averaged over n calls after `warmup` untimed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - start) / n


# --- Run helpers: flag validators, output folders, sweeps, files -----------------------------

RUNTIME_FLAGS = ("out", "resume", "eval_only", "device", "quiet", "bench", "compile", "jobs")
"""Flags that --resume takes from the command line; every other setting comes from args.json."""


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr and a non-zero exit: bad input is not a stack trace."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def bounded(kind: type, low: float, high: float = math.inf) -> Callable[[str], Any]:
    """argparse type: a finite number of type `kind` (int or float) in [low, high]."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            upper = "" if math.isinf(high) else f" and <= {high:g}"
            raise argparse.ArgumentTypeError(f"must be a finite {kind.__name__} >= {low:g}"
                                             f"{upper}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def open_interval(low: float, high: float) -> Callable[[str], float]:
    """argparse type: a number strictly between low and high (eps of Theorem 3.5: (0, 1/2))."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected float, got {text!r}") from None
        if not low < value < high:
            raise argparse.ArgumentTypeError(f"must lie in ({low:g}, {high:g}), got {text}")
        return value
    parse.__name__ = "float"
    return parse


positive_int = bounded(int, 1)
nonnegative_float = bounded(float, 0.0)
seed_int = bounded(int, 0, 2 ** 32 - 1001)
"""Seeds that numpy, scikit-learn and torch all accept, leaving room for --seeds."""


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def device_flag(text: str) -> str:
    """argparse type for --device: auto, cpu, cuda, cuda:N or mps, and present on this machine."""
    kind, _, index = text.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and not (kind == "cuda"
                                                                      and index.isdigit())):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine; use --device "
                                         "cpu (or auto)")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} "
                                         "CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("MPS is not available on this machine; use --device cpu")
    return text


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def progress_interval() -> float:
    """Seconds between progress-bar updates: live on a terminal, once a minute in a log file."""
    return 0.1 if sys.stderr.isatty() else 60.0


def resolve_out(p: argparse.ArgumentParser, args: argparse.Namespace, stem: str) -> None:
    """--out of a new run: a non-empty or file --out is refused; no --out (and no --bench) gives
    `stem` + a time stamp. A run that continues (--resume, --eval-only) goes to check_resume."""
    if args.out is not None:
        out = Path(args.out)
        blocking = next((q for q in (out, *out.parents) if q.exists() and not q.is_dir()), None)
        if blocking is not None:
            p.error(f"--out {args.out}: {blocking} is a file, not a folder")
        if out.is_dir() and any(out.iterdir()):
            p.error(f"--out {args.out} already holds files; pass --resume to continue that run "
                    "or choose another directory")
    elif not args.bench:
        base = f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}"
        args.out = next(name for name in (base, *(f"{base}-{i}" for i in range(2, 1000)))
                        if not Path(name).exists())


def check_resume(p: argparse.ArgumentParser, args: argparse.Namespace, needs: Sequence[str],
                 model_files: Sequence[str] = ("model.pt",)) -> None:
    """--resume / --eval-only: load the settings of the run in --out. Its args.json must hold
    every key of `needs` (a run of this script), pass the script's own flag checks as if typed
    and agree with every setting given on the command line; --eval-only needs a model file."""
    evaluating = getattr(args, "eval_only", False)
    out, what = Path(args.out or "."), "--eval-only" if evaluating else "--resume"
    if args.out is None or not (out / "args.json").is_file():
        p.error(f"{what} needs --out pointing at a run directory with args.json")
    try:
        saved = json.loads((out / "args.json").read_text())
    except (OSError, ValueError) as err:
        p.error(f"{out / 'args.json'} is not valid JSON ({err})")
    missing = [key for key in needs if not isinstance(saved, dict) or key not in saved]
    if missing:
        p.error(f"{out} is not a run of {p.prog} (its args.json lacks {', '.join(missing)})")
    flags = []  # the command line of the saved settings that differ from the defaults
    for key, value in saved.items():
        flag, default = "--" + key.replace("_", "-"), p.get_default(key)
        if key in vars(args) and key not in RUNTIME_FLAGS and value is not None and not (
                value == default and type(value) is type(default)):
            flags += ([flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else
                      [flag, *map(str, value)] if isinstance(value, list) else [f"{flag}={value}"])
    p.exit_on_error = False  # an invalid setting raises, so that the line can name the file
    try:
        p.parse_known_args(flags)
    except argparse.ArgumentError as err:
        p.error(f"{out / 'args.json'} is damaged: {err}")
    finally:
        p.exit_on_error = True
    for key, value in saved.items():
        given = getattr(args, key, None)
        if key not in RUNTIME_FLAGS and given != p.get_default(key) and given != value:
            p.error(f"--{key.replace('_', '-')} {given} differs from the run's {value}: a "
                    "resumed run keeps its settings (drop the flag or choose another --out)")
    if evaluating and not any((out / name).is_file() for name in model_files):
        p.error(f"--eval-only: {out} holds no {' or '.join(model_files)} (the run has not "
                "finished)")
    vars(args).update({k: v for k, v in saved.items() if k not in RUNTIME_FLAGS})


def sweep_plan(args: argparse.Namespace, key: str, values: Sequence[float],
               parent: str) -> list[str]:
    """The run directories of a sweep, --out/<key><value>_seed<seed>, each given its args.json;
    clashing names or a directory written with other settings stop it before any run starts."""
    args.out = args.out or f"{parent}/sweep_{time.strftime('%Y%m%d-%H%M%S')}"
    if Path(args.out).exists() and not Path(args.out).is_dir():
        fail(f"--out {args.out} is a file, not a folder")
    plans: dict[Path, dict[str, Any]] = {}
    for value in values:
        for seed in range(args.seed, args.seed + args.seeds):
            out = Path(args.out) / f"{key}{value:g}_seed{seed}"
            if out in plans:
                fail(f"{key} values {plans[out][key]} and {value} share the run directory {out}; "
                     "give values that differ in their first 6 significant digits")
            plans[out] = {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS} | {
                key: value, "seed": seed, "seeds": 1, f"{key}s": None}
            if (out / "args.json").is_file():
                saved = read_json(out / "args.json")
                differ = [k for k, v in plans[out].items() if k in saved and saved[k] != v
                          and not (k == "steps" and args.epochs is not None)]
                if differ:
                    fail(f"{out} was run with other settings ({', '.join(differ)}); "
                         "choose another --out")
    for out, settings in plans.items():
        if not (out / "args.json").is_file():
            out.mkdir(parents=True, exist_ok=True)
            write_json(settings, out / "args.json")
    return [str(out) for out in plans]


def run_commands(commands: list[list[str]], jobs: int = 1) -> list[int]:
    """Run the command lines as subprocesses, `jobs` at a time with CPU threads / jobs threads
    each; print a line as each ends; return the exit codes in order."""
    threads = max(1, torch.get_num_threads() // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if jobs > 1 else None
    codes = [0] * len(commands)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(subprocess.run, cmd, env=env): i for i, cmd in enumerate(commands)}
        for done, future in enumerate(as_completed(futures), 1):
            i = futures[future]
            codes[i] = future.result().returncode
            status = f"failed (exit code {codes[i]})" if codes[i] else "finished"
            print(f"[{done}/{len(commands)}] {shlex.join(commands[i][1:])} {status}", flush=True)
    return codes


def load_run_file(path: str | Path, device: torch.device,
                  keys: Sequence[str] = ("models",)) -> dict[str, Any]:
    """A checkpoint.pt or model.pt written by a script, holding every entry of `keys`; DataError
    names the file if it is damaged or lacks one (another script's, or an older version's)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise DataError(f"{path} is damaged or not a checkpoint "
                        f"({str(err).splitlines()[0][:100]})") from None
    if not isinstance(state, dict) or "models" not in state:
        raise DataError(f"{path} holds no models: not a checkpoint of this project")
    if missing := [key for key in keys if key not in state]:
        raise DataError(f"{path} lacks {', '.join(missing)}: written by another script or an "
                        "older version; delete it to start the run again from step 0")
    return state


def load_models(models: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """models.load_state_dict, with a DataError naming `path` when the shapes do not match."""
    try:
        models.load_state_dict(state)
    except RuntimeError as err:
        raise DataError(f"{path} was written with other model settings "
                        f"({str(err).splitlines()[0][:100]})") from None


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """Permutation of epoch `epoch`, a function of (seed, epoch) so that --resume needs no state."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


# --- Outliers: a per-sample p-value from the known prior, and the fitted baseline ------------

def prior_pvalues(z: np.ndarray, uniform: bool = False) -> np.ndarray:
    """P(chi^2_d >= ||z||^2) per row: exact false-alarm rate under z ~ N(0, I_d) (Theorem 3.4);
    uniform: z in [0, 1]^d is mapped by Phi^-1 first."""
    z = to_gaussian(z) if uniform else np.asarray(z, dtype=np.float64)
    return scipy.stats.chi2.sf((z * z).sum(axis=1), df=z.shape[1])


def mahalanobis_scores(z_fit: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row of z to the mean and covariance of z_fit."""
    z_fit, z = np.asarray(z_fit, dtype=np.float64), np.asarray(z, dtype=np.float64)
    centred = z - z_fit.mean(axis=0)
    precision = np.linalg.pinv(np.atleast_2d(np.cov(z_fit, rowvar=False)))
    return np.einsum("ij,jk,ik->i", centred, precision, centred)


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """AUROC of `score > threshold` separating out from in (Mann-Whitney U / (n_in n_out))."""
    ranks = scipy.stats.rankdata(np.concatenate([scores_in, scores_out]))
    n_in, n_out = len(scores_in), len(scores_out)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def binomial_interval(k: int, n: int, level: float = 0.99) -> tuple[float, float]:
    """Clopper-Pearson (exact) confidence interval of a rate k / n."""
    ci = scipy.stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level)
    return float(ci.low), float(ci.high)


def outlier_report(z_train: np.ndarray, z_test: np.ndarray, z_shifted: dict[str, np.ndarray],
                   alphas: Sequence[float] = (0.01, 0.05, 0.10), uniform: bool = False) -> dict:
    """Prior rule (p < alpha) against fitted rule (Mahalanobis above the training 1 - alpha
    quantile): false alarms with 99% interval, detection rates per shifted set, AUROC."""
    p_test = prior_pvalues(z_test, uniform)
    fitted = {name: mahalanobis_scores(z_train, z) for name, z in
              {"train": z_train, "test": z_test, **z_shifted}.items()}
    report: dict[str, Any] = {"n_test": len(z_test), "alphas": {}, "auroc": {}}
    for alpha in alphas:
        threshold = np.quantile(fitted["train"], 1 - alpha)
        rates: dict[str, Any] = {}
        for rule, flagged_test in (("prior", p_test < alpha),
                                   ("fitted", fitted["test"] > threshold)):
            k = int(flagged_test.sum())
            rates[rule] = {"false_alarm": k / len(z_test),
                           "false_alarm_ci99": binomial_interval(k, len(z_test))}
        for name, z in z_shifted.items():
            rates["prior"][f"detect_{name}"] = float((prior_pvalues(z, uniform) < alpha).mean())
            rates["fitted"][f"detect_{name}"] = float((fitted[name] > threshold).mean())
        report["alphas"][f"{alpha:g}"] = rates

    def squared_norm(z: np.ndarray) -> np.ndarray:  # the prior rule's score, monotone in 1 - p
        g = to_gaussian(z) if uniform else np.asarray(z, dtype=np.float64)
        return (g * g).sum(axis=1)
    for name, z in z_shifted.items():
        report["auroc"][name] = {"prior": auroc(squared_norm(z_test), squared_norm(z)),
                                 "fitted": auroc(fitted["test"], fitted[name])}
    return report


# --- Self-supervised losses of Table 1 (cifar_ssl.py) ----------------------------------------

def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent, the SimCLR loss (Chen et al. 2020, eq. 1), over all 2N anchors; z1[k], z2[k]
    are two views of image k. InfoNCE (Section 4) with 2N - 1 candidates; t = 0.2 (App. C)."""
    u = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = len(z1)
    logits = (u @ u.T / temperature).fill_diagonal_(-math.inf)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(u.device)
    return F.cross_entropy(logits, positives)


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_weight: float = 25.0,
                var_weight: float = 25.0, cov_weight: float = 1.0,
                eps: float = 1e-4) -> torch.Tensor:
    """VICReg (Bardes et al. 2022, eq. 6): sim s(Z, Z') + var [v(Z) + v(Z')] + cov [c(Z) + c(Z')];
    s: MSE, v: eq. 1, c: eq. 3 (covariance divisor N - 1); weights 25 / 25 / 1 (Appendix C)."""
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

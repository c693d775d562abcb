"""The pieces of Noise-Injected Deep InfoMax (Butakov et al., "the paper") that the scripts share.
Docstrings cite the paper, Choi & Lee (UAI 2022: ReDV, ReNWJ) and Tschannen et al. (ICLR 2020:
critics). Each definition can be copied alone; nothing here parses flags, exits or reads runs."""
from __future__ import annotations

import gzip
import math
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn import metrics, naive_bayes, neighbors, neural_network
from sklearn.exceptions import ConvergenceWarning
from torch import nn

LOG10 = math.log(10.0)  # nats of a balanced 10-class label: a channel below it cannot carry it
REPO = Path(__file__).resolve().parent
SHIPPED_MNIST = REPO / "data" / "mnist"
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


# --- Data: MNIST-style IDX files -------------------------------------------------------------
class DataError(ValueError):
    """A missing, damaged or unusable data file; the scripts print it as one line, exit code 2."""


def read_idx(path: str | Path) -> torch.Tensor:
    """One IDX file (optionally gzipped) as a uint8 tensor; DataError if damaged."""
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as fh:
            data = fh.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, zlib.error, struct.error, ValueError) as err:
        raise DataError(f"{path} is damaged or not an IDX file ({err})") from None
    return torch.from_numpy(array.copy())


def load_mnist(root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) in [0, 1] and int64 labels of one split, from IDX files in `root`."""
    root, tensors = Path(root), []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{'train' if train else 't10k'}-{kind}-ubyte"
        path = next((root / f for f in (name, f"{name}.gz") if (root / f).is_file()), None)
        if path is None:
            raise DataError(f"{root} lacks {name}[.gz]; point --data-dir at a folder with the "
                            "four IDX files (Fashion-MNIST: apt-get install dataset-fashion-mnist)")
        tensors.append(read_idx(path))
    images, labels = tensors
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


def load_data(dataset: str, data_dir: str | None = None, split_seed: int = 0,
              crop: int | None = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor, dict[str, Any]]:
    """(x_train, y_train, x_test, y_test, record), images cropped to crop x crop (Table 2: 24).
    "mnist": the official 60k / 10k in data/mnist/ (or `data_dir`); "fashion-mnist": Debian's;
    "mnist-test-split": a seeded 8k / 2k split of the 10k MNIST test images (older runs)."""
    root = Path(data_dir or (FASHION_MNIST_DEBIAN if dataset == "fashion-mnist" else SHIPPED_MNIST))
    where = root.resolve()  # recorded relative to the repository when inside it
    info = {"dataset": dataset, "source": str(where.relative_to(REPO) if
                                              where.is_relative_to(REPO) else where)}
    if dataset == "mnist-test-split":
        x, y = load_mnist(root, train=False)
        tr, te = seeded_split(len(x), int(0.8 * len(x)), split_seed)
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
        info.update(split_seed=split_seed,
                    split=f"seeded {len(tr)}/{len(te)} split of the MNIST test split")
    else:
        (x_tr, y_tr), (x_te, y_te) = load_mnist(root, True), load_mnist(root, False)
        info.update(split="official train/test")
    info.update(n_train=len(x_tr), n_test=len(x_te))
    if min(len(x_tr), len(x_te)) < 20 or min(len(y_tr.unique()), len(y_te.unique())) < 2:
        raise DataError(f"{root}: {len(x_tr)} training and {len(x_te)} test images; the "
                        "evaluation needs at least 20 images and 2 labels in each split")
    if crop is None:
        return x_tr, y_tr, x_te, y_te, info
    if min(*x_tr.shape[-2:], *x_te.shape[-2:]) < crop:
        raise DataError(f"{root}: images of {x_te.shape[-2]} x {x_te.shape[-1]} pixels, smaller "
                        f"than the {crop} x {crop} input of the Table 2 ConvNet")
    return center_crop(x_tr, crop), y_tr, center_crop(x_te, crop), y_te, info


OOD_SETS = ("fashion-mnist", "inverted", "noise")  # shifted test sets: a data set, two shifts


def shifted_images(name: str, x_test: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """As many out-of-distribution images as x_test: "fashion-mnist" (a seeded sample of its test
    split), "inverted" (1 - x_test) or "noise" (i.i.d. U[0, 1] pixels)."""
    gen = torch.Generator().manual_seed(seed)
    if name == "inverted":
        return 1.0 - x_test
    if name == "noise":
        return torch.rand(x_test.shape, generator=gen).to(x_test.device)
    x = load_data(name)[2]
    pick = torch.randperm(len(x), generator=gen)[:len(x_test)]
    return x[pick].to(x_test.device).contiguous(memory_format=torch.channels_last)


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The data order of one epoch, a function of (seed, epoch): a resumed run needs no state."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


# --- Encoder (Table 2) and the head of Theorem 3.4 ------------------------------------------
class ConvEncoder(nn.Module):
    """Table 2 ConvNet on 1x24x24 images: 3 x [Conv3x3, MaxPool2, BN, LeakyReLU], 2 dense layers."""

    def __init__(self, dim: int, channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip((1, *channels), channels):
            layers += [nn.Conv2d(c_in, c_out, 3), nn.MaxPool2d(2), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.01)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1], 128), nn.LeakyReLU(0.01),
                                  nn.Linear(128, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class GaussianHead(nn.Module):
    """BatchNorm1d(affine=False): E f(X) = 0, Var f(X)_i = 1 (Theorem 3.4); the scripts add Z."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.norm(f)


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, forward: Callable, x: torch.Tensor, bs: int) -> None:
    """Every BatchNorm's running statistics replaced by their average over batches of `x`."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta, was_training = [m.momentum for m in norms], model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches of this pass
    model.train()
    for i in range(0, len(x), bs):
        forward(x[i:i + bs])
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
    """Table 2 critic T([a; b]): Dense(2d,256), LeakyReLU, Dense(256,256), LeakyReLU, Dense(256,1);
    `reference` on all B x B pairs (the definition), forward through _PairwiseMLP (the same T)."""

    def __init__(self, dim: int, hidden: int = 256, rows: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.LeakyReLU(0.01),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.01),
                                 nn.Linear(hidden, 1))
        self.rows = rows

    def reference(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([a[:, None, :].expand(-1, len(b), -1),
                                   b[None, :, :].expand(len(a), -1, -1)], dim=-1)).squeeze(-1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        first, second, last = self.net[0], self.net[2], self.net[4]
        device = a.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else torch.float32)
        # CPU: about 2M activations per chunk stay in cache; CUDA: one chunk
        rows = self.rows or (max(1, 2 ** 21 // (len(b) * first.out_features))
                             if device == "cpu" else len(a))
        with torch.autocast(device, enabled=False):
            p = F.linear(a.float(), first.weight[:, :a.shape[1]], first.bias)
            q = F.linear(b.float(), first.weight[:, a.shape[1]:])
            return _PairwiseMLP.apply(p, q, second.weight, second.bias, last.weight, last.bias,
                                      dtype, rows)


class SeparableCritic(nn.Module):
    """T(a, b) = <phi(a), psi(b)>, phi and psi one-hidden-layer MLPs (Tschannen et al., 3.2)."""

    def __init__(self, dim: int, hidden: int = 256, out: int = 128):
        super().__init__()
        self.phi, self.psi = (nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.01),
                                            nn.Linear(hidden, out)) for _ in range(2))

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
    y = f(X) + Z, plus d/2 log(1 + 1/sigma^2): the exact PMI (Appendix A). sigma > 0; float32."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.autocast(a.device.type, enabled=False):
            a, b, s2 = a.float(), b.float(), self.sigma ** 2
            sq_a, sq_b = (a * a).sum(1), (b * b).sum(1)
            sq_dist = sq_a[:, None] + sq_b[None, :] - 2 * a @ b.T
            return (sq_b[None, :] / (2 * (1 + s2)) - sq_dist / (2 * s2)
                    + gaussian_capacity(a.shape[1], self.sigma))


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
    """Deep InfoMax's Jensen-Shannon loss E_P sp(-T) + E_Q sp(T); MI: NWJ's (Choi & Lee, Tab. 1)."""
    off = ~torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
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


def mi_loss(name: str, reg_weight: float = 0.1, clip: float | None = 10.0) -> Callable:
    """The loss `name` with weight for redv / renwj and clip for renwj (Choi & Lee, Table 1)."""
    if name == "renwj":
        return partial(renwj, weight=reg_weight, clip=clip)
    return partial(redv, weight=reg_weight) if name == "redv" else LOSSES[name]


def bound_estimates(scores: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{name: (value, se)} of InfoNCE, NWJ and DV (eqs. 2-3) on one score matrix, in float64: means
    of per-row terms (DV linearized), se = sd / sqrt(B). InfoNCE cannot exceed log B; NWJ and DV
    can, at a variance of about e^(2I) near the PMI critic (e^(2C) on the channel of eq. 5)."""
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
    """{estimator: {"batch": [mean, se] over the batches, "whole": bound_estimates(whole)}}."""
    rows, table = [bound_estimates(s) for s in batches], {}
    for name, whole_value in bound_estimates(whole).items():
        values = [r[name][0] for r in rows]
        se = np.std(values, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan
        table[name] = {"batch": [float(np.mean(values)), float(se)], "whole": list(whole_value)}
    return table


def divergence(mi: float, se: float, losses: Sequence[float]) -> list[str]:
    """Why a run of >= 10 logged losses is no result ([]: none): its held-out lower bound (eqs. 2-3)
    > 3 SE below 0, or its last tenth's mean loss above the best tenth's by > noise and 4 SE."""
    w, rise, limit = len(losses) // 10, 0.0, math.inf
    if w:  # noise: the sd of one logged loss, from successive differences (a trend cancels)
        tenths = np.reshape(losses[len(losses) - 10 * w:], (10, w)).mean(1)
        rise, noise = float(tenths[-1] - tenths.min()), float(np.std(np.diff(losses), ddof=1))
        limit = noise / math.sqrt(2) * max(1.0, 4 * math.sqrt(2 / w))
    return [f"held-out MI {mi:.3f} +- {se:.3f}: < -3 SE"] * bool(w and mi < -3 * se) + [
        f"training loss {rise:.3f} above its best, limit {limit:.3f}"] * bool(rise > limit)


# --- Capacities ------------------------------------------------------------------------------
def gaussian_capacity(d: int, sigma: float) -> float:
    """C = d/2 log(1 + 1/sigma^2), eq. (5): the maximum of I(f(X'); f(X) + Z); inf at sigma = 0."""
    return math.inf if sigma == 0 else 0.5 * d * math.log1p(1.0 / sigma ** 2)


# --- Normality tests and their null levels (Section 5) ---------------------------------------
NULL_DRAWS = 39  # N(0, I) samples behind every null level: the Monte Carlo test at 5 % is exact
LEVEL, BAND_SHARE = 0.05, 0.95  # the decision's level; the central share of null draws in a band
COLLAPSED = 0.05  # a correlation eigenvalue below it marks a (nearly) collapsed direction
_NULL_CACHE: dict[tuple[int, ...], dict] = {}


def _as_2d(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    if z.ndim not in (1, 2):
        raise ValueError(f"expected an (n, d) array, got shape {z.shape}")
    return z.reshape(len(z), -1)


def _standardize(z: np.ndarray) -> np.ndarray:
    """Columns centred and scaled to sd 1 (a constant column stays 0, not NaN)."""
    z = z - z.mean(axis=0)
    sd = z.std(axis=0)
    return z / np.where(sd > 0, sd, 1.0)


def _subsample(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return np.arange(n) if size >= n else rng.choice(n, size=size, replace=False)


def _directions(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    """k directions uniform on the unit sphere of R^d, as the columns of a (d, k) array."""
    u = rng.standard_normal((d, k))
    return u / np.linalg.norm(u, axis=0)


def projected_pvalues(z, directions: np.ndarray, subsamples: np.ndarray) -> tuple[float, float]:
    """Mean p-values of D'Agostino-Pearson and Shapiro-Wilk (Section 5) on 1-D projections: column
    j of `directions` (d, k) projects z, each row of subsamples[j] (n_boot, m) picks one test's."""
    projections = _as_2d(z) @ directions
    samples = projections[subsamples, np.arange(directions.shape[1])[:, None, None]]
    samples = samples.reshape(-1, subsamples.shape[-1])
    return (float(scipy.stats.normaltest(samples, axis=1).pvalue.mean()),
            float(scipy.stats.shapiro(samples, axis=1).pvalue.mean()))


def henze_zirkler(z) -> tuple[float, float]:
    """Henze-Zirkler (1990) test: statistic HZ and its p-value (log-normal null approximation)."""
    z = _as_2d(z)
    (n, d), centred = z.shape, z - z.mean(axis=0)
    cov = centred.T @ centred / n  # maximum-likelihood covariance, as in the original test
    whitened = centred @ np.linalg.pinv(cov)  # the inverse, also where cov is singular
    d_i = np.einsum("ij,ij->i", whitened, centred)
    d_ij = d_i[:, None] + d_i[None, :] - 2.0 * (whitened @ centred.T)
    b2 = 0.5 * ((2 * d + 1) * n / 4.0) ** (2.0 / (d + 4))
    b4 = b2 ** 2
    b8, a, w = b4 ** 2, 1.0 + 2.0 * b2, (1.0 + b2) * (1.0 + 3.0 * b2)
    statistic = (np.exp(-0.5 * b2 * d_ij).sum() / n - 2.0 * (1.0 + b2) ** (-d / 2)
                 * np.exp(-b2 / (2.0 * (1.0 + b2)) * d_i).sum() + n * a ** (-d / 2))
    mean = 1.0 - a ** (-d / 2) * (1.0 + d * b2 / a + d * (d + 2) * b4 / (2.0 * a ** 2))
    var = (2.0 * (1.0 + 4.0 * b2) ** (-d / 2)
           + 2.0 * a ** (-d) * (1.0 + 2.0 * d * b4 / a ** 2
                                + 3.0 * d * (d + 2) * b8 / (4.0 * a ** 4))
           - 4.0 * w ** (-d / 2) * (1.0 + 3.0 * d * b4 / (2.0 * w)
                                    + d * (d + 2) * b8 / (2.0 * w ** 2)))
    spread = 1.0 + var / mean ** 2  # the log-normal of this mean and variance: e^(s^2), median
    return float(statistic), float(scipy.stats.lognorm.sf(
        statistic, s=np.sqrt(np.log(spread)), scale=mean / np.sqrt(spread)))


def henze_zirkler_pvalue(z, n_boot: int = 20, subsample: int = 128, seed: int = 0) -> float:
    """Henze-Zirkler p-value averaged over n_boot random subsamples (Section 5)."""
    z, rng = _as_2d(z), np.random.default_rng(seed)
    return float(np.mean([henze_zirkler(z[_subsample(rng, len(z), subsample)])[1]
                          for _ in range(n_boot)]))


def sliced_w2(z, n_dirs: int = 200, seed: int = 0) -> float:
    """Sliced W2 between the coordinate-standardized sample and N(0, I): root mean over n_dirs
    random directions of W2^2 between sorted projections and N(0, 1) quantiles at (i - 0.5) / n."""
    z = _as_2d(z)
    if not np.isfinite(z).all():
        raise ValueError("the sample holds NaN or infinite values")
    scale = np.abs(z).max()
    z = _standardize(z / scale if 0 < scale < np.inf else z)  # 1e-300 or 1e200 data: no overflow
    quantiles = scipy.stats.norm.ppf((np.arange(1, len(z) + 1) - 0.5) / len(z))
    projections = _directions(np.random.default_rng(seed), z.shape[1], n_dirs).T @ z.T
    projections = np.sort(projections.astype(np.float32), axis=1)  # float32 sorts faster
    return float(np.sqrt(np.mean((projections - quantiles) ** 2)))


def correlation_spectrum(z, keep: int = 5) -> dict:
    """Eigenvalues of the correlation matrix (they sum to d): the `keep` smallest, the count below
    COLLAPSED (Var f_i = 1 of Theorem 3.4 allows them), the effective rank exp(H(lambda / d))."""
    z = _standardize(_as_2d(z))
    eig = np.clip(np.linalg.eigvalsh(z.T @ z / len(z)), 0.0, None)
    p = eig[eig > 0] / eig.sum()
    return {"smallest_eigenvalues": [float(v) for v in eig[:keep]],
            "collapsed": int(np.sum(eig < COLLAPSED)),
            "effective_rank": float(np.exp(-np.sum(p * np.log(p))))}


def null_band(values, k: int = 1, share: float = BAND_SHARE, resamples: int = 20000) -> list:
    """[low, high]: the central `share` of the mean of k null draws of a statistic (`values`, from
    normality_null); for k > 1 from seeded resampled means, about sqrt(k) narrower."""
    values = np.asarray(values, dtype=np.float64)
    means = values if k == 1 else np.random.default_rng(k).choice(
        values, size=(resamples, k)).mean(axis=1)
    return [float(q) for q in np.quantile(means, [(1 - share) / 2, (1 + share) / 2])]


def normality_null(n: int, d: int, subsample: int = 128, n_proj: int = 10, n_boot: int = 20,
                   seed: int = 0, draws: int = NULL_DRAWS) -> dict:
    """normality_report's statistics on `draws` N(0, I_d) samples of size n (cached): per statistic
    mean, sd, band of one sample and the draws ("values"); Henze-Zirkler None if d >= subsample."""
    key = (n, d, subsample, n_proj, n_boot, seed, draws)
    if key not in _NULL_CACHE:
        rng, rows = np.random.default_rng((seed, 16)), []
        for _ in range(draws):  # in normality_report's order: projections, HZ, W2, spectrum
            z = rng.standard_normal((n, d))
            directions = _directions(rng, d, n_proj)
            subsamples = np.stack([_subsample(rng, n, subsample) for _ in range(n_proj * n_boot)])
            p_values = projected_pvalues(z, directions, subsamples.reshape(n_proj, n_boot, -1))
            hz = henze_zirkler_pvalue(z, n_boot, subsample, int(rng.integers(2 ** 32))) if (
                d < min(subsample, n)) else np.nan
            rows.append([*p_values, hz, sliced_w2(z, seed=seed),
                         correlation_spectrum(z)["smallest_eigenvalues"][0]])
        _NULL_CACHE[key] = dict(zip(("dagostino_p", "shapiro_p", "henze_zirkler_p", "sliced_w2",
                                     "min_eigenvalue"), np.array(rows).T))
    return {"draws": draws, "share": BAND_SHARE,
            **{name: {"mean": float(v.mean()), "sd": float(v.std(ddof=1)),
                      "band": null_band(v), "values": [float(x) for x in v]}
               if not np.isnan(v).all() else None
               for name, v in _NULL_CACHE[key].items()}}


def normality_report(z, seed: int = 0, subsample: int = 128, n_proj: int = 10,
                     n_boot: int = 20, points: int | None = None) -> dict:
    """Section 5: p-values of D'Agostino-Pearson and Shapiro-Wilk (n_proj projections x n_boot
    subsamples) and Henze-Zirkler (None if d >= subsample) averaged, sliced W2, the correlation
    spectrum, "null" and the LEVEL "decision"; with `points`, on that many rows drawn by `seed`."""
    z = _as_2d(z)
    if points is not None:
        z = z[np.random.default_rng(seed).permutation(len(z))[:points]]
    (n, d), rng = z.shape, np.random.default_rng(seed)
    directions, subsamples = [], []
    for _ in range(n_proj):
        u = rng.standard_normal(d)
        directions.append(u / np.linalg.norm(u))
        subsamples.append([_subsample(rng, n, subsample) for _ in range(n_boot)])
    dagostino, shapiro = projected_pvalues(z, np.stack(directions, 1), np.array(subsamples))
    whitenable = d < min(subsample, n)
    hz_stat, hz_p = henze_zirkler(z) if whitenable else (None, None)
    null = normality_null(n, d, subsample, n_proj, n_boot, seed)
    w2 = sliced_w2(z, seed=seed)
    # the LEVEL test: Henze-Zirkler on the whole sample, else (d too large) a Monte Carlo test
    # on sliced W2, p = (1 + #{null draws >= w2}) / (draws + 1)
    test, p = ("henze-zirkler", float(hz_p)) if whitenable else ("sliced-w2-monte-carlo", float(
        (1 + np.sum(np.array(null["sliced_w2"]["values"]) >= w2)) / (null["draws"] + 1)))
    return {
        "dagostino_p": dagostino, "shapiro_p": shapiro,
        "henze_zirkler_p": henze_zirkler_pvalue(
            z, n_boot=n_boot, subsample=subsample, seed=seed) if whitenable else None,
        "henze_zirkler_stat": hz_stat,
        "subsample": int(min(subsample, n)), "n_proj": int(n_proj), "n_boot": int(n_boot),
        "sliced_w2": w2, "correlation": correlation_spectrum(z), "null": null,
        "decision": {"test": test, "level": LEVEL, "p": p, "reject": bool(p <= LEVEL)},
        **({} if points is None else {"points": n})}


def normality_lines(report: dict) -> list[str]:
    """normality_report as lines, each statistic beside its null band (one N(0, I) sample's)."""
    null, spectrum, decision = report["null"], report["correlation"], report["decision"]
    lines = [f"normality: p-values averaged over {report['n_proj']} projections x "
             f"{report['n_boot']} subsamples of {report['subsample']} points; null band: central "
             f"{100 * null['share']:g}% of it on {null['draws']} N(0, I) samples of the same n, d"]
    for key, name in (("dagostino_p", "D'Agostino-Pearson averaged p"), ("shapiro_p",
                      "Shapiro-Wilk averaged p"), ("henze_zirkler_p", "Henze-Zirkler averaged p"),
                      ("sliced_w2", "sliced W2 to N(0, I)")):
        lines.append(f"  {name:<30}" + ("n/a (d >= subsample)" if report[key] is None else
                                         "{:.4f}   null band {:.4f} to {:.4f}".format(
                                             report[key], *null[key]["band"])))
    test = {"henze-zirkler": "Henze-Zirkler on the whole sample",
            "sliced-w2-monte-carlo": "Monte Carlo test on sliced W2"}[decision["test"]]
    return lines + [
        f"  {'correlation eigenvalues':<30}smallest "
        + ", ".join(f"{v:.3f}" for v in spectrum["smallest_eigenvalues"])
        + "   null band of the smallest {:.3f} to {:.3f}".format(*null["min_eigenvalue"]["band"])
        + f"; {spectrum['collapsed']} below {COLLAPSED:g} (collapsed directions), "
        f"effective rank {spectrum['effective_rank']:.2f}",
        f"  decision at level {decision['level']:g}: {test}, p = {decision['p']:.3g}: normality "
        + ("rejected" if decision["reject"] else "not rejected")]


def to_gaussian(u, eps: float = 1e-6) -> np.ndarray:
    """Phi^-1 of [0, 1]^d embeddings clipped to [eps, 1 - eps]: uniformity becomes normality."""
    return scipy.stats.norm.ppf(np.clip(np.asarray(u, dtype=np.float64), eps, 1.0 - eps))


def uniformity_report(u: np.ndarray) -> dict:
    """Kolmogorov-Smirnov test of each coordinate against U[0, 1]: mean p-value, largest D."""
    tests = [scipy.stats.kstest(column, "uniform") for column in np.asarray(u).T]
    return {"ks_p_mean": float(np.mean([t.pvalue for t in tests])),
            "ks_stat_max": float(max(t.statistic for t in tests)),
            "ks_p": [float(t.pvalue) for t in tests]}


# --- Downstream metrics and Figure 2 (Section 5) ---------------------------------------------
def downstream_report(z_tr, y_tr, z_te, y_te, seed: int = 0) -> dict:
    """Section 5: test accuracy of naive Bayes, 5-NN, an MLP fit on z_tr; silhouette of z_te."""
    z_tr, z_te, y_tr, y_te = _as_2d(z_tr), _as_2d(z_te), np.asarray(y_tr), np.asarray(y_te)
    report = {}
    for name, clf in (("gnb_acc", naive_bayes.GaussianNB()),
                      ("knn_acc", neighbors.KNeighborsClassifier(n_neighbors=5)),
                      ("mlp_acc", neural_network.MLPClassifier(
                          hidden_layer_sizes=(64,), max_iter=500, random_state=seed))):
        with warnings.catch_warnings():  # a non-converged MLP is still a valid probe
            warnings.simplefilter("ignore", ConvergenceWarning)
            report[name] = float(clf.fit(z_tr, y_tr).score(z_te, y_te))
    report["silhouette"] = float(metrics.silhouette_score(  # O(n^2): at most 5000 points
        z_te, y_te, sample_size=5000 if len(z_te) > 5000 else None, random_state=seed))
    return report


def scatter_embeddings(z: np.ndarray, y: np.ndarray, title: str) -> Any:
    """Figure 2: test embeddings coloured by label (d > 2: the first two principal axes; d = 1:
    against the jittered label), a matplotlib Figure (no display, nothing to close)."""
    z, axes = np.asarray(z, dtype=np.float64), ("$z_1$", "$z_2$")
    if z.shape[1] == 1:
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(z))
        z, axes = np.column_stack([z[:, 0], np.asarray(y) + jitter]), ("$z_1$", "label (jittered)")
    elif z.shape[1] > 2:
        z = z - z.mean(0)
        z, axes = z @ np.linalg.svd(z, full_matrices=False)[2][:2].T, ("PC 1", "PC 2")
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    points = ax.scatter(z[:, 0], z[:, 1], c=y, cmap="tab10", s=3, alpha=0.7, vmin=-0.5, vmax=9.5)
    fig.colorbar(points, ax=ax, ticks=range(10), label="label")
    ax.set(title=title, xlabel=axes[0], ylabel=axes[1],
           aspect="auto" if axes[1].startswith("label") else "equal")
    return fig

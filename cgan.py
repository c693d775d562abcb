"""Conditional generation from Gaussian DIM embeddings (Appendix D), measured.

A conditional GAN (Mirza & Osindero, 2014) generates MNIST digits from a latent vector and a
condition c = f(X), the 2-D embedding of the image by a noise-injected encoder (mnist_gauss.py,
sigma = 0.1): from real embeddings (Figure 3) or, since f(X) ~ N(0, I), from c ~ N(0, I) (Figure
4). A digit classifier scores both: the share of generations classified as their source digit
(conditional consistency), and the class histograms of unconditional samples from N(0, I), from
real embeddings and from a mismatched prior U[-a, a]^2.

    python cgan.py                                  # trains the encoder first (mnist_gauss.py)
    python cgan.py --encoder runs/mnist_gauss/RUN   # a finished mnist_gauss.py run with d = 2
    python cgan.py --resume --out runs/cgan/RUN     # continue a killed run
    python cgan.py --bench 20                       # ms per GAN step on this machine

Exit codes: 0 done; 2 bad input or a damaged file (one line on stderr); 3 the GAN diverged.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from torchvision.utils import make_grid
from tqdm import tqdm

import common

N_CLASSES, COND_DIM = 10, 2  # Appendix D conditions on the two-dimensional embeddings
RUNTIME = ("out", "resume", "device", "quiet", "bench")  # not in args.json
MANY = 10 ** 8  # the upper bound of step counts and intervals
REFRESH_S = 0.1 if sys.stderr.isatty() else 60  # progress: live on a terminal, rare in a log


def number(kind: type, low: float, high: float, strict: bool = False) -> Callable[[str], Any]:
    """argparse type: a `kind` in [low, high], or in (low, high) if `strict` (NaN never is)."""
    def parse(text: str) -> Any:
        value = kind(text)  # a ValueError becomes argparse's "invalid int value: 'x'"
        if not (low < value < high if strict else low <= value <= high):
            raise argparse.ArgumentTypeError(f"must lie in {'(' if strict else '['}{low}, "
                                             f"{high}{')' if strict else ']'}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def precision(device: torch.device, amp: bool | None) -> tuple[torch.dtype, str]:
    """(autocast dtype, why), chosen once per run: --amp / --no-amp force it; auto (None) takes
    bfloat16 on CUDA (float16 with a gradient scaler on a GPU without it) and on a CPU that runs
    bfloat16 natively, float32 elsewhere (emulated bfloat16 is slower than float32)."""
    half = (torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported()
            else torch.bfloat16)
    if amp is not None:
        return (half, "--amp") if amp else (torch.float32, "--no-amp")
    if device.type == "cuda":
        return half, "CUDA" if half == torch.bfloat16 else "a GPU without bfloat16: float16"
    if device.type != "cpu":
        return torch.float32, f"autocast on {device.type} only with --amp"
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.float32, "this CPU has no native bfloat16 (no AVX-512 BF16, no AMX)"
    kernels = torch.backends.cpu.get_cpu_capability()  # lowered by ATEN_CPU_CAPABILITY
    if kernels not in ("AVX512", "AVX512_BF16", "AMX"):
        return torch.float32, f"this CPU has native bfloat16, but torch runs {kernels} kernels"
    return half, "this CPU has native bfloat16 (AVX-512 BF16 or AMX)"


def autocast(x: torch.Tensor, dtype: torch.dtype) -> torch.autocast:
    """Autocast to the run's precision; float32 switches it off."""
    return torch.autocast(x.device.type, dtype, enabled=dtype != torch.float32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--encoder", metavar="RUN_DIR", help="a finished mnist_gauss.py run with --dim 2 whose "
        "embeddings condition the GAN; None: train one into OUT/encoder")
    add("--sigma", type=number(float, 0, 100),
        help="noise of the encoder that cgan.py trains (not with --encoder); None: 0.1, Appendix D")
    add("--encoder-steps", type=number(int, 0, MANY), help="training steps of that encoder (not "
        "with --encoder); None: 2000, mnist_gauss.py's default")
    add("--steps", type=number(int, 0, MANY), default=6000, help="GAN steps (our choice)")
    add("--batch-size", type=number(int, 2, 4096), default=128, help="GAN batch size (DCGAN)")
    add("--lr-g", type=number(float, 0, 1, True), default=2e-4, help="Adam lr of G (DCGAN)")
    add("--lr-d", type=number(float, 0, 1, True), default=2e-4, help="Adam lr of D (DCGAN)")
    add("--latent-dim", type=number(int, 1, 1024), default=64, help="size of G's latent noise")
    add("--width", type=number(int, 1, 512), default=64, help="conv channels of G and D (DCGAN)")
    add("--clf-epochs", type=number(int, 1, 1000), default=5, help="classifier epochs")
    add("--clf-lr", type=number(float, 0, 1, True), default=1e-3, help="its Adam lr (Appendix C)")
    add("--n-samples", type=number(int, 1, 10 ** 5), default=10000, help="generations per prior")
    add("--box", type=number(float, 0, 100, True), default=3.0, help="half-width of U[-a, a]^2")
    add("--seed", type=number(int, 0, 2 ** 32 - 2), default=0, help="fixes order, noise, init")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto picks CUDA")
    add("--dataset", choices=["mnist", "fashion-mnist", "mnist-test-split"], default="mnist",
        help="the encoder's; mnist: the official 60k/10k split in data/mnist/; fashion-mnist: "
        "Debian's unless --data-dir; mnist-test-split: older runs' 8k/2k split of the test set")
    add("--data-dir", help="folder with the four IDX files (or .gz)")
    add("--out", help="run directory (new or empty); None: a new one under runs/cgan/")
    add("--resume", action="store_true", help="continue the run in --out (and OUT/encoder)")
    add("--log-every", type=number(int, 1, MANY), default=50, help="steps per loss-history entry")
    add("--ckpt-every", type=number(int, 1, MANY), default=500, help="checkpoint every N steps")
    add("--amp", action=argparse.BooleanOptionalAction, help="autocast for G, D, the classifier "
        "and the encoder run; None: bf16 on CUDA and CPUs with native bf16, else float32")
    add("--bench", type=number(int, 1, 10 ** 4), default=0, metavar="N", help="time N steps, exit")
    add("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.device != "auto" and not (torch.cuda.is_available() if args.device == "cuda" else
                                      args.device == "cpu" or torch.backends.mps.is_available()):
        p.error(f"--device {args.device}: not available on this machine")
    if args.resume:  # the run's args.json, checked by this parser as if typed; typed flags
        if args.out is None:  # may only repeat it (a run keeps its settings)
            p.error("--resume needs --out, the folder of the run to continue")
        saved = read_json(path := Path(args.out) / "args.json")
        if not isinstance(saved, dict) or saved.keys() != vars(args).keys() - set(RUNTIME):
            raise common.DataError(f"{args.out} is not a run of cgan.py (its args.json holds "
                                   "other settings)")
        flags = [f"--{'' if v else 'no-'}{flag}" if isinstance(v, bool) else f"--{flag}={v}"
                 for k, v in saved.items() if v is not None for flag in [k.replace("_", "-")]]
        p.exit_on_error = False
        try:
            stored = p.parse_args(flags)
        except argparse.ArgumentError as err:
            raise common.DataError(f"{path} is damaged: {err}") from None
        for key in saved:
            if getattr(args, key) not in (p.get_default(key), getattr(stored, key)):
                raise common.DataError(f"--{key.replace('_', '-')} {getattr(args, key)} differs "
                                       f"from {saved[key]} in {path}: a run keeps its settings")
        vars(args).update({key: getattr(stored, key) for key in saved})
    elif not args.bench:
        args.out = args.out or f"runs/cgan/seed{args.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
        if Path(args.out).is_dir() and any(Path(args.out).iterdir()):
            p.error(f"--out {args.out} holds files: --resume continues that run")
    if args.encoder is not None and (args.sigma, args.encoder_steps) != (None, None):
        p.error("--sigma and --encoder-steps set the encoder cgan.py trains, not --encoder's")
    if args.encoder is None:  # recorded in args.json as used
        args.sigma = 0.1 if args.sigma is None else args.sigma
        args.encoder_steps = 2000 if args.encoder_steps is None else args.encoder_steps
    return args


def read_json(path: Path) -> Any:
    """The JSON in `path`; DataError naming the file when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise common.DataError(f"{path} is not readable JSON ({err})") from None


def save(path: Path, write: Callable[[Path], Any]) -> None:
    """write(temporary name) beside `path`, then rename: a killed run leaves no half file."""
    write(path.with_name(f".{path.name}"))  # the same suffix: matplotlib reads the format off it
    os.replace(path.with_name(f".{path.name}"), path)


# --- Data: images and their conditioning vectors c = f(X) from a mnist_gauss.py run ---------
def train_encoder(args: argparse.Namespace, run: Path) -> None:
    """Run mnist_gauss.py (--sigma, d = 2, --encoder-steps, this run's data and seed) as a
    subprocess into `run`; its --resume starts, continues or reuses that run."""
    cmd = [sys.executable, str(common.REPO / "mnist_gauss.py"), "--out", str(run), "--resume",
           "--sigma", str(args.sigma), "--dim", str(COND_DIM), "--steps", str(args.encoder_steps),
           "--seed", str(args.seed), "--dataset", args.dataset, "--device", args.device,
           *(["--data-dir", args.data_dir] if args.data_dir else []),
           *([] if args.amp is None else ["--amp" if args.amp else "--no-amp"]),
           *["--quiet"] * args.quiet]
    print(f"encoder: {shlex.join(cmd)}", flush=True)
    if code := subprocess.run(cmd, check=False).returncode:  # its message is printed above
        error = FloatingPointError if code == 3 else common.DataError
        raise error(f"the encoder run in {run} stopped (exit code {code}); fix it, then --resume")


def read_encoder_run(run: Path, y_tr: torch.Tensor, y_te: torch.Tensor) -> tuple:
    """A record of a finished mnist_gauss.py run with d = 2 on this run's images and the
    conditions c = f(X) of the train and test images from its embeddings.npz (clean branch, eval
    mode, no noise, in load_data's order); DataError says why a run does not fit."""
    saved = read_json(run / "args.json")
    if not isinstance(saved, dict) or "sigma" not in saved or saved.get("dim") != COND_DIM:
        raise common.DataError(f"--encoder {run} is not a mnist_gauss.py run with --dim 2: "
                               "Appendix D conditions on 2-D embeddings matched to N(0, I)")
    metrics = read_json(run / "metrics.json")  # missing: the run is unfinished
    try:
        record = {"run": str(run), "sigma": saved["sigma"], "dim": COND_DIM,
                  **{key: metrics[key] for key in ("steps", "critic", "capacity", "mi_heldout")},
                  "knn_acc": metrics["downstream"]["knn_acc"],
                  "henze_zirkler_p": metrics["normality"]["henze_zirkler_p"],
                  "wall_time_s": metrics["wall_time_s"]}
        with np.load(run / "embeddings.npz") as npz:
            arrays = {key: npz[key] for key in ("z_train", "y_train", "z_test", "y_test")}
    except (OSError, ValueError, LookupError, TypeError, EOFError, zipfile.BadZipFile) as err:
        raise common.DataError(f"--encoder {run} is damaged or unfinished ("
                               f"{type(err).__name__}: {err})") from None
    for split, y in (("train", y_tr), ("test", y_te)):  # the same images in the same order
        z, labels = arrays[f"z_{split}"], arrays[f"y_{split}"]
        if len(labels) != len(y) or not np.array_equal(labels, y.cpu().numpy()):
            raise common.DataError(f"--encoder {run} embedded {len(labels)} {split} images, this "
                                   f"run has {len(y)} (or others: pass its --dataset, --data-dir)")
        if z.shape != (len(y), COND_DIM) or z.dtype.kind != "f" or not np.isfinite(z).all():
            raise common.DataError(f"{run / 'embeddings.npz'}: z_{split} is {z.dtype} {z.shape},"
                                   f" expected finite floats of shape ({len(y)}, {COND_DIM})")
    c_tr, c_te = (torch.from_numpy(arrays[key].astype(np.float32)).to(y_tr.device)
                  for key in ("z_train", "z_test"))
    return record, c_tr, c_te


# --- Models: a DCGAN-style conditional generator and discriminator on 1x24x24 images --------
class Generator(nn.Module):
    """G(z, c) -> a 1x24x24 image in [0, 1]: c, lifted by an MLP to the size of z so that it
    weighs as much as the noise, concatenated with z (Mirza & Osindero); then DCGAN (Radford et
    al.): dense to 2w x 6 x 6, two stride-2 transposed convolutions to the 24 x 24 crops."""

    def __init__(self, latent_dim: int, width: int = 64, cond_dim: int = COND_DIM):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(cond_dim, 256), nn.LeakyReLU(0.2),
                                   nn.Linear(256, latent_dim), nn.LeakyReLU(0.2))
        self.net = nn.Sequential(
            nn.Linear(2 * latent_dim, 2 * width * 36), nn.BatchNorm1d(2 * width * 36), nn.ReLU(),
            nn.Unflatten(1, (2 * width, 6, 6)),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, 1, 4, 2, 1), nn.Sigmoid())

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, self.embed(c)], dim=1))


class Discriminator(nn.Module):
    """D(x, c) = psi(phi(x)) + <e(c), phi(x)>, the logit that x is a real image with condition c;
    phi: two stride-2 convolutions (DCGAN) and a dense layer. The projection term (Miyato &
    Koyama, 2018) lets D check that image and condition belong together, a sum could not."""

    def __init__(self, width: int = 64, cond_dim: int = COND_DIM, hidden: int = 256):
        super().__init__()
        self.phi = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(2 * width * 36, hidden), nn.LeakyReLU(0.2))
        self.psi = nn.Linear(hidden, 1)
        self.embed = nn.Sequential(nn.Linear(cond_dim, hidden), nn.LeakyReLU(0.2),
                                   nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.phi(x)
        return self.psi(h).squeeze(1) + (self.embed(c) * h).sum(1)


def build_gan(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """G and D (channels-last on `device`), their Adam optimizers with beta1 = 0.5 (DCGAN) and
    the float16 loss scaler (a pass-through otherwise): every part a checkpoint holds."""
    gen = Generator(args.latent_dim, args.width).to(device).to(memory_format=torch.channels_last)
    disc = Discriminator(args.width).to(device).to(memory_format=torch.channels_last)
    return {"generator": gen, "discriminator": disc,
            "opt_g": torch.optim.Adam(gen.parameters(), lr=args.lr_g, betas=(0.5, 0.999)),
            "opt_d": torch.optim.Adam(disc.parameters(), lr=args.lr_d, betas=(0.5, 0.999)),
            "scaler": torch.amp.GradScaler(device.type, enabled=args.dtype == torch.float16)}


# --- Training -------------------------------------------------------------------------------
def gan_step(gan: dict, x: torch.Tensor, c: torch.Tensor, args: argparse.Namespace) -> tuple:
    """One D and one G update on real images x with conditions c, the non-saturating losses
    (Goodfellow et al.): D minimizes softplus(-D(x, c)) + softplus(D(G(z, c), c)), G minimizes
    softplus(-D(G(z, c), c)); one float16 loss scaler serves both. The losses, not synced."""
    gen, disc, opt_g, opt_d, scaler = gan.values()
    z = torch.randn(len(x), args.latent_dim, device=x.device)
    with autocast(x, args.dtype):
        fake = gen(z, c)
        d_loss = (F.softplus(-disc(x, c).float()).mean()
                  + F.softplus(disc(fake.detach(), c).float()).mean())
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(d_loss).backward()
    scaler.step(opt_d)
    with autocast(x, args.dtype):
        g_loss = F.softplus(-disc(fake, c).float()).mean()
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(g_loss).backward()
    scaler.step(opt_g)
    scaler.update()
    return d_loss.detach(), g_loss.detach()


def bench(args: argparse.Namespace, device: torch.device) -> None:
    """--bench N: ms per GAN step on synthetic images in this run's precision; the run stops."""
    gan = build_gan(args, device)
    x = torch.rand(args.batch_size, 1, 24, 24, device=device).to(memory_format=torch.channels_last)
    c = torch.randn(args.batch_size, COND_DIM, device=device)
    gan_step(gan, x, c, args)[0].item()  # a warm-up step; .item() waits for the device
    start = time.perf_counter()
    for _ in range(args.bench):
        d_loss, _ = gan_step(gan, x, c, args)
    d_loss.item()
    sec = (time.perf_counter() - start) / args.bench
    print(f"{device.type}, batch {args.batch_size}, width {args.width}: "
          f"{1e3 * sec:.1f} ms/step; {args.steps} steps: {sec * args.steps / 60:.1f} min")


def train(gan: dict[str, Any], x_tr: torch.Tensor, c_tr: torch.Tensor, args: argparse.Namespace,
          out: Path, start: int, history: list) -> None:
    """GAN steps from `start` to args.steps on (image, embedding) pairs of the training split,
    logging the mean (step, D loss, G loss) every --log-every steps, checkpointing every
    --ckpt-every steps; a non-finite loss stops it (exit 3) before its checkpoint."""
    per_epoch, bs = len(x_tr) // args.batch_size, args.batch_size
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.quiet,
               desc="cGAN", dynamic_ncols=True, mininterval=REFRESH_S)
    losses, saved_at = [], start  # G and D are in training mode from build_gan on
    for step in bar:
        epoch, k = divmod(step, per_epoch)
        if k == 0 or step == start:
            order = common.epoch_order(len(x_tr), args.seed, epoch, x_tr.device)
        idx = order[k * bs:(k + 1) * bs]
        losses.append(torch.stack(gan_step(gan, x_tr[idx], c_tr[idx], args)))
        done = step + 1
        checkpoint = done % args.ckpt_every == 0 or done == args.steps
        if done % args.log_every == 0 or checkpoint:
            if not torch.stack(losses).isfinite().all():
                kept = (f"the last good checkpoint (step {saved_at}) is kept in "
                        f"{out / 'checkpoint.pt'}" if saved_at else "no checkpoint was written yet")
                raise FloatingPointError(f"the GAN loss became non-finite by step {done}; try a "
                                         f"smaller --lr-g / --lr-d; {kept}")
            # rows D and G, each contiguous: the same sums as the 1-D means of separate lists
            history.append([done, *torch.stack(losses, 1).mean(1).tolist()])
            losses = []
            bar.set_postfix_str(f"D {history[-1][1]:.3f}, G {history[-1][2]:.3f}", refresh=False)
        if checkpoint:  # everything --resume needs
            state = {"step": done, **{key: part.state_dict() for key, part in gan.items()},
                     "rng": torch.get_rng_state(), "history": history}
            save(out / "checkpoint.pt", lambda tmp: torch.save(state, tmp))
            saved_at = done


# --- Evaluation: a digit classifier judges conditional and unconditional generations --------
def train_classifier(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> nn.Module:
    """The Table 2 ConvNet with 10 outputs, cross-entropy, Adam, --clf-epochs over (x, y), seeded
    anew: the same classifier whatever the GAN did."""
    batch = min(128, len(x))
    torch.manual_seed(args.seed)  # nothing after it draws from the global RNG
    clf = common.ConvEncoder(N_CLASSES).to(x.device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(clf.parameters(), lr=args.clf_lr)
    scaler = torch.amp.GradScaler(x.device.type, enabled=args.dtype == torch.float16)
    for epoch in tqdm(range(args.clf_epochs), desc="classifier", disable=args.quiet,
                      mininterval=REFRESH_S):
        order = common.epoch_order(len(x), args.seed + 1, epoch, x.device)
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            with autocast(x, args.dtype):
                loss = F.cross_entropy(clf(x[idx]).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return clf.eval()


def predict(generate, classify, cond: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Class probabilities (N, 10) of the images generated from each row of `cond`:
    generate(c, rows) maps c = cond[rows] to images, classify maps images to probabilities."""
    rows = [slice(i, min(i + batch_size, len(cond))) for i in range(0, len(cond), batch_size)]
    return torch.cat([classify(generate(cond[r], r)) for r in rows])


def conditional_consistency(generate, classify, cond: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images generated from c_i = f(X_i) classified as the digit y_i of X_i: 1 for the
    source images, 1/10 for a generator that ignores c, E_c sum_y p(y | c)^2 for one that
    samples p(x | c) (below 1 where the 2-D embedding mixes digits)."""
    pred = predict(generate, classify, cond).argmax(1)
    return float((pred == labels.to(pred.device)).float().mean())


def class_histogram(labels: np.ndarray) -> dict[str, Any]:
    """Shares of the ten classes among `labels` and their entropy in nats (log 10 if balanced)."""
    shares = np.bincount(labels, minlength=N_CLASSES) / len(labels)
    nonzero = shares[shares > 0]
    return {"shares": shares.tolist(), "entropy": float((nonzero * np.log(1 / nonzero)).sum())}


def class_report(probs: torch.Tensor, reference: np.ndarray) -> dict[str, Any]:
    """class_histogram of the argmax predictions, its total variation distance to the
    `reference` shares, and the classifier's mean confidence (mean of the largest probability)."""
    report = class_histogram(probs.argmax(1).cpu().numpy())
    tv = 0.5 * np.abs(np.subtract(report["shares"], reference)).sum()
    return {**report, "tv_to_test_embeddings": float(tv),
            "confidence": float(probs.max(1).values.mean())}


@torch.no_grad()
def evaluate(gen: Generator, clf: nn.Module, data: tuple, args: argparse.Namespace) -> dict:
    """Classifier accuracy, conditional consistency (with a retrieval reference), and the class
    histograms of generations from real embeddings, N(0, I) and U[-a, a]^2, all with the same
    latent vectors (the train embeddings show how far two sets of real embeddings differ)."""
    x_tr, c_tr, x_te, y_te, c_te = data
    device, n = x_te.device, args.n_samples
    rng = torch.Generator().manual_seed(args.seed + 2)
    latent = torch.randn(max(n, len(c_te)), args.latent_dim, generator=rng).to(device)
    gen.eval()

    def classify(x):
        with autocast(x, args.dtype):
            return clf(x.contiguous(memory_format=torch.channels_last)).float().softmax(1)

    def generate(c, rows):  # row i always gets latent vector i
        with autocast(c, args.dtype):
            return gen(latent[rows], c).float()

    def first(cond, k):
        return generate(cond[:k], slice(0, len(cond[:k]))).cpu()

    cycle = torch.arange(n, device=device)
    sources = {"test_embeddings": c_te[cycle % len(c_te)],
               "train_embeddings": c_tr[cycle % len(c_tr)],
               "gaussian_prior": torch.randn(n, COND_DIM, generator=rng).to(device),
               "box_prior": args.box * (2 * torch.rand(n, COND_DIM, generator=rng) - 1).to(device)}
    probs = {key: predict(generate, classify, cond) for key, cond in sources.items()}
    reference = class_histogram(probs["test_embeddings"].argmax(1).cpu().numpy())["shares"]
    return {
        "classifier_accuracy": conditional_consistency(lambda c, rows: x_te[rows], classify,
                                                       c_te, y_te),
        "consistency": conditional_consistency(generate, classify, c_te, y_te),
        "retrieval_consistency": conditional_consistency(  # the nearest training embedding's image
            lambda c, rows: x_tr[torch.cdist(c, c_tr).argmin(1)], classify, c_te, y_te),
        "unconditional": {"n_samples": n, "box_half_width": args.box,
                          "test_labels": class_histogram(y_te.cpu().numpy()),
                          **{key: class_report(p, reference) for key, p in probs.items()}},
        "class_information": common.LOG10,
        "samples": {"real": x_te[:64].cpu(), "conditional": first(c_te, 64),
                    "gaussian_prior": first(sources["gaussian_prior"], 100),
                    "box_prior": first(sources["box_prior"], 100)},
    }


# --- Figures and the printed report ---------------------------------------------------------
def show_grid(ax: Any, images: torch.Tensor, nrow: int, title: str) -> None:
    """Images (N, 1, H, W) in [0, 1] as one grid, white digits on black as in MNIST."""
    ax.imshow(make_grid(images, nrow=nrow, pad_value=0.5)[0].numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def figures(metrics: dict, samples: dict[str, torch.Tensor]) -> dict[str, Figure]:
    """Figure 3 (real test images beside their generations), Figure 4 (c ~ N(0, I)), the same
    from the mismatched prior, and the class histograms of every conditioning source."""
    unc, box = metrics["unconditional"], metrics["unconditional"]["box_half_width"]
    figs = {file: Figure(figsize=size) for file, size in (  # no pyplot: files, no display
        ("conditional.png", (9, 4.8)), ("unconditional.png", (5.5, 5.8)),
        ("mismatched.png", (5.5, 5.8)), ("classes.png", (8, 4)))}
    axes = figs["conditional.png"].subplots(1, 2)
    show_grid(axes[0], samples["real"], 8, "real test images X")
    show_grid(axes[1], samples["conditional"], 8, "G(z, f(X)), same positions")
    figs["conditional.png"].suptitle(
        f"conditional generation: {100 * metrics['consistency']:.1f}% classified as the source "
        f"digit (real images {100 * metrics['classifier_accuracy']:.1f}%, nearest training "
        f"embedding {100 * metrics['retrieval_consistency']:.1f}%)", fontsize=10)
    labels = {"test_labels": "test labels", "test_embeddings": "c = f(X_test)",
              "train_embeddings": "c = f(X_train)", "gaussian_prior": "c ~ N(0, I)",
              "box_prior": f"c ~ U[-{box:g}, {box:g}]^2"}
    for file, key in (("unconditional.png", "gaussian_prior"), ("mismatched.png", "box_prior")):
        show_grid(figs[file].subplots(), samples[key], 10, f"{labels[key]}: class entropy "
                  f"{unc[key]['entropy']:.3f} nats (log 10 = {common.LOG10:.3f}),\nTV to test "
                  f"embeddings {unc[key]['tv_to_test_embeddings']:.3f}")
    ax = figs["classes.png"].subplots()
    for i, (key, label) in enumerate(labels.items()):
        ax.bar(np.arange(N_CLASSES) + (i - 2) * 0.16, unc[key]["shares"], width=0.16,
               label=f"{label}: H = {unc[key]['entropy']:.3f}")
    ax.axhline(1 / N_CLASSES, color="k", ls=":", lw=1)
    ax.set(xticks=range(N_CLASSES), xlabel="class predicted by the classifier (true label for "
           "the test images)", ylabel="share", title=f"classes of {unc['n_samples']} generations "
           f"per conditioning source (log 10 = {common.LOG10:.3f} nats)")
    ax.legend(fontsize=8)
    return figs


def report(metrics: dict) -> str:
    """The end-of-run report: the classifier, conditional consistency, the class histograms."""
    m, unc = metrics, metrics["unconditional"]
    return "\n".join([
        f"classifier test accuracy {m['classifier_accuracy']:.4f} (the ceiling of consistency)",
        f"conditional consistency {m['consistency']:.4f}   (nearest training embedding "
        f"{m['retrieval_consistency']:.4f}, chance 0.1)",
        f"unconditional, {unc['n_samples']} samples: class entropy (log 10 = {common.LOG10:.3f}),"
        " TV distance to the test embeddings' histogram, classifier confidence",
        *(f"  {key:16s}  H = {unc[key]['entropy']:.3f}   TV = "
          f"{unc[key]['tv_to_test_embeddings']:.3f}   confidence {unc[key]['confidence']:.3f}"
          for key in ("test_embeddings", "train_embeddings", "gaussian_prior", "box_prior")),
        f"wall time {m['wall_time_s']:.0f} s ({m['steps']} GAN steps)"])


# --- One run --------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> None:
    """Data, the encoder's conditions (trained into OUT/encoder unless --encoder), the GAN,
    evaluation, saving. Every file is checked before the first one is written."""
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    args.dtype, why = precision(device, args.amp)
    label = "float32" if args.dtype == torch.float32 else f"{str(args.dtype)[6:]} autocast"
    print(f"{label}: {why}")
    if args.bench:
        return bench(args, device)
    started, out = time.time(), Path(args.out)
    if args.resume and (out / "metrics.json").is_file():
        return print(f"{out} is finished: its results are in {out / 'metrics.json'}")
    x_tr, y_tr, x_te, y_te, data = common.load_data(args.dataset, args.data_dir)
    x_tr, x_te = (x.to(device).contiguous(memory_format=torch.channels_last) for x in (x_tr, x_te))
    y_tr, y_te = y_tr.to(device), y_te.to(device)
    if args.batch_size > len(x_tr):
        raise common.DataError(f"--batch-size {args.batch_size} exceeds the {len(x_tr)} "
                               "training images")
    if args.encoder:
        encoder, c_tr, c_te = read_encoder_run(Path(args.encoder), y_tr, y_te)
    torch.manual_seed(args.seed)
    gan = build_gan(args, device)
    start, history, path = 0, [], out / "checkpoint.pt"
    if args.resume and path.exists():
        try:  # one place for every way a checkpoint can be damaged or another run's
            state = torch.load(path, map_location=device, weights_only=True)
            for key, part in gan.items():
                part.load_state_dict(state[key])
            torch.set_rng_state(state["rng"].cpu())
            start, history = int(state["step"]), list(state["history"])
        except (OSError, EOFError, RuntimeError, ValueError, LookupError, TypeError,
                AttributeError, pickle.UnpicklingError) as err:
            raise common.DataError(f"{path} is damaged or not this run's "
                                   f"({type(err).__name__}: {str(err)[:80]!r})") from None
        print(f"resuming {out} at step {start}")
    elif not args.resume:
        out.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k not in (*RUNTIME, "dtype")}
        save(out / "args.json", lambda tmp: tmp.write_text(json.dumps(settings, indent=2)))
    if not args.encoder:
        train_encoder(args, out / "encoder")
        encoder, c_tr, c_te = read_encoder_run(out / "encoder", y_tr, y_te)
    train(gan, x_tr, c_tr, args, out, start, history)
    clf = train_classifier(x_tr, y_tr, args)
    metrics = evaluate(gan["generator"], clf, (x_tr, c_tr, x_te, y_te, c_te), args)
    samples = metrics.pop("samples")
    metrics.update(encoder=encoder, data=data, steps=args.steps, batch_size=args.batch_size,
                   seed=args.seed, clf_epochs=args.clf_epochs, device=str(device),
                   precision={"dtype": label, "why": why},
                   wall_time_s=time.time() - started, train_history=history)
    save(out / "model.pt", lambda tmp: torch.save(
        {"models": {key: gan[key].state_dict() for key in ("generator", "discriminator")}}, tmp))
    for file, fig in figures(metrics, samples).items():
        save(out / file, lambda tmp: fig.savefig(tmp, dpi=150, bbox_inches="tight"))
    save(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))
    print(report(metrics) + f"\nsaved to {out}")


def main(argv: list[str] | None = None) -> None:
    """Expected failures end in one line on stderr, exit code 2; 3 for a diverged GAN/encoder."""
    try:
        run(parse_args(argv))
    except (common.DataError, OSError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3 if isinstance(err, FloatingPointError) else 2)


if __name__ == "__main__":
    main()

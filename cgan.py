"""Conditional generation from Gaussian DIM embeddings (Appendix D), measured.

A conditional GAN (Mirza & Osindero, 2014) generates MNIST digits from a latent vector and a
condition c = f(X), the 2-D embedding of the image by a noise-injected encoder (mnist_gauss.py,
sigma = 0.1): from real embeddings (Figure 3) or, since f(X) ~ N(0, I), from c ~ N(0, I) (Figure
4). A digit classifier scores both: the share of generations classified as their source digit
(conditional consistency), and the class histograms of unconditional samples from N(0, I), from
real embeddings and from a mismatched prior U[-a, a]^2.

    python cgan.py                                  # trains the encoder first; minutes on a CPU
    python cgan.py --encoder runs/mnist_gauss/RUN   # a finished mnist_gauss.py run with d = 2
    python cgan.py --resume --out runs/cgan/RUN     # continue a killed run
    python cgan.py --bench 20                       # ms per GAN step on this machine

Exit codes: 0 done; 2 bad input or a damaged file (one line on stderr); 3 the GAN diverged.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import make_grid
from tqdm import tqdm

import common

N_CLASSES, COND_DIM = 10, 2  # Appendix D conditions on the two-dimensional embeddings
OWN_KEYS = ("latent_dim", "lr_g", "lr_d", "clf_epochs")  # in each cgan.py args.json, no other


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--encoder", default=None, metavar="RUN_DIR",
                   help="a finished mnist_gauss.py run with --dim 2 whose embeddings condition "
                        "the GAN; None: train one first into OUT/encoder")
    p.add_argument("--sigma", type=common.nonnegative_float, default=0.1,
                   help="noise of the encoder trained when --encoder is not given (Appendix D)")
    p.add_argument("--encoder-steps", type=common.bounded(int, 0), default=2000,
                   help="training steps of that encoder (mnist_gauss.py's default)")
    p.add_argument("--steps", type=common.bounded(int, 0), default=6000,
                   help="GAN steps of one D and one G update "
                   "(6000 x 128 images: 96 passes over the 8k-image MNIST split)")
    p.add_argument("--epochs", type=common.positive_int, default=None,
                   help="train the GAN for this many passes over the training set instead")
    p.add_argument("--batch-size", type=common.bounded(int, 2), default=128, help="GAN batch size")
    p.add_argument("--lr-g", type=common.positive_float, default=2e-4,
                   help="Adam learning rate of the generator (DCGAN, Radford et al.)")
    p.add_argument("--lr-d", type=common.positive_float, default=2e-4,
                   help="Adam learning rate of the discriminator (DCGAN)")
    p.add_argument("--latent-dim", type=common.positive_int, default=64,
                   help="size of the generator's latent noise vector")
    p.add_argument("--width", type=common.positive_int, default=64,
                   help="channels of the first discriminator / last generator conv layer")
    p.add_argument("--clf-epochs", type=common.positive_int, default=5, help="epochs of the "
                   "digit classifier that judges the generations (5: 98.4%% test accuracy on "
                   "the 8k/2k MNIST split)")
    p.add_argument("--clf-lr", type=common.positive_float, default=1e-3,
                   help="Adam learning rate of the classifier")
    p.add_argument("--n-samples", type=common.positive_int, default=10000,
                   help="unconditional samples per prior for the class histograms")
    p.add_argument("--box", type=common.positive_float, default=3.0,
                   help="half-width a of the mismatched prior U[-a, a]^2")
    p.add_argument("--seed", type=common.seed_int, default=0,
                   help="fixes data order, noise and init")
    p.add_argument("--device", type=common.device_flag, default="auto",
                   help="auto (CUDA when present), cpu, cuda, cuda:N, mps")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist", "mnist-test-split"],
                   default="mnist", help="mnist falls back to the shipped MNIST test split "
                   "(8k/2k) when the full set is neither on disk nor downloadable; must match "
                   "the encoder's")
    p.add_argument("--data-dir", default=None, help="folder with the IDX files (optionally .gz)")
    p.add_argument("--no-download", action="store_true", help="never try to download data")
    p.add_argument("--out", default=None, help="run directory; None: a new one under runs/cgan/")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (and the encoder training in OUT/encoder)")
    p.add_argument("--log-every", type=common.positive_int, default=50, help="progress interval")
    p.add_argument("--ckpt-every", type=common.positive_int, default=500, help="checkpoints")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast for G, D, the classifier and the encoder run: default auto, "
                        "bf16 on CUDA (fp16 + scaler without bf16) and on CPUs with native bf16 "
                        "(AMX, AVX-512 BF16), float32 elsewhere; --amp / --no-amp force it")
    p.add_argument("--bench", type=common.positive_int, default=0, metavar="N",
                   help="time N GAN steps on synthetic data, print ms/step, and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.epochs is not None and args.steps != p.get_default("steps"):
        p.error("--steps and --epochs exclude each other")
    if args.resume:
        common.check_resume(p, args, OWN_KEYS)
    else:
        common.resolve_out(p, args, f"runs/cgan/seed{args.seed}")
    return args


# --- Data: images and their conditioning vectors c = f(X) from a mnist_gauss.py run ---------
def train_encoder(args: argparse.Namespace, run: Path) -> None:
    """Run mnist_gauss.py (--sigma, d = 2, --encoder-steps, this run's data) as a subprocess
    into `run`: resumed if started, reused if finished."""
    if (run / "metrics.json").is_file():
        print(f"encoder: the finished run in {run}")
        return
    cmd = [sys.executable, str(common.REPO / "mnist_gauss.py"), "--out", str(run),
           "--device", args.device, *["--quiet"] * args.quiet]
    if (run / "args.json").is_file():
        cmd += ["--resume"]
    else:
        cmd += ["--sigma", str(args.sigma), "--dim", str(COND_DIM), "--seed", str(args.seed),
                "--steps", str(args.encoder_steps),
                *([] if args.amp is None else ["--amp" if args.amp else "--no-amp"]),
                "--dataset", args.dataset, *["--no-download"] * args.no_download,
                *(["--data-dir", args.data_dir] if args.data_dir else [])]
    print(f"encoder: {shlex.join(cmd)}", flush=True)
    code = subprocess.run(cmd, check=False).returncode
    if code != 0:
        common.fail(f"the encoder run in {run} stopped with exit code {code} (its message is "
                    "above); fix that, then repeat this command with --resume", code=code)


def read_encoder_run(run: Path, data: dict, y_tr: torch.Tensor, y_te: torch.Tensor) -> tuple:
    """A record of a finished mnist_gauss.py run with d = 2 on this run's images and the
    conditions c = f(X) of the train and test images: its embeddings.npz (clean branch, eval
    mode, no noise, in load_data's order). A run that does not fit raises DataError saying why.
    """
    error, name = common.DataError, f"--encoder {run}"
    if not (run / "args.json").is_file():
        raise error(f"{name}: no such run directory" if not run.is_dir() else
                    f"{name} is not an mnist_gauss.py run directory (no args.json)")
    saved = common.read_json(run / "args.json")
    if not isinstance(saved, dict) or "sigma" not in saved:
        raise error(f"{name} is not a Gaussian (mnist_gauss.py) run: Appendix D conditions on "
                    "embeddings matched to N(0, I)")
    sigma, dim = saved["sigma"], saved.get("dim")
    if type(sigma) not in (int, float) or not sigma >= 0 or type(dim) is not int:
        raise error(f"{run / 'args.json'} is damaged: sigma {sigma!r}, dim {dim!r}")
    if dim != COND_DIM:
        raise error(f"{name} has --dim {dim}; Appendix D conditions on 2-D embeddings "
                    "(mnist_gauss.py --dim 2)")
    if not (run / "metrics.json").is_file():
        raise error(f"{name} is unfinished (no metrics.json); finish it with "
                    f"python mnist_gauss.py --resume --out {run}")
    metrics = common.read_json(run / "metrics.json")
    try:
        record = {"run": str(run), "sigma": sigma, "dim": dim,
                  **{key: metrics[key] for key in ("steps", "critic", "capacity", "mi_heldout")},
                  "knn_acc": metrics["downstream"]["knn_acc"],
                  "henze_zirkler_p": metrics["normality"]["henze_zirkler_p"],
                  "wall_time_s": metrics["wall_time_s"]}
        trained_on = metrics["data"]["dataset"]
    except (KeyError, TypeError) as err:
        raise error(f"{run / 'metrics.json'} is damaged: it lacks the entry {err}") from err
    if trained_on != data["dataset"]:
        raise error(f"{name} was trained on {trained_on}, this run uses {data['dataset']}; "
                    f"pass --dataset {trained_on}")
    path = run / "embeddings.npz"
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in ("z_train", "y_train", "z_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise error(f"{path} is missing or damaged ({err or type(err).__name__})") from err
    for split, y in (("train", y_tr), ("test", y_te)):  # the same images in the same order
        z, labels = arrays[f"z_{split}"], arrays[f"y_{split}"]
        if len(labels) != len(y) or not np.array_equal(labels, y.cpu().numpy()):
            raise error(f"{name} embedded {len(labels)} {split} images, this run has {len(y)} "
                        "(or other ones: the labels differ); pass the encoder's --data-dir")
        if z.shape != (len(y), COND_DIM) or z.dtype.kind != "f" or not np.isfinite(z).all():
            raise error(f"{path}: z_{split} is {z.dtype} {z.shape}, expected finite floats of "
                        f"shape ({len(y)}, {COND_DIM})")
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


def build_gan(args: argparse.Namespace, device: torch.device) -> tuple:
    """G and D (channels-last on `device`) and their Adam optimizers, beta1 = 0.5 (DCGAN)."""
    gen = Generator(args.latent_dim, args.width).to(device).to(memory_format=torch.channels_last)
    disc = Discriminator(args.width).to(device).to(memory_format=torch.channels_last)
    return (gen, disc, torch.optim.Adam(gen.parameters(), lr=args.lr_g, betas=(0.5, 0.999)),
            torch.optim.Adam(disc.parameters(), lr=args.lr_d, betas=(0.5, 0.999)))


# --- Training -------------------------------------------------------------------------------
def gan_step(gen: Generator, disc: Discriminator, opt_g, opt_d, scaler, x: torch.Tensor,
             c: torch.Tensor, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """One D and one G update on real images x with conditions c, the non-saturating losses
    (Goodfellow et al.): D minimizes softplus(-D(x, c)) + softplus(D(G(z, c), c)), G minimizes
    softplus(-D(G(z, c), c)). One float16 loss scaler serves both (one update per step).
    Returns the two losses without syncing."""
    z = torch.randn(len(x), args.latent_dim, device=x.device)
    with common.autocast(x.device, args.amp):
        fake = gen(z, c)
        d_loss = (F.softplus(-disc(x, c).float()).mean()
                  + F.softplus(disc(fake.detach(), c).float()).mean())
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(d_loss).backward()
    scaler.step(opt_d)
    with common.autocast(x.device, args.amp):
        g_loss = F.softplus(-disc(fake, c).float()).mean()
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(g_loss).backward()
    scaler.step(opt_g)
    scaler.update()
    return d_loss.detach(), g_loss.detach()


def bench(args: argparse.Namespace, device: torch.device) -> None:
    """Print the time of one GAN step on synthetic images, with throw-away models and RNG."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        gen, disc, opt_g, opt_d = build_gan(args, device)
        x = torch.rand(args.batch_size, 1, 24, 24, device=device).contiguous(
            memory_format=torch.channels_last)
        c = torch.randn(args.batch_size, COND_DIM, device=device)
        dtype, why = common.precision(device, args.amp)
        for amp in (args.amp, dtype == torch.float32):  # this run's precision, then the other
            run = argparse.Namespace(**{**vars(args), "amp": amp})
            scaler = common.grad_scaler(device, amp)
            sec = common.time_per_step(
                lambda: gan_step(gen, disc, opt_g, opt_d, scaler, x, c, run), args.bench, device)
            print(f"{device.type} {common.precision_name(common.precision(device, amp)[0])}, "
                  f"batch {args.batch_size}, width {args.width}: {1e3 * sec:.1f} ms/step, "
                  f"{args.batch_size / sec:.0f} images/s; {args.steps} steps would take "
                  f"{sec * args.steps / 60:.1f} min", flush=True)
    print(f"the default (auto) picks {common.precision_name(common.precision(device)[0])}; "
          f"this run: {common.precision_name(dtype)}: {why}")


def train(gen: Generator, disc: Discriminator, opt_g, opt_d, scaler, x_tr: torch.Tensor,
          c_tr: torch.Tensor, args: argparse.Namespace, out: Path, start: int, history: list):
    """GAN steps from `start` to args.steps on (image, embedding) pairs of the training split,
    logging the mean (step, D loss, G loss) every --log-every steps and checkpointing every
    --ckpt-every steps; a non-finite loss stops the run (exit 3) before its checkpoint."""
    per_epoch, bs = len(x_tr) // args.batch_size, args.batch_size
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.quiet,
               desc="cGAN", dynamic_ncols=True, mininterval=common.progress_interval())
    d_losses, g_losses, saved_at = [], [], start
    gen.train()
    disc.train()
    for step in bar:
        epoch, k = divmod(step, per_epoch)
        if k == 0 or step == start:
            order = common.epoch_order(len(x_tr), args.seed, epoch, x_tr.device)
        idx = order[k * bs:(k + 1) * bs]
        d_loss, g_loss = gan_step(gen, disc, opt_g, opt_d, scaler, x_tr[idx], c_tr[idx], args)
        d_losses.append(d_loss)
        g_losses.append(g_loss)
        done = step + 1
        checkpoint = done % args.ckpt_every == 0 or done == args.steps
        if done % args.log_every == 0 or checkpoint:
            d, g = torch.stack(d_losses), torch.stack(g_losses)
            finite = (d.isfinite() & g.isfinite()).cpu()
            if not finite.all():
                first = done - len(finite) + int((~finite).nonzero()[0]) + 1
                kept = (f"the last good checkpoint (step {saved_at}) is kept in "
                        f"{out / 'checkpoint.pt'}" if saved_at else "no checkpoint was written yet")
                common.fail(f"the GAN loss became non-finite at step {first}; try a smaller "
                            f"--lr-g / --lr-d; {kept}", code=3)
            history.append([done, d.mean().item(), g.mean().item()])
            d_losses, g_losses = [], []
            bar.set_postfix(epoch=epoch, d_loss=f"{history[-1][1]:.3f}",
                            g_loss=f"{history[-1][2]:.3f}", refresh=False)
        if checkpoint:  # everything --resume needs
            common.atomic_save({"step": done, "models": {"generator": gen.state_dict(),
                                                         "discriminator": disc.state_dict()},
                                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                                "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
                                "history": history}, out / "checkpoint.pt")
            saved_at = done


# --- Evaluation: a digit classifier judges conditional and unconditional generations --------
def train_classifier(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> nn.Module:
    """The Table 2 ConvNet with 10 outputs, cross-entropy, Adam, --clf-epochs over (x, y), on its
    own seeded RNG: the same classifier whatever the GAN did."""
    batch = min(128, len(x))
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        clf = common.ConvEncoder(N_CLASSES).to(x.device).to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(clf.parameters(), lr=args.clf_lr)
        scaler = common.grad_scaler(x.device, args.amp)
        clf.train()
        for epoch in tqdm(range(args.clf_epochs), desc="classifier", disable=args.quiet,
                          mininterval=common.progress_interval()):
            order = common.epoch_order(len(x), args.seed + 1, epoch, x.device)
            for i in range(0, len(x) - batch + 1, batch):
                idx = order[i:i + batch]
                with common.autocast(x.device, args.amp):
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


def conditional_consistency(generate, classify, cond: torch.Tensor, labels: torch.Tensor,
                            batch_size: int = 1000) -> float:
    """Share of images generated from c_i = f(X_i) classified as the digit y_i of X_i: 1 for the
    source images, 1/10 for a generator that ignores c, E_c sum_y p(y | c)^2 for one that
    samples p(x | c) (below 1 where the 2-D embedding mixes digits)."""
    pred = predict(generate, classify, cond, batch_size).argmax(1)
    return float((pred == labels.to(pred.device)).float().mean())


def class_histogram(labels: np.ndarray) -> dict[str, Any]:
    """Share of each of the ten classes among `labels` and its Shannon entropy in nats (log 10
    for ten balanced classes)."""
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
        with common.autocast(x.device, args.amp):
            return clf(x.contiguous(memory_format=torch.channels_last)).float().softmax(1)

    def generate(c, rows):  # row i always gets latent vector i
        with common.autocast(c.device, args.amp):
            return gen(latent[rows], c).float()

    def first(cond, k):
        return generate(cond[:k], slice(0, len(cond[:k]))).cpu()

    cycle = torch.arange(n, device=device)
    sources = {"test_embeddings": c_te[cycle % len(c_te)],
               "train_embeddings": c_tr[cycle % len(c_tr)],
               "gaussian_prior": torch.randn(n, COND_DIM, generator=rng).to(device),
               "box_prior": args.box * (2 * torch.rand(n, COND_DIM, generator=rng) - 1).to(device)}
    probs = {name: predict(generate, classify, cond) for name, cond in sources.items()}
    reference = class_histogram(probs["test_embeddings"].argmax(1).cpu().numpy())["shares"]
    return {
        "classifier_accuracy": conditional_consistency(lambda c, rows: x_te[rows], classify,
                                                       c_te, y_te),
        "consistency": conditional_consistency(generate, classify, c_te, y_te),
        "retrieval_consistency": conditional_consistency(  # the nearest training embedding's image
            lambda c, rows: x_tr[torch.cdist(c, c_tr).argmin(1)], classify, c_te, y_te),
        "unconditional": {"n_samples": n, "box_half_width": args.box,
                          "test_labels": class_histogram(y_te.cpu().numpy()),
                          **{name: class_report(p, reference) for name, p in probs.items()}},
        "class_information": common.LOG10,
        "samples": {"real": x_te[:64].cpu(), "conditional": first(c_te, 64),
                    "gaussian_prior": first(sources["gaussian_prior"], 100),
                    "box_prior": first(sources["box_prior"], 100)},
    }


# --- Figures and the printed report ---------------------------------------------------------
def show_grid(ax: Any, images: torch.Tensor, nrow: int, title: str) -> None:
    """Images (N, 1, H, W) in [0, 1] as one grid, white digits on black as in MNIST."""
    ax.imshow(make_grid(images, nrow=nrow, padding=2, pad_value=0.5)[0].numpy(), cmap="gray",
              vmin=0, vmax=1)
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def figures(metrics: dict, samples: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Figure 3 (real test images beside their generations), Figure 4 (c ~ N(0, I)), the same
    from the mismatched prior, and the class histograms of every conditioning source."""
    plt = common.pyplot()
    unc, box = metrics["unconditional"], metrics["unconditional"]["box_half_width"]
    fig_cond, axes = plt.subplots(1, 2, figsize=(9, 4.8))
    show_grid(axes[0], samples["real"], 8, "real test images X")
    show_grid(axes[1], samples["conditional"], 8, "G(z, f(X)), same positions")
    fig_cond.suptitle(f"conditional generation: {100 * metrics['consistency']:.1f}% classified "
                      f"as the source digit (real images {100 * metrics['classifier_accuracy']:.1f}"
                      f"%, nearest training embedding {100 * metrics['retrieval_consistency']:.1f}"
                      "%)", fontsize=10)
    grids = {}
    for name, key, prior in (("unconditional.png", "gaussian_prior", "c ~ N(0, I)"),
                             ("mismatched.png", "box_prior", f"c ~ U[-{box:g}, {box:g}]^2")):
        grids[name], ax = plt.subplots(figsize=(5.5, 5.8))
        show_grid(ax, samples[key], 10, f"{prior}: class entropy {unc[key]['entropy']:.3f} nats "
                                        f"(log 10 = {common.LOG10:.3f}),\nTV to test embeddings "
                                        f"{unc[key]['tv_to_test_embeddings']:.3f}")
    fig_hist, ax = plt.subplots(figsize=(8, 4))
    sources = (("test_labels", "test labels"), ("test_embeddings", "c = f(X_test)"),
               ("train_embeddings", "c = f(X_train)"), ("gaussian_prior", "c ~ N(0, I)"),
               ("box_prior", f"c ~ U[-{box:g}, {box:g}]^2"))
    for i, (key, label) in enumerate(sources):
        ax.bar(np.arange(N_CLASSES) + (i - 2) * 0.16, unc[key]["shares"], width=0.16,
               label=f"{label}: H = {unc[key]['entropy']:.3f}")
    ax.axhline(1 / N_CLASSES, color="k", ls=":", lw=1)
    ax.set(xticks=range(N_CLASSES), xlabel="class predicted by the classifier (true label for "
           "the test images)", ylabel="share", title=f"classes of {unc['n_samples']} generations "
           f"per conditioning source (log 10 = {common.LOG10:.3f} nats)")
    ax.legend(fontsize=8)
    return {"conditional.png": fig_cond, **grids, "classes.png": fig_hist}


def report(metrics: dict) -> str:
    """The end-of-run report: the classifier, conditional consistency, the class histograms."""
    unc = metrics["unconditional"]
    rows = "".join(f"\n  {key:16s}  H = {unc[key]['entropy']:.3f}   TV = "
                   f"{unc[key]['tv_to_test_embeddings']:.3f}   confidence "
                   f"{unc[key]['confidence']:.3f}" for key in ("test_embeddings",
                   "train_embeddings", "gaussian_prior", "box_prior"))
    return (f"classifier test accuracy {metrics['classifier_accuracy']:.4f} (the ceiling of "
            f"consistency)\nconditional consistency {metrics['consistency']:.4f}   (nearest "
            f"training embedding {metrics['retrieval_consistency']:.4f}, chance 0.1)\n"
            f"unconditional, {unc['n_samples']} samples: class entropy (log 10 = "
            f"{common.LOG10:.3f}), TV distance to the test embeddings' histogram, classifier "
            f"confidence{rows}\n"
            f"wall time {metrics['wall_time_s']:.0f} s ({metrics['steps']} GAN steps)")


# --- One run --------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict | None:
    """Data, the encoder's conditions (trained into OUT/encoder unless --encoder), the GAN,
    evaluation, saving. Damaged or mismatched files raise DataError."""
    device = common.pick_device(args.device)
    if args.bench:
        return bench(args, device)
    dtype, why = common.precision(device, args.amp)
    print(f"{common.precision_name(dtype)}: {why}")
    out = Path(args.out)
    if args.resume and (out / "metrics.json").is_file():
        metrics = common.read_json(out / "metrics.json")
        print(f"{out} is finished:\n" + report(metrics))
        return metrics
    started, ckpt = time.time(), None
    if args.resume and (out / "checkpoint.pt").exists():  # read before anything is written
        ckpt = common.load_run_file(out / "checkpoint.pt", device, (
            "step", "models", "opt_g", "opt_d", "scaler", "rng", "history"))
    x_tr, y_tr, x_te, y_te, data = common.load_data(args.dataset, args.data_dir,
                                                    download=not args.no_download)
    if "note" in data:
        print(data["note"])
    x_tr, x_te = (x.to(device).contiguous(memory_format=torch.channels_last) for x in (x_tr, x_te))
    y_tr, y_te = y_tr.to(device), y_te.to(device)
    if args.batch_size > len(x_tr):
        common.fail(f"--batch-size {args.batch_size} exceeds the {len(x_tr)} training images")
    if args.epochs is not None:
        args.steps = args.epochs * (len(x_tr) // args.batch_size)
    if args.encoder:  # checked before anything is written
        encoder, c_tr, c_te = read_encoder_run(Path(args.encoder), data, y_tr, y_te)
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        common.write_json({k: v for k, v in vars(args).items() if k not in common.RUNTIME_FLAGS},
                          out / "args.json")
    if not args.encoder:
        train_encoder(args, out / "encoder")
        encoder, c_tr, c_te = read_encoder_run(out / "encoder", data, y_tr, y_te)
    torch.manual_seed(args.seed)
    gen, disc, opt_g, opt_d = build_gan(args, device)
    scaler = common.grad_scaler(device, args.amp)  # float16 only; a pass-through otherwise
    start, history = 0, []
    if ckpt is not None:
        try:
            for part, state in ((gen, ckpt["models"]["generator"]),
                                (disc, ckpt["models"]["discriminator"]),
                                (opt_g, ckpt["opt_g"]), (opt_d, ckpt["opt_d"])):
                part.load_state_dict(state)
            scaler.load_state_dict(ckpt["scaler"])
            torch.set_rng_state(ckpt["rng"].cpu())
            start, history = int(ckpt["step"]), list(ckpt["history"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise common.DataError(f"{out / 'checkpoint.pt'} does not fit this run's models "
                                   f"({str(err).splitlines()[0]})") from err
        print(f"resuming {out} at step {start}")
    train(gen, disc, opt_g, opt_d, scaler, x_tr, c_tr, args, out, start, history)
    clf = train_classifier(x_tr, y_tr, args)
    metrics = evaluate(gen, clf, (x_tr, c_tr, x_te, y_te, c_te), args)
    samples = metrics.pop("samples")
    metrics.update(encoder=encoder, data=data, steps=args.steps, batch_size=args.batch_size,
                   seed=args.seed, clf_epochs=args.clf_epochs, device=str(device),
                   precision={"dtype": common.precision_name(dtype), "why": why},
                   wall_time_s=time.time() - started, train_history=history)
    common.atomic_save({"models": {"generator": gen.state_dict(),
                                   "discriminator": disc.state_dict()}, "args": vars(args)},
                       out / "model.pt")
    for name, fig in figures(metrics, samples).items():
        common.save_figure(fig, out / name)
    common.write_json(metrics, out / "metrics.json")
    print(report(metrics) + f"\nsaved to {out}")
    return metrics


def main(argv: list[str] | None = None) -> dict | None:
    """Parse the flags and do one run; a damaged or mismatched file ends in one line, exit 2."""
    args = parse_args(argv)
    try:
        return run(args)
    except common.DataError as err:
        common.fail(str(err))


if __name__ == "__main__":
    main()

"""Conditional generation from Gaussian DIM embeddings (Appendix D), measured.

A conditional GAN (Mirza & Osindero, 2014) learns to generate MNIST digits from a latent vector
and a conditioning vector c = f(X): the 2-D embedding of the image by a noise-injected encoder
(mnist_gauss.py; Appendix D uses sigma = 0.1). Conditional generation embeds real images and
generates from their embeddings (Figure 3). Since the encoder was trained to make f(X) ~ N(0, I),
unconditional generation only needs c ~ N(0, I) (Figure 4). A digit classifier trained on the
same images measures both: the share of generations classified as the digit of their source image
(conditional consistency), and the class histogram of unconditional samples against the one from
real embeddings and the one from a mismatched prior U[-a, a]^2.

    python cgan.py                                  # trains the encoder first; minutes on a CPU
    python cgan.py --encoder runs/mnist_gauss/RUN   # a finished mnist_gauss.py run with d = 2
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import make_grid
from tqdm import tqdm

import mnist_gauss
from common import (
    LOG10,
    RUNTIME_FLAGS,
    ConvEncoder,
    add_data_flags,
    atomic_save,
    autocast,
    embed_train_test,
    epoch_order,
    fail,
    nonnegative_float,
    pick_device,
    positive_float,
    positive_int,
    pyplot,
    read_json,
    resolve_out,
    run_data,
    save_figure,
    time_per_step,
    write_json,
)

N_CLASSES = 10
COND_DIM = 2
"""Appendix D conditions on the two-dimensional embeddings."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--encoder", default=None, metavar="RUN_DIR",
                   help="a finished mnist_gauss.py run with --dim 2 whose embeddings condition "
                        "the GAN; None: train one first into OUT/encoder")
    p.add_argument("--sigma", type=nonnegative_float, default=0.1,
                   help="noise of the encoder trained when --encoder is not given (Appendix D)")
    p.add_argument("--encoder-steps", type=int, default=2000,
                   help="training steps of that encoder (mnist_gauss.py's default)")
    p.add_argument("--steps", type=int, default=6000,
                   help="GAN steps of one D and one G update (6000 x 128 images: 96 passes over "
                        "the 8k-image MNIST split)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="train the GAN for this many passes over the training set instead")
    p.add_argument("--batch-size", type=positive_int, default=128, help="GAN batch size")
    p.add_argument("--lr-g", type=positive_float, default=2e-4,
                   help="Adam learning rate of the generator (DCGAN, Radford et al.)")
    p.add_argument("--lr-d", type=positive_float, default=2e-4,
                   help="Adam learning rate of the discriminator (DCGAN)")
    p.add_argument("--latent-dim", type=positive_int, default=64,
                   help="size of the generator's latent noise vector")
    p.add_argument("--width", type=positive_int, default=64,
                   help="channels of the first discriminator / last generator conv layer")
    p.add_argument("--clf-epochs", type=positive_int, default=5,
                   help="epochs of the digit classifier that judges the generations (5: 98.4%% "
                        "test accuracy on the 8k/2k MNIST split)")
    p.add_argument("--clf-lr", type=positive_float, default=1e-3,
                   help="Adam learning rate of the classifier")
    p.add_argument("--n-samples", type=positive_int, default=10000,
                   help="unconditional samples per prior for the class histograms")
    p.add_argument("--box", type=positive_float, default=3.0,
                   help="half-width a of the mismatched prior U[-a, a]^2")
    p.add_argument("--seed", type=int, default=0, help="fixes data order, noise and init")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    add_data_flags(p, note="; must match the encoder's")
    p.add_argument("--out", default=None,
                   help="run directory; None: a new directory under runs/cgan/")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (and the encoder training in OUT/encoder)")
    p.add_argument("--log-every", type=positive_int, default=50, help="progress update interval")
    p.add_argument("--ckpt-every", type=positive_int, default=500, help="checkpoint interval")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast for G, D and the classifier (a GAN step ran 1.8x faster "
                        "than float32 on a Xeon core with native bf16); --no-amp: float32")
    p.add_argument("--bench", type=positive_int, default=0, metavar="N",
                   help="time N GAN steps on synthetic data, print ms/step, and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    resolve_out(p, args, f"runs/cgan/seed{args.seed}")
    if args.steps < 0:
        p.error("--steps must be >= 0")
    if args.encoder_steps < 0:
        p.error("--encoder-steps must be >= 0")
    return args


# --------------------------------------------------------------------------------------------
# Data: images and their conditioning vectors c = f(X)
# --------------------------------------------------------------------------------------------

def encoder_args(run: Path, dataset: str) -> argparse.Namespace:
    """The settings of a finished mnist_gauss.py run with d = 2 on `dataset`; one-line exit else.

    Read as mnist_gauss.py --resume reads them, so flags added since the run get their defaults.
    """
    if not run.is_dir():
        fail(f"--encoder {run}: no such run directory")
    if not (run / "args.json").is_file() or not (run / "model.pt").is_file():
        fail(f"--encoder {run} is not an mnist_gauss.py run directory (args.json, model.pt)")
    saved = read_json(run / "args.json")
    if "sigma" not in saved:
        fail(f"--encoder {run} is not a Gaussian (mnist_gauss.py) run: Appendix D conditions on "
             "embeddings matched to N(0, I)")
    if saved.get("dim") != COND_DIM:
        fail(f"--encoder {run} has --dim {saved.get('dim')}; Appendix D conditions on 2-D "
             "embeddings (mnist_gauss.py --dim 2)")
    if not (run / "metrics.json").is_file():
        fail(f"--encoder {run} is unfinished (no metrics.json); finish it with "
             f"python mnist_gauss.py --resume --out {run}")
    trained_on = read_json(run / "metrics.json")["data"]["dataset"]
    if trained_on != dataset:
        fail(f"--encoder {run} was trained on {trained_on}, this run uses {dataset}; "
             f"pass --dataset {trained_on}")
    return mnist_gauss.parse_args(["--out", str(run), "--resume", "--quiet"])


def train_encoder(args: argparse.Namespace, run: Path) -> None:
    """mnist_gauss.py with --sigma, --dim 2 and --encoder-steps into `run`: resumed if started,
    reused if finished."""
    if (run / "metrics.json").is_file():
        print(f"encoder: the finished run in {run}")
        return
    argv = ["--sigma", str(args.sigma), "--dim", str(COND_DIM),
            "--steps", str(args.encoder_steps), "--seed", str(args.seed),
            "--dataset", args.dataset, "--device", args.device, "--out", str(run),
            "--amp" if args.amp else "--no-amp"]
    argv += ["--data-dir", args.data_dir] if args.data_dir else []
    argv += ["--no-download"] * args.no_download + ["--quiet"] * args.quiet
    if (run / "args.json").is_file():
        argv = ["--out", str(run), "--resume", "--device", args.device] + ["--quiet"] * args.quiet
    print(f"encoder: python mnist_gauss.py {' '.join(argv)}", flush=True)
    mnist_gauss.main(argv)


def conditioning_vectors(run: Path, enc: argparse.Namespace, x_tr: torch.Tensor,
                         x_te: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c = f(X) for the train and test images: the encoder's clean eval-mode embeddings.

    They are exactly the test embeddings mnist_gauss.py evaluates (BatchNorm statistics
    recomputed on the clean training images, no noise, float32).
    """
    models = mnist_gauss.build_models(enc, x_tr.device)
    models.load_state_dict(torch.load(run / "model.pt", map_location=x_tr.device,
                                      weights_only=True)["models"])
    c_tr, c_te = embed_train_test(models, x_tr, x_te, enc.batch_size)
    return torch.from_numpy(c_tr).to(x_tr.device), torch.from_numpy(c_te).to(x_tr.device)


# --------------------------------------------------------------------------------------------
# Models: a DCGAN-style conditional generator and discriminator on 1x24x24 images
# --------------------------------------------------------------------------------------------

class Generator(nn.Module):
    """G(z, c): latent z and condition c -> a 1x24x24 image in [0, 1].

    The condition is concatenated with z (Mirza & Osindero) after a small MLP has lifted the two
    numbers to the size of z, so that from the start they carry as much weight as the noise.
    Then DCGAN (Radford et al.): dense to 2w x 6 x 6, two stride-2 transposed convolutions to
    24 x 24, the size of the encoder's and the classifier's center crops.
    """

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
    """D(x, c) = psi(phi(x)) + <e(c), phi(x)>: the logit that x is a real image with condition c.

    phi: two stride-2 convolutions (DCGAN) and a dense layer; the condition enters through the
    projection <e(c), phi(x)> (Miyato & Koyama, 2018), a product of image and condition
    features, so D can check that they belong together (a sum of separate terms could not).
    """

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


def build_gan(args: argparse.Namespace, device: torch.device) -> tuple[Generator, Discriminator]:
    """The run's generator and discriminator on `device`, channels-last."""
    gen = Generator(args.latent_dim, args.width).to(device)
    disc = Discriminator(args.width).to(device)
    return (gen.to(memory_format=torch.channels_last),
            disc.to(memory_format=torch.channels_last))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def make_gan_step(gen: Generator, disc: Discriminator, opt_g: torch.optim.Optimizer,
                  opt_d: torch.optim.Optimizer, args: argparse.Namespace
                  ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One D update and one G update on real images x with their conditions c.

    Non-saturating GAN losses (Goodfellow et al.): D minimizes softplus(-D(x, c)) +
    softplus(D(G(z, c), c)), G minimizes softplus(-D(G(z, c), c)); the fakes carry the real
    batch's conditions. Returns the two losses without syncing.
    """
    def step(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(len(x), args.latent_dim, device=x.device)
        with autocast(x.device, args.amp):
            fake = gen(z, c)
            d_loss = (F.softplus(-disc(x, c).float()).mean()
                      + F.softplus(disc(fake.detach(), c).float()).mean())
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        with autocast(x.device, args.amp):
            g_loss = F.softplus(-disc(fake, c).float()).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        return d_loss.detach(), g_loss.detach()
    return step


def make_optimizers(gen: Generator, disc: Discriminator, args: argparse.Namespace
                    ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Adam with beta1 = 0.5 for both players (DCGAN)."""
    return (torch.optim.Adam(gen.parameters(), lr=args.lr_g, betas=(0.5, 0.999)),
            torch.optim.Adam(disc.parameters(), lr=args.lr_d, betas=(0.5, 0.999)))


def bench(args: argparse.Namespace, device: torch.device) -> None:
    """Print the time of one GAN step on synthetic images, with throw-away models and RNG."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        gen, disc = build_gan(args, device)
        step = make_gan_step(gen, disc, *make_optimizers(gen, disc, args), args)
        x = torch.rand(args.batch_size, 1, 24, 24, device=device).contiguous(
            memory_format=torch.channels_last)
        c = torch.randn(args.batch_size, COND_DIM, device=device)
        sec = time_per_step(lambda: step(x, c), args.bench, device)
    precision = "bf16 autocast" if args.amp else "float32"
    print(f"{device.type} ({precision}), batch {args.batch_size}, width {args.width}: "
          f"{1e3 * sec:.1f} ms/step, {args.batch_size / sec:.0f} images/s; "
          f"{args.steps} steps would take {sec * args.steps / 60:.1f} min")


def save_checkpoint(out: Path, gen: Generator, disc: Discriminator, opts: tuple, step: int,
                    history: list) -> None:
    """Everything --resume needs: both players, both optimizers, the RNG state, the log."""
    atomic_save({"step": step, "generator": gen.state_dict(), "discriminator": disc.state_dict(),
                 "opt_g": opts[0].state_dict(), "opt_d": opts[1].state_dict(),
                 "rng": torch.get_rng_state(), "history": history}, out / "checkpoint.pt")


def load_checkpoint(out: Path, gen: Generator, disc: Discriminator, opts: tuple,
                    device: torch.device) -> tuple[int, list]:
    """Restore a checkpoint written by save_checkpoint; returns (step, history)."""
    ckpt = torch.load(out / "checkpoint.pt", map_location=device, weights_only=False)
    gen.load_state_dict(ckpt["generator"])
    disc.load_state_dict(ckpt["discriminator"])
    opts[0].load_state_dict(ckpt["opt_g"])
    opts[1].load_state_dict(ckpt["opt_d"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt["history"]


def train(gen: Generator, disc: Discriminator, opts: tuple, x_tr: torch.Tensor,
          c_tr: torch.Tensor, args: argparse.Namespace, out: Path, start: int,
          history: list) -> None:
    """GAN steps from `start` to args.steps on (image, embedding) pairs of the training split.

    Logs the mean (step, D loss, G loss) every --log-every steps, checkpoints every --ckpt-every
    steps, and stops with exit code 3 (keeping the last good checkpoint) on a non-finite loss.
    """
    per_epoch = len(x_tr) // args.batch_size
    step_fn = make_gan_step(gen, disc, *opts, args)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.quiet,
               desc="cGAN", dynamic_ncols=True)
    d_losses, g_losses = [], []
    gen.train()
    disc.train()
    for step in bar:
        epoch, k = divmod(step, per_epoch)
        if k == 0 or step == start:
            order = epoch_order(len(x_tr), args.seed, epoch, x_tr.device)
        idx = order[k * args.batch_size:(k + 1) * args.batch_size]
        d_loss, g_loss = step_fn(x_tr[idx], c_tr[idx])
        d_losses.append(d_loss)
        g_losses.append(g_loss)
        done = step + 1
        if done % args.log_every == 0 or done % args.ckpt_every == 0 or done == args.steps:
            mean_d = torch.stack(d_losses).mean().item()
            mean_g = torch.stack(g_losses).mean().item()
            d_losses, g_losses = [], []
            if not (math.isfinite(mean_d) and math.isfinite(mean_g)):
                fail(f"the GAN loss became {mean_d} (D) / {mean_g} (G) at step {done}; the last "
                     f"good checkpoint is kept in {out / 'checkpoint.pt'}", code=3)
            history.append([done, mean_d, mean_g])
            bar.set_postfix(epoch=epoch, d_loss=f"{mean_d:.3f}", g_loss=f"{mean_g:.3f}",
                            refresh=False)
        if done % args.ckpt_every == 0 or done == args.steps:
            save_checkpoint(out, gen, disc, opts, done, history)


# --------------------------------------------------------------------------------------------
# Evaluation: a digit classifier judges conditional and unconditional generations
# --------------------------------------------------------------------------------------------

def train_classifier(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> nn.Module:
    """The Table 2 ConvNet with 10 outputs, cross-entropy, Adam, --clf-epochs over (x, y).

    Its own seeded RNG, so it is the same classifier whatever the GAN did.
    """
    batch = min(128, len(x))
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        clf = ConvEncoder(N_CLASSES).to(x.device).to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(clf.parameters(), lr=args.clf_lr)
        clf.train()
        for epoch in tqdm(range(args.clf_epochs), desc="classifier", disable=args.quiet):
            order = epoch_order(len(x), args.seed + 1, epoch, x.device)
            for i in range(0, len(x) - batch + 1, batch):
                idx = order[i:i + batch]
                with autocast(x.device, args.amp):
                    loss = F.cross_entropy(clf(x[idx]).float(), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return clf.eval()


def probabilities(clf: nn.Module, amp: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> class probabilities (N, 10) under the classifier, in eval mode, no gradient."""
    @torch.no_grad()
    def classify(x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, amp):
            return clf(x.contiguous(memory_format=torch.channels_last)).float().softmax(1)
    return classify


def sampler(gen: Generator, latent: torch.Tensor, amp: bool
            ) -> Callable[[torch.Tensor, slice], torch.Tensor]:
    """(conditions, rows) -> G(latent[rows], conditions) in eval mode: fixed noise per row."""
    @torch.no_grad()
    def generate(c: torch.Tensor, rows: slice) -> torch.Tensor:
        gen.eval()
        with autocast(c.device, amp):
            return gen(latent[rows], c).float()
    return generate


def predict(generate: Callable[[torch.Tensor, slice], torch.Tensor],
            classify: Callable[[torch.Tensor], torch.Tensor], cond: torch.Tensor,
            batch_size: int = 1000) -> torch.Tensor:
    """Class probabilities (N, 10) of the images generated from each row of `cond`.

    generate(c, rows) maps the conditions c = cond[rows] to images; classify maps images to
    class probabilities.
    """
    rows = [slice(i, min(i + batch_size, len(cond))) for i in range(0, len(cond), batch_size)]
    return torch.cat([classify(generate(cond[r], r)) for r in rows])


def conditional_consistency(generate: Callable[[torch.Tensor, slice], torch.Tensor],
                            classify: Callable[[torch.Tensor], torch.Tensor],
                            cond: torch.Tensor, labels: torch.Tensor,
                            batch_size: int = 1000) -> float:
    """Share of images generated from c_i = f(X_i) that are classified as the digit y_i of X_i.

    1 for a generator that returns the source images (and a perfect classifier); 1/10 for one
    that ignores c (balanced classes). A perfect conditional generator samples p(x | c) and scores
    E_c sum_y p(y | c)^2, below 1 where the 2-D embedding mixes digits.
    """
    pred = predict(generate, classify, cond, batch_size).argmax(1)
    return float((pred == labels.to(pred.device)).float().mean())


def entropy(shares: np.ndarray) -> float:
    """Shannon entropy in nats of a class distribution (log 10 for ten balanced classes)."""
    nonzero = shares[shares > 0]
    return float((nonzero * np.log(1 / nonzero)).sum())


def class_shares(labels: np.ndarray) -> np.ndarray:
    """Share of each of the ten classes among `labels`."""
    return np.bincount(labels, minlength=N_CLASSES) / len(labels)


def class_report(probs: torch.Tensor, reference: np.ndarray) -> dict[str, Any]:
    """Class shares of the argmax predictions, their entropy, the total variation distance to the
    `reference` shares, and the classifier's mean confidence (mean of the largest probability)."""
    shares = class_shares(probs.argmax(1).cpu().numpy())
    return {"shares": shares.tolist(), "entropy": entropy(shares),
            "tv_to_test_embeddings": float(0.5 * np.abs(shares - reference).sum()),
            "confidence": float(probs.max(1).values.mean())}


def evaluate(gen: Generator, clf: nn.Module, data: tuple, args: argparse.Namespace) -> dict:
    """Classifier accuracy, conditional consistency (with a retrieval reference), and the class
    histograms of generations conditioned on real embeddings, on N(0, I) and on U[-a, a]^2.

    Every source shares the same latent vectors, so that only the conditions differ. The train
    embeddings' histogram shows how far two sets of real embeddings already differ.
    """
    x_tr, _, c_tr, x_te, y_te, c_te = data
    device, n = x_te.device, args.n_samples
    classify = probabilities(clf, args.amp)
    rng = torch.Generator().manual_seed(args.seed + 2)
    generate = sampler(gen, torch.randn(max(n, len(c_te)), args.latent_dim, generator=rng)
                       .to(device), args.amp)
    cycle = torch.arange(n, device=device)
    sources = {"test_embeddings": c_te[cycle % len(c_te)],
               "train_embeddings": c_tr[cycle % len(c_tr)],
               "gaussian_prior": torch.randn(n, COND_DIM, generator=rng).to(device),
               "box_prior": args.box * (2 * torch.rand(n, COND_DIM, generator=rng) - 1).to(device)}
    probs = {name: predict(generate, classify, cond) for name, cond in sources.items()}
    reference = class_shares(probs["test_embeddings"].argmax(1).cpu().numpy())
    test_labels = class_shares(y_te.cpu().numpy())

    def nearest_training_image(c: torch.Tensor, rows: slice) -> torch.Tensor:
        return x_tr[torch.cdist(c, c_tr).argmin(1)]

    def first(cond: torch.Tensor, k: int) -> torch.Tensor:
        return generate(cond[:k], slice(0, len(cond[:k]))).cpu()

    return {
        "classifier_accuracy": conditional_consistency(lambda c, rows: x_te[rows], classify,
                                                       c_te, y_te),
        "consistency": conditional_consistency(generate, classify, c_te, y_te),
        "retrieval_consistency": conditional_consistency(nearest_training_image, classify, c_te,
                                                         y_te),
        "unconditional": {"n_samples": n, "box_half_width": args.box,
                          "test_labels": {"shares": test_labels.tolist(),
                                          "entropy": entropy(test_labels)},
                          **{name: class_report(p, reference) for name, p in probs.items()}},
        "class_information": LOG10,
        "samples": {"real": x_te[:64].cpu(), "conditional": first(c_te, 64),
                    "gaussian_prior": first(sources["gaussian_prior"], 100),
                    "box_prior": first(sources["box_prior"], 100)},
    }


# --------------------------------------------------------------------------------------------
# Figures and saving
# --------------------------------------------------------------------------------------------

def show_grid(ax: Any, images: torch.Tensor, nrow: int, title: str) -> None:
    """Images (N, 1, H, W) in [0, 1] as one grid, white digits on black as in MNIST."""
    ax.imshow(make_grid(images, nrow=nrow, padding=2, pad_value=0.5)[0].numpy(), cmap="gray",
              vmin=0, vmax=1)
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def figures(metrics: dict, samples: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Figure 3 (real test images beside their generations), Figure 4 (c ~ N(0, I)), the same
    from the mismatched prior, and the class histograms of every conditioning source."""
    plt = pyplot()
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
        fig, ax = plt.subplots(figsize=(5.5, 5.8))
        show_grid(ax, samples[key], 10, f"{prior}: class entropy {unc[key]['entropy']:.3f} nats "
                                        f"(log 10 = {LOG10:.3f}),\nTV to test embeddings "
                                        f"{unc[key]['tv_to_test_embeddings']:.3f}")
        grids[name] = fig
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
           f"per conditioning source (log 10 = {LOG10:.3f} nats)")
    ax.legend(fontsize=8)
    return {"conditional.png": fig_cond, **grids, "classes.png": fig_hist}


def summary(metrics: dict) -> str:
    """The end-of-run report: the classifier, conditional consistency, the class histograms."""
    unc = metrics["unconditional"]
    lines = [f"classifier test accuracy {metrics['classifier_accuracy']:.4f} (the ceiling of "
             f"consistency)",
             f"conditional consistency {metrics['consistency']:.4f}   (nearest training "
             f"embedding {metrics['retrieval_consistency']:.4f}, chance 0.1)",
             f"unconditional, {unc['n_samples']} samples: class entropy (log 10 = {LOG10:.3f}), "
             "TV distance to the test embeddings' histogram, classifier confidence"]
    for key in ("test_embeddings", "train_embeddings", "gaussian_prior", "box_prior"):
        lines.append(f"  {key:16s}  H = {unc[key]['entropy']:.3f}   TV = "
                     f"{unc[key]['tv_to_test_embeddings']:.3f}   "
                     f"confidence {unc[key]['confidence']:.3f}")
    lines.append(f"wall time {metrics['wall_time_s']:.0f} s ({metrics['steps']} GAN steps)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    """One run: data, encoder (trained into OUT/encoder unless --encoder), GAN, evaluation."""
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.bench:
        bench(args, device)
        return None
    out = Path(args.out)
    if args.resume and (out / "metrics.json").is_file():
        metrics = read_json(out / "metrics.json")
        print(f"{out} is finished:\n" + summary(metrics))
        return metrics
    started = time.time()
    (x_tr, y_tr, x_te, y_te), data_info = run_data(args, device)
    if args.batch_size > len(x_tr):
        fail(f"--batch-size {args.batch_size} exceeds the {len(x_tr)} training images")
    if args.epochs is not None:
        args.steps = args.epochs * (len(x_tr) // args.batch_size)
    encoder_run = Path(args.encoder) if args.encoder else out / "encoder"
    if args.encoder:
        encoder_args(encoder_run, data_info["dataset"])
    out.mkdir(parents=True, exist_ok=True)
    write_json({k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS}, out / "args.json")
    if not args.encoder:
        train_encoder(args, encoder_run)
    enc = encoder_args(encoder_run, data_info["dataset"])
    c_tr, c_te = conditioning_vectors(encoder_run, enc, x_tr, x_te)

    torch.manual_seed(args.seed)
    gen, disc = build_gan(args, device)
    opts = make_optimizers(gen, disc, args)
    start, history = 0, []
    if args.resume and (out / "checkpoint.pt").is_file():
        start, history = load_checkpoint(out, gen, disc, opts, device)
        print(f"resuming {out} at step {start}")
    train(gen, disc, opts, x_tr, c_tr, args, out, start, history)

    clf = train_classifier(x_tr, y_tr, args)
    metrics = evaluate(gen, clf, (x_tr, y_tr, c_tr, x_te, y_te, c_te), args)
    samples = metrics.pop("samples")
    encoder_metrics = read_json(encoder_run / "metrics.json")
    metrics.update(
        encoder={"run": str(encoder_run), "sigma": enc.sigma, "dim": enc.dim,
                 "steps": enc.steps, "critic": enc.critic, "capacity": encoder_metrics["capacity"],
                 "mi_heldout": encoder_metrics["mi_heldout"],
                 "knn_acc": encoder_metrics["downstream"]["knn_acc"],
                 "henze_zirkler_p": encoder_metrics["normality"]["henze_zirkler_p"],
                 "wall_time_s": encoder_metrics["wall_time_s"]},
        data=data_info, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
        clf_epochs=args.clf_epochs, device=str(device), wall_time_s=time.time() - started,
        train_history=history)
    atomic_save({"generator": gen.state_dict(), "discriminator": disc.state_dict(),
                 "args": vars(args)}, out / "model.pt")
    for name, fig in figures(metrics, samples).items():
        save_figure(fig, out / name)
    write_json(metrics, out / "metrics.json")
    print(summary(metrics) + f"\nsaved to {out}")
    return metrics


if __name__ == "__main__":
    main()

"""Gaussian distribution matching on MNIST with Noise-Injected Deep InfoMax (Section 5).

Train the Table 2 ConvNet f to maximize I(f(X'); f(X) + Z): X' = X + N(0, 0.6^2) pixel noise,
f(X) normalized by BatchNorm and Z ~ N(0, sigma^2 I) (Theorem 3.4). The embeddings f(X) then
approach N(0, I). The run ends with the capacity C (eq. 5), the held-out MI estimate, the DM gap
C - I_hat (a bound on D_KL(f(X) + Z || N(0, (1 + sigma^2) I)), Lemma B.1), normality tests,
downstream accuracies and a Figure 2 scatter, all saved in --out.

    python mnist_gauss.py --sigma 0.6           # minutes on a laptop CPU
    python mnist_gauss.py --sigma 0.6 --paper   # Table 2 / Appendix C settings
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common import (LOG10, LOSSES, BilinearCritic, ConcatCritic, ConvEncoder, DataError,
                    GaussianCritic, GaussianNoise, SeparableCritic, atomic_save, autocast,
                    downstream_report, gaussian_capacity, load_data, normality_report,
                    pick_device, recompute_bn_stats, save_figure, scatter_embeddings,
                    time_per_step, write_json)

PAPER = {"batch_size": 1024, "epochs": 2000, "steps": None, "critic": "concat", "loss": "infonce",
         "lr": 1e-3, "aug_sigma": 0.6}
"""Appendix C: batch 1024, 2000 epochs, Adam 1e-3, Table 2 critic, InfoNCE, pixel noise 0.6."""
RUNTIME_FLAGS = ("out", "resume", "device", "quiet", "bench", "compile")
"""Flags that --resume takes from the command line; every other setting comes from args.json."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sigma", type=nonnegative_float, default=0.5,
                   help="std of the injected noise Z ~ N(0, sigma^2 I) (Theorem 3.4); 0: plain DIM")
    p.add_argument("--dim", type=positive_int, default=2,
                   help="embedding dimension d (Figure 1: 2)")
    p.add_argument("--aug-sigma", type=nonnegative_float, default=0.6,
                   help="std of the pixel noise X -> X' (Appendix C: 0.6)")
    p.add_argument("--critic", choices=["gaussian", "concat", "separable", "bilinear"],
                   default="gaussian",
                   help="gaussian: the parameter-free Theorem 4.1 critic (needs sigma > 0); "
                        "concat: Table 2 (the paper's); separable/bilinear: Tschannen et al.")
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
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist", "mnist-test-split"],
                   default="mnist",
                   help="mnist falls back to the shipped MNIST test split (8k/2k) when the full "
                        "set is neither on disk nor downloadable")
    p.add_argument("--data-dir", default=None, help="folder with the IDX files (optionally .gz)")
    p.add_argument("--no-download", action="store_true", help="never try to download data")
    p.add_argument("--out", default=None,
                   help="run directory (default: runs/mnist_gauss/sigma<S>_seed<N>_<time>)")
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
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (CUDA)")
    p.add_argument("--bench", type=positive_int, default=0, metavar="N",
                   help="time N training steps on synthetic data, print ms/step, and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--paper", action="store_true",
                   help="the paper's settings: " + ", ".join(f"{k}={v}" for k, v in PAPER.items()))
    args = p.parse_args(argv)
    if args.paper:
        vars(args).update(PAPER)
    if args.resume:
        if args.out is None or not (Path(args.out) / "args.json").is_file():
            p.error("--resume needs --out pointing at a run directory with args.json")
        saved = json.loads((Path(args.out) / "args.json").read_text())
        vars(args).update({k: v for k, v in saved.items() if k not in RUNTIME_FLAGS})
    elif args.out is not None and Path(args.out).exists() and any(Path(args.out).iterdir()):
        p.error(f"--out {args.out} already holds files; pass --resume to continue that run "
                "or choose another directory")
    elif args.out is None:
        stem = (f"runs/mnist_gauss/sigma{args.sigma:g}_seed{args.seed}_"
                f"{time.strftime('%Y%m%d-%H%M%S')}")
        args.out = next(name for name in (stem, *(f"{stem}-{i}" for i in range(2, 1000)))
                        if not Path(name).exists())
    if args.critic == "gaussian" and args.sigma == 0:
        p.error("--critic gaussian (Theorem 4.1) divides by sigma^2: use --sigma > 0 or a learned "
                "critic (--critic separable / concat / bilinear)")
    if args.steps is not None and args.steps < 0:
        p.error("--steps must be >= 0")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    return args


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and a non-zero exit: bad input is not a stack trace."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def build_models(args: argparse.Namespace, device: torch.device) -> nn.ModuleDict:
    """Encoder f, noise head (BN + Z) and critic T, in one ModuleDict for checkpoints."""
    critics = {"gaussian": lambda: GaussianCritic(args.sigma),
               "concat": lambda: ConcatCritic(args.dim),
               "separable": lambda: SeparableCritic(args.dim),
               "bilinear": lambda: BilinearCritic(args.dim)}
    models = nn.ModuleDict({"encoder": ConvEncoder(args.dim),
                            "head": GaussianNoise(args.dim, args.sigma),
                            "critic": critics[args.critic]()})
    return models.to(device).to(memory_format=torch.channels_last)


def loss_function(args: argparse.Namespace):
    loss = LOSSES[args.loss]
    return partial(loss, weight=args.reg_weight) if args.loss in ("redv", "renwj") else loss


def objective(models: nn.ModuleDict, x: torch.Tensor, args: argparse.Namespace,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, MI estimate) of I(f(X'); f(X) + Z) on one batch of clean images x."""
    x_aug = x + args.aug_sigma * torch.randn_like(x)
    with autocast(device, args.amp):
        f, f_aug = models["encoder"](x), models["encoder"](x_aug)
        # Separate calls: each branch is normalized over its own batch (Theorem 3.4 constrains
        # f(X) alone); Z goes on the clean branch only.
        b = models["head"](f.float())
        a = models["head"](f_aug.float(), noisy=False)
        scores = models["critic"](a, b).float()
    return loss_function(args)(scores)


def make_step(models: nn.ModuleDict, opt: torch.optim.Optimizer, args: argparse.Namespace,
              device: torch.device):
    encoder = torch.compile(models["encoder"]) if args.compile else models["encoder"]
    compiled = nn.ModuleDict({"encoder": encoder, "head": models["head"],
                              "critic": models["critic"]})

    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, mi = objective(compiled, x, args, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach(), mi
    return step


def measure_step(args: argparse.Namespace, device: torch.device, n: int) -> float:
    """Seconds per training step on synthetic images, with throw-away models and RNG."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        models = build_models(args, device)
        step = make_step(models, torch.optim.Adam(models.parameters(), lr=args.lr), args, device)
        x = torch.rand(args.batch_size, 1, 24, 24, device=device).contiguous(
            memory_format=torch.channels_last)
        return time_per_step(lambda: step(x), n, device)


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """Permutation of epoch `epoch`, a function of (seed, epoch) so that --resume needs no state."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


@torch.no_grad()
def heldout_mi(models: nn.ModuleDict, x: torch.Tensor, args: argparse.Namespace,
               device: torch.device) -> tuple[float, float]:
    """Mean and standard error over held-out batches of the training objective's MI estimate.

    Train-mode pass: each branch is normalized over its own batch exactly as in training; the
    running statistics it touches are recomputed afterwards by `evaluate`.
    """
    models.train()
    bs = min(args.batch_size, len(x))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + 1)
        values = [objective(models, x[i:i + bs], args, device)[1].item()
                  for i in range(0, len(x) - bs + 1, bs)]
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(np.mean(values)), se


@torch.no_grad()
def embed(models: nn.ModuleDict, x: torch.Tensor, batch_size: int = 2048) -> np.ndarray:
    """Evaluation embeddings: the clean branch, eval mode, no noise, float32."""
    models.eval()
    return torch.cat([models["head"](models["encoder"](x[i:i + batch_size]))
                      for i in range(0, len(x), batch_size)]).float().cpu().numpy()


def evaluate(models: nn.ModuleDict, data: tuple, args: argparse.Namespace,
             device: torch.device) -> dict:
    """Section 5 protocol: MI vs capacity, normality tests, downstream accuracy, silhouette."""
    x_tr, y_tr, x_te, y_te = data
    capacity = gaussian_capacity(args.dim, args.sigma)
    mi, mi_se = heldout_mi(models, x_te, args, device)
    recompute_bn_stats(models, lambda x: models["head"](models["encoder"](x), noisy=False),
                       x_tr, args.batch_size)
    z_tr, z_te = embed(models, x_tr), embed(models, x_te)
    return {"capacity": capacity, "mi_heldout": mi, "mi_heldout_se": mi_se,
            "dm_gap": capacity - mi, "class_information": LOG10,
            "normality": normality_report(z_te, seed=args.seed, subsample=args.subsample),
            "downstream": downstream_report(z_tr, y_tr.cpu().numpy(), z_te, y_te.cpu().numpy(),
                                            seed=args.seed),
            "embeddings": (z_tr, z_te)}


def save_checkpoint(out: Path, models: nn.ModuleDict, opt: torch.optim.Optimizer, step: int,
                    history: list, curve: list) -> None:
    atomic_save({"step": step, "models": models.state_dict(), "optimizer": opt.state_dict(),
                 "rng": torch.get_rng_state(), "history": history, "curve": curve},
                out / "checkpoint.pt")


def train(models: nn.ModuleDict, opt: torch.optim.Optimizer, data: tuple, args: argparse.Namespace,
          device: torch.device, out: Path, start: int, history: list, curve: list) -> None:
    """Adam on the objective; logs (step, loss, MI) to `history`, evaluations to `curve`."""
    x_tr = data[0]
    per_epoch = len(x_tr) // args.batch_size
    step_fn = make_step(models, opt, args, device)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.quiet,
               desc=f"sigma={args.sigma:g}", dynamic_ncols=True)
    losses, mis = [], []
    for step in bar:
        epoch, k = divmod(step, per_epoch)
        if k == 0 or step == start:
            order = epoch_order(len(x_tr), args.seed, epoch, device)
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
            m = evaluate(models, data, args, device)
            curve.append({"step": done, "mi_heldout": m["mi_heldout"],
                          "knn_acc": m["downstream"]["knn_acc"],
                          "henze_zirkler_p": m["normality"]["henze_zirkler_p"]})
        if done % args.ckpt_every == 0 or done == args.steps:
            save_checkpoint(out, models, opt, done, history, curve)


def summary(metrics: dict) -> str:
    n, d = metrics["normality"], metrics["downstream"]
    return "\n".join([
        f"capacity C = {metrics['capacity']:.3f} nats   (class information log 10 = {LOG10:.3f})",
        f"MI estimate (held-out) = {metrics['mi_heldout']:.3f} +- {metrics['mi_heldout_se']:.3f}"
        f"   DM gap C - I = {metrics['dm_gap']:.3f}",
        f"normality p (subsample {n['subsample']}): D'Agostino {n['dagostino_p']:.3f}   "
        f"Shapiro-Wilk {n['shapiro_p']:.3f}   Henze-Zirkler {n['henze_zirkler_p']:.3f}",
        f"accuracy: k-NN {d['knn_acc']:.4f}   GaussianNB {d['gnb_acc']:.4f}   "
        f"MLP {d['mlp_acc']:.4f}   silhouette {d['silhouette']:.3f}",
        f"wall time {metrics['wall_time_s']:.0f} s ({metrics['steps']} steps)"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    if args.bench:
        sec = measure_step(args, device, args.bench)
        # --epochs counts passes over the full 60k-image MNIST training split
        steps = args.steps if args.epochs is None else args.epochs * (60_000 // args.batch_size)
        precision = "bf16 autocast" if args.amp else "float32"
        print(f"{device.type} ({precision}), batch {args.batch_size}, critic {args.critic}, "
              f"loss {args.loss}: "
              f"{1e3 * sec:.1f} ms/step, {args.batch_size / sec:.0f} pairs/s; "
              f"{steps} steps would take {sec * steps / 60:.1f} min")
        return
    started = time.time()
    try:
        x_tr, y_tr, x_te, y_te, data_info = load_data(args.dataset, args.data_dir,
                                                      download=not args.no_download)
    except DataError as err:
        fail(str(err))
    if "note" in data_info:
        print(data_info["note"])
    if args.batch_size > len(x_tr):
        fail(f"--batch-size {args.batch_size} exceeds the {len(x_tr)} training images")
    if args.epochs is not None:
        args.steps = args.epochs * (len(x_tr) // args.batch_size)
    data = tuple(t.to(device) for t in (x_tr, y_tr, x_te, y_te))
    data = (data[0].contiguous(memory_format=torch.channels_last), data[1],
            data[2].contiguous(memory_format=torch.channels_last), data[3])

    out = Path(args.out)
    if args.resume and (out / "metrics.json").is_file():
        print(f"{out} is finished:\n" + summary(json.loads((out / "metrics.json").read_text())))
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json({k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS}, out / "args.json")

    models = build_models(args, device)
    opt = torch.optim.Adam(models.parameters(), lr=args.lr)
    start, history, curve = 0, [], []
    if args.resume and (out / "checkpoint.pt").is_file():
        ckpt = torch.load(out / "checkpoint.pt", map_location=device, weights_only=False)
        models.load_state_dict(ckpt["models"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start, history, curve = ckpt["step"], ckpt["history"], ckpt["curve"]
        print(f"resuming {out} at step {start}")
    if args.paper:
        sec = measure_step(args, device, 3)
        print("paper settings (Table 2, Appendix C): " + ", ".join(f"{k}={getattr(args, k)}"
                                                                    for k in PAPER)
              + f"; {args.steps} steps at {sec:.2f} s/step on {device.type}: "
                f"about {sec * (args.steps - start) / 3600:.1f} h")

    train(models, opt, data, args, device, out, start, history, curve)
    metrics = evaluate(models, data, args, device)
    z_tr, z_te = metrics.pop("embeddings")
    np.savez(out / "embeddings.npz", z_train=z_tr, y_train=data[1].cpu().numpy(),
             z_test=z_te, y_test=data[3].cpu().numpy())
    atomic_save({"models": models.state_dict(), "args": vars(args)}, out / "model.pt")
    metrics.update(sigma=args.sigma, dim=args.dim, critic=args.critic, loss=args.loss,
                   steps=args.steps, batch_size=args.batch_size, seed=args.seed, data=data_info,
                   device=str(device), wall_time_s=time.time() - started,
                   train_history=history, curve=curve)
    fig = scatter_embeddings(z_te, data[3].cpu().numpy(),
                             f"sigma = {args.sigma:g}, C = {metrics['capacity']:.2f} nats")
    save_figure(fig, out / "scatter.png")
    write_json(metrics, out / "metrics.json")
    print(summary(metrics) + f"\nsaved to {out}")


if __name__ == "__main__":
    main()

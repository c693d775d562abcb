"""Gaussian distribution matching on MNIST with Noise-Injected Deep InfoMax (Section 5).

Train the Table 2 ConvNet f to maximize I(f(X'); f(X) + Z), X' = X + N(0, 0.6^2) pixel noise,
f(X) normalized by BatchNorm, Z ~ N(0, sigma^2 I): f(X) then approaches N(0, I) (Theorem 3.4).
Saved in --out: the capacity C (eq. 5), the held-out MI, the DM gap C - I_hat >= D_KL(f(X) + Z
|| N(0, (1 + sigma^2) I)) (Lemma B.1), normality tests, downstream accuracies, a Figure 2 scatter.

    python mnist_gauss.py --sigma 0.6                        # minutes on a laptop CPU
    python mnist_gauss.py --sigma 0.6 --paper                # Table 2 / Appendix C settings
    python mnist_gauss.py --out RUN --resume                 # continue a killed run
    python mnist_gauss.py --out RUN --eval-only              # re-evaluate a finished run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import common

PAPER = {"batch_size": 1024, "steps": 116_000, "critic": "concat", "loss": "infonce", "lr": 1e-3,
         "aug_sigma": 0.6}  # Table 2 and Appendix C: 2000 epochs of 60k MNIST images at batch 1024
ONE_BATCH = 2000  # most test images in the one-batch MI estimates (B x B scores of every critic)
RUNTIME = ("out", "resume", "eval_only", "device", "quiet", "bench", "compile", "dtype")  # per call
MANY = 10 ** 8  # the upper bound of step counts and intervals


def number(kind: type, low: float, high: float, strict: bool = False) -> Callable[[str], Any]:
    """argparse type: a `kind` in [low, high], or in (low, high) if `strict` (NaN never is)."""
    def parse(text: str) -> Any:
        value = kind(text)  # a ValueError: argparse's "invalid int value" naming the flag
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--sigma", type=number(float, 0, 100), default=0.3, help="std of the noise Z ~ N(0, "
        "sigma^2 I) (Theorem 3.4); 0: plain DIM; 0.3: C = 2.49 nats (eq. 5), just above log 10")
    add("--dim", type=number(int, 1, 1024), default=2, help="embedding dim (Figure 1: 2)")
    add("--aug-sigma", type=number(float, 0, 10), default=0.6,
        help="std s of the augmentation X' = X + N(0, s^2) pixel noise (Appendix C)")
    add("--critic", choices=["separable", "gaussian", "concat", "bilinear"], default="separable",
        help="separable: <phi(a), psi(b)> (Tschannen et al.); gaussian: Thm 4.1; concat: Table 2")
    add("--loss", choices=sorted(common.LOSSES), default="infonce",
        help="MI bound (paper: infonce, eq. 2); redv/renwj: Choi & Lee")
    add("--reg-weight", type=number(float, 0, 100), default=0.1,
        help="lambda of the redv/renwj penalty (Choi & Lee try 0.1, 0.01, 0.001)")
    add("--clip", type=number(float, 0, 50), default=10.0,
        help="renwj: T clipped to [-clip, clip] in the NWJ terms (Choi & Lee, Table 1: 10); 0: off")
    add("--batch-size", type=number(int, 2, 16384), default=256, help="images a step (paper: 1024)")
    add("--lr", type=number(float, 0, 1, strict=True), default=1e-3, help="Adam's rate (App. C)")
    add("--steps", type=number(int, 0, MANY), default=2000, help="paper: 116,000 = 2000 epochs")
    add("--seed", type=number(int, 0, 2 ** 32 - 2), default=0, help="fixes data order, noise, init")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: CUDA/CPU")
    add("--dataset", choices=["mnist", "fashion-mnist", "mnist-test-split"], default="mnist",
        help="mnist: the official 60k/10k, in data/mnist/; fashion-mnist: Debian's package; "
             "mnist-test-split: a seeded 8k/2k split of the 10k test images (older runs)")
    add("--data-dir", default=None, help="folder with the four IDX files (or .gz) of --dataset")
    add("--ood", nargs="+", choices=common.OOD_SETS, default=[],
        help="also embed these shifted test sets into embeddings.npz for evaluate.py outliers")
    add("--out", default=None, help="run directory; default: a new one under runs/mnist_gauss/")
    add("--resume", action="store_true", help="continue the run in --out (start it if not begun)")
    add("--eval-only", action="store_true", help="re-evaluate --out from its model.pt")
    add("--subsample", type=number(int, 20, MANY), default=128, help="points per normality test")
    add("--eval-at", type=number(int, 1, MANY), nargs="+", default=[], metavar="STEP",
        help="evaluate at these steps too (log-spaced: 1000 2000 4000 ...): the curve in metrics")
    add("--log-every", type=number(int, 1, MANY), default=10, help="progress interval")
    add("--ckpt-every", type=number(int, 1, MANY), default=500, help="checkpoint every N steps")
    add("--amp", action=argparse.BooleanOptionalAction, default=None, help="autocast: default "
        "bf16 on CUDA (fp16 without bf16) and on CPUs with native bf16, float32 elsewhere")
    add("--compile", action="store_true", help="torch.compile encoder and critic")
    add("--bench", type=number(int, 1, 10 ** 4), default=0, metavar="N",
        help="time N training steps of these settings on random images, print ms/step, exit")
    add("--quiet", action="store_true", help="no progress bar")
    add("--paper", action="store_true",
        help="Table 2 and Appendix C: " + ", ".join(f"{k}={v}" for k, v in PAPER.items()))
    args = p.parse_args(argv)
    if args.paper and (given := [k for k in PAPER if getattr(args, k) != p.get_default(k)]):
        p.error(f"--paper sets --{', --'.join(given).replace('_', '-')}; drop them or --paper")
    if args.critic == "gaussian" and args.sigma == 0:
        p.error("--critic gaussian (Theorem 4.1) needs --sigma > 0; else use a learned critic")
    if args.device != "auto" and not (torch.cuda.is_available() if args.device == "cuda" else
                                      args.device == "cpu" or torch.backends.mps.is_available()):
        p.error(f"--device {args.device}: not available on this machine")
    out = Path(args.out or f"runs/mnist_gauss/sigma{args.sigma:g}_seed{args.seed}_"
                           + time.strftime("%Y%m%d-%H%M%S"))
    if args.eval_only or args.resume and (out / "args.json").exists():
        try:  # the run's settings: a typed flag may only repeat them
            saved = json.loads((out / "args.json").read_text())
        except (OSError, ValueError) as err:
            raise common.DataError(f"{out / 'args.json'} is unreadable ({err})") from None
        if not isinstance(saved, dict) or saved.keys() != vars(args).keys() - set(RUNTIME):
            raise common.DataError(f"{out} is not a run of {Path(__file__).name}")
        for key, value in saved.items():
            if getattr(args, key) not in (p.get_default(key), value):
                raise common.DataError(f"--{key.replace('_', '-')} {getattr(args, key)} differs "
                                       f"from the run's {value} in {out / 'args.json'}")
        vars(args).update(saved)
        if args.resume and (out / "metrics.json").is_file():  # a repeated sweep passes it by
            print(f"{out} is finished: its results are in {out / 'metrics.json'}")
            sys.exit()
    else:  # a new run, also for --resume of a run not started yet; an --out file fails at mkdir
        vars(args).update(PAPER if args.paper else {})
        if out.is_dir() and any(out.iterdir()) and not args.bench:
            raise FileExistsError(f"--out {out} holds files but no run; choose another folder")
    args.out = str(out)
    return args


def build_models(args: argparse.Namespace, device: torch.device) -> nn.ModuleDict:
    """Encoder f (Table 2), the normalization of Theorem 3.4 (BatchNorm1d, no affine), critic T."""
    models = nn.ModuleDict({"encoder": common.ConvEncoder(args.dim),
                            "head": common.GaussianHead(args.dim)})
    models["critic"] = (common.GaussianCritic(args.sigma) if args.critic == "gaussian" else
                        {"separable": common.SeparableCritic, "concat": common.ConcatCritic,
                         "bilinear": common.BilinearCritic}[args.critic](args.dim))
    return models.to(device).to(memory_format=torch.channels_last)


def two_views(models: nn.ModuleDict, x: torch.Tensor, args: argparse.Namespace
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """a = f(X') and b = f(X) + Z on one batch of clean images x (Section 3)."""
    x_aug = x + args.aug_sigma * torch.randn_like(x)               # X -> X' (Appendix C)
    with torch.autocast(x.device.type, args.dtype, enabled=args.dtype != torch.float32):
        f, f_aug = models["encoder"](x), models["encoder"](x_aug)
        # each branch normalized over its own batch: Theorem 3.4 constrains f(X) alone
        b = models["head"](f.float())                              # E f(X) = 0, Var f(X)_i = 1
        if args.sigma > 0:
            b = b + args.sigma * torch.randn_like(b)               # f(X) + Z, Z ~ N(0, sigma^2 I)
        a = models["head"](f_aug.float())                          # f(X'), no noise
    return a, b


def infomax_loss(models: nn.ModuleDict, x: torch.Tensor, args: argparse.Namespace
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, MI estimate) of I(f(X'); f(X) + Z) on one batch of clean images x (eq. 2)."""
    a, b = two_views(models, x, args)
    with torch.autocast(x.device.type, args.dtype, enabled=args.dtype != torch.float32):
        scores = models["critic"](a, b).float()                    # S[i, j] = T(a_i, b_j)
    return common.mi_loss(args.loss, args.reg_weight, args.clip or None)(scores)


def bench(args: argparse.Namespace, device: torch.device, label: str) -> None:
    """--bench N: ms per training step of these settings on random images, after two untimed."""
    models = build_models(args, device)
    opt = torch.optim.Adam(models.parameters(), lr=args.lr)
    x = torch.rand(args.batch_size, 1, 24, 24, device=device).to(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for i in range(2 + args.bench):
        if i == 2:
            sync()
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        infomax_loss(models, x, args)[0].backward()
        opt.step()
    sync()
    ms = 1e3 * (time.perf_counter() - start) / args.bench
    print(f"{device}, {label}, batch {args.batch_size}, critic {args.critic}: "
          f"{ms:.1f} ms/step, {args.batch_size / ms * 1e3:.0f} images/s")


@torch.no_grad()
def embed(models: nn.ModuleDict, x: torch.Tensor) -> np.ndarray:
    """Evaluation embeddings: the clean branch in eval mode, no noise, float32."""
    models.eval()
    return torch.cat([models["head"](models["encoder"](x[i:i + 2048]))
                      for i in range(0, len(x), 2048)]).float().cpu().numpy()


@torch.no_grad()
def evaluate(models: nn.ModuleDict, data: tuple, args: argparse.Namespace,
             estimates: bool = True) -> dict:
    """Section 5: held-out MI vs C (eq. 5), DM gap C - I and its non-invariance share (Lemma B.1),
    normality, downstream scores; with `estimates`, eqs. 2-3 on <= ONE_BATCH test images."""
    x_tr, y_tr, x_te, y_te = data
    models.train()  # the held-out MI uses the training objective, each branch its own batch
    bs, n_test = min(args.batch_size, len(x_te)), min(len(x_te), ONE_BATCH)
    critics = {"trained": models["critic"], **({"theorem41": common.GaussianCritic(args.sigma)}
                                               if estimates and args.sigma > 0 else {})}
    with torch.random.fork_rng(devices=[x_te.device] if x_te.device.type == "cuda" else []):
        torch.manual_seed(args.seed + 1)
        batches = [x_te[i:i + bs] for i in range(0, len(x_te) - bs + 1, bs)]
        views = [two_views(models, x, args) for x in batches + [x_te[:n_test]] * estimates]
    with torch.autocast(x_te.device.type, args.dtype, enabled=args.dtype != torch.float32):
        scores = {c: [t(a, b).float() for a, b in views] for c, t in critics.items()}
    loss = common.mi_loss(args.loss, args.reg_weight, args.clip or None)
    mis = [loss(s)[1].item() for s in scores["trained"][:len(batches)]]
    # eval-mode embeddings: BatchNorm statistics recomputed on the clean training images
    common.recompute_bn_stats(models, lambda x: models["head"](models["encoder"](x)),
                              x_tr, args.batch_size)
    z_tr, z_te = embed(models, x_tr), embed(models, x_te)
    if not (np.isfinite(z_tr).all() and np.isfinite(z_te).all()):
        raise FloatingPointError("the embeddings are not finite: training diverged; try a "
                                 f"smaller --lr (now {args.lr:g})")
    z_aug = embed(models, x_te + args.aug_sigma * torch.randn(x_te.shape, device=x_te.device,
                  generator=torch.Generator(x_te.device).manual_seed(args.seed + 2)))  # f(X')
    resid = np.cov((z_te - z_aug @ np.linalg.lstsq(z_aug - z_aug.mean(0), z_te)[0]).T)  # R of
    mi_gauss = (args.dim * math.log1p(args.sigma ** 2)  # f(X) on f(X'); the MI if
                - np.linalg.slogdet(resid + args.sigma ** 2 * np.eye(args.dim))[1]) / 2  # Gaussian
    mi, capacity = float(np.mean(mis)), common.gaussian_capacity(args.dim, args.sigma)
    se = float(np.std(mis, ddof=1) / math.sqrt(len(mis))) if len(mis) > 1 else math.nan
    return {"sigma": args.sigma, "capacity": capacity, "mi_heldout": mi, "mi_heldout_se": se,
            "dm_gap": capacity - mi, "class_information": common.LOG10, "aug_sigma": args.aug_sigma,
            "non_invariance": float(np.mean((z_aug - z_te) ** 2)),  # Var f_i = 1
            "non_invariance_nats": float(capacity - mi_gauss),  # >= I(f(X) + Z; f(X) | f(X'))
            **({"mi_estimates": {"batch": bs, "n_test": n_test, **{
                c: common.bound_estimates_table(s[:-1], s[-1]) for c, s in scores.items()}}}
               if estimates else {}),
            "normality": common.normality_report(z_te, seed=args.seed, subsample=args.subsample),
            "downstream": common.downstream_report(z_tr, y_tr.cpu().numpy(), z_te,
                                                   y_te.cpu().numpy(), seed=args.seed),
            "embeddings": (z_tr, z_te)}


def curve_point(step: int, m: dict) -> dict:
    """A curve point: normality without its null levels, train sliced W2, held-out MI, k-NN."""
    tests = {k: v for k, v in m["normality"].items() if k != "null"}
    return {"step": step, "mi_heldout": m["mi_heldout"], "knn_acc": m["downstream"]["knn_acc"],
            "sliced_w2_train": common.sliced_w2(m["embeddings"][0]), **tests}


def summary(m: dict) -> str:
    d = m["downstream"]
    return "\n".join([
        f"capacity C = {m['capacity']:.3f} nats   (class information log 10 = {common.LOG10:.3f})",
        f"MI estimate (held-out) = {m['mi_heldout']:.3f} +- {m['mi_heldout_se']:.3f}"
        f"   DM gap C - I = {m['dm_gap']:.3f} (non-invariance <= {m['non_invariance_nats']:.3f})",
        *(f"DIVERGED, not a result: {why}" for why in m["diverged"]),
        *[f"  one batch of {m['mi_estimates']['n_test']} test images, {critic} critic: "
          + "   ".join(f"{k} {e['whole'][0]:.3f} +- {e['whole'][1]:.3f}" for k, e in est.items()
                       if critic == "theorem41" or k == "infonce")  # NWJ, DV can explode
          for critic, est in m.get("mi_estimates", {}).items() if isinstance(est, dict)],
        *common.normality_lines(m["normality"]),
        f"accuracy: k-NN {d['knn_acc']:.4f}   GaussianNB {d['gnb_acc']:.4f}   "
        f"MLP {d['mlp_acc']:.4f}   silhouette {d['silhouette']:.3f}",
        f"wall time {m['wall_time_s']:.0f} s ({m['steps']} steps)"])


def save(path: Path, write: Callable[[Path], Any]) -> None:
    """write(a temporary name beside `path`), then rename it: a killed run leaves no half file."""
    write(path.with_name(f".{path.name}"))  # the same suffix, which numpy and matplotlib follow
    os.replace(path.with_name(f".{path.name}"), path)


def run(args: argparse.Namespace) -> None:
    """One run: data, models, --resume, training, evaluation, saving (or --bench, --eval-only)."""
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    args.dtype, why = precision(device, args.amp)
    label = "float32" if args.dtype == torch.float32 else f"{str(args.dtype)[6:]} autocast"
    if args.bench:
        return bench(args, device, label)
    print(f"{label}: {why}")
    started, out = time.time(), Path(args.out)
    x_tr, y_tr, x_te, y_te, data_info = common.load_data(args.dataset, args.data_dir)
    print(f"{data_info['dataset']}: {data_info['n_train']:,} training / {data_info['n_test']:,} "
          f"test images ({data_info['split']}, {data_info['source']})")
    x_tr, x_te = (x.to(device).contiguous(memory_format=torch.channels_last) for x in (x_tr, x_te))
    data = (x_tr, y_tr.to(device), x_te, y_te.to(device))
    shifted = {ood: common.shifted_images(ood, x_te, seed=args.seed) for ood in args.ood}
    if args.batch_size > len(x_tr):
        raise common.DataError(f"--batch-size {args.batch_size} > {len(x_tr)} training images")

    models = build_models(args, device)
    opt = torch.optim.Adam(models.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == torch.float16)
    start, history, curve, segments = (args.steps if args.eval_only else 0), [], [], []
    settings = {k: v for k, v in vars(args).items() if k not in RUNTIME}  # args.json
    path = out / ("model.pt" if args.eval_only else "checkpoint.pt")
    if args.eval_only or args.resume and path.exists():
        try:  # every way a run file can be damaged, or another run's, ends here
            state = torch.load(path, map_location=device, weights_only=True)
            models.load_state_dict(state["models"])
            if not args.eval_only:
                opt.load_state_dict(state["optimizer"])
                scaler.load_state_dict(state["scaler"])
                torch.set_rng_state(state["rng"].cpu())
                if device.type == "cuda" and state["cuda_rng"] is not None:
                    torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
                start, history, curve, segments = (state[k] for k in (
                    "step", "history", "curve", "segments"))
                print(f"resuming {out} at step {start}")
        except Exception as err:  # torch.load alone raises half a dozen kinds
            raise common.DataError(f"{path} is missing, damaged or not this run's "
                                   f"({type(err).__name__}: {str(err)[:80]!r})") from None
    elif not (out / "args.json").exists():  # a new run (--resume of a run not started too)
        out.mkdir(parents=True, exist_ok=True)
        save(out / "args.json", lambda f: f.write_text(json.dumps(settings, indent=2)))
    segments = segments + [[start, str(device), label]]

    # training: Adam on the InfoMax objective; log, evaluate and checkpoint every N steps
    train = nn.ModuleDict({k: torch.compile(m) if args.compile and k != "head" else m
                           for k, m in models.items()})
    per_epoch, bs = len(x_tr) // args.batch_size, args.batch_size
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.quiet,
               desc=f"sigma={args.sigma:g} seed={args.seed}", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 60)
    losses, mis = [], []
    for step in bar:
        epoch, k = divmod(step, per_epoch)
        if k == 0 or step == start:
            order = common.epoch_order(len(x_tr), args.seed, epoch, x_tr.device)
        models.train()
        loss, mi = infomax_loss(train, x_tr[order[k * bs:(k + 1) * bs]], args)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.detach())
        mis.append(mi)
        done = step + 1
        if done % args.log_every == 0 or done % args.ckpt_every == 0 or done == args.steps:
            mean_loss, mean_mi = torch.stack(losses).mean().item(), torch.stack(mis).mean().item()
            losses, mis = [], []
            if not (math.isfinite(mean_loss) and math.isfinite(mean_mi)):
                raise FloatingPointError(f"the loss became {mean_loss} by step {done}: training "
                                         f"diverged; try a smaller --lr (now {args.lr:g}); "
                                         f"{out / 'checkpoint.pt'} (if any) is the last good one")
            history.append([done, mean_loss, mean_mi])
            bar.set_postfix(epoch=epoch, loss=f"{mean_loss:.3f}", mi=f"{mean_mi:.3f}",
                            refresh=False)
        if done in args.eval_at and done < args.steps:
            curve.append(curve_point(done, evaluate(models, data, args, estimates=False)))
        if done % args.ckpt_every == 0 or done == args.steps:
            cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
            save(out / "checkpoint.pt", lambda f: torch.save({
                "step": done, "models": models.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), "cuda_rng": cuda_rng,
                "segments": segments, "history": history, "curve": curve}, f))

    metrics = evaluate(models, data, args)
    if args.eval_at:  # the curve ends at the final evaluation
        curve.append(curve_point(args.steps, metrics))
    z_tr, z_te = metrics.pop("embeddings")
    metrics.update(dim=args.dim, critic=args.critic, loss=args.loss, steps=args.steps,
                   batch_size=args.batch_size, seed=args.seed, data=data_info, device=str(device),
                   precision={"dtype": label, "why": why},
                   wall_time_s=time.time() - started, train_history=history, curve=curve,
                   segments=segments, diverged=common.divergence(
                       metrics["mi_heldout"], metrics["mi_heldout_se"], [h[1] for h in history]))
    if args.eval_only:  # the run's own files stay as they are
        save(out / "metrics_recomputed.json", lambda f: f.write_text(json.dumps(metrics, indent=2)))
        return print(summary(metrics) + f"\nsaved to {out / 'metrics_recomputed.json'}")
    z_ood = {f"z_ood_{k.replace('-', '_')}": embed(models, x) for k, x in shifted.items()}
    save(out / "embeddings.npz", lambda f: np.savez_compressed(
        f, z_train=z_tr, y_train=y_tr.numpy(), z_test=z_te, y_test=y_te.numpy(), **z_ood))
    save(out / "model.pt", lambda f: torch.save({"models": models.state_dict()}, f))
    fig = common.scatter_embeddings(z_te, y_te.numpy(), f"sigma = {args.sigma:g}, C = "
                                    f"{metrics['capacity']:.2f} nats")
    save(out / "scatter.png", lambda f: fig.savefig(f, dpi=150, bbox_inches="tight"))
    save(out / "metrics.json", lambda f: f.write_text(json.dumps(metrics, indent=2)))
    print(summary(metrics) + f"\nsaved to {out}")


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except (common.DataError, OSError, FloatingPointError) as err:  # one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3 if isinstance(err, FloatingPointError) else 2)  # 3: the run diverged


if __name__ == "__main__":
    main()

"""Uniform distribution matching on MNIST with Noise-Injected Deep InfoMax (Section 3.2).

Train the Table 2 ConvNet f to maximize I(f(X'); f(X) + Z) with f(X) squashed into [0, 1]^d by
Phi(BatchNorm(.)) and Z ~ U[-eps, eps]^d (Theorem 3.5): the embeddings then approach U[0, 1]^d.
Saved in --out: the capacity C (eq. 6), the MI of U[0, 1]^d (Remark 3.6), the held-out MI, the DM
gap (Lemma B.4), uniformity tests (Section 3.3), downstream accuracies, a scatter with histograms.

    python mnist_uniform.py --eps 0.1                        # minutes on a laptop CPU
    python mnist_uniform.py --eps 0.1 --paper                # Table 2 / Appendix C settings
    python mnist_uniform.py --epss 0.05 0.1 0.3 --seeds 3    # a Figure 1 sweep (subprocesses)
    python mnist_uniform.py --out RUN --resume               # continue a killed run
    python mnist_uniform.py --out RUN --eval-only            # re-evaluate a finished run
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import common

PAPER = {"batch_size": 1024, "epochs": 2000, "steps": None, "critic": "concat", "loss": "infonce",
         "lr": 1e-3, "aug_sigma": 0.6}  # Appendix C and Table 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--eps", type=common.open_interval(0, 0.5), default=0.1,
                   help="half-width of the injected noise Z ~ U[-eps, eps]^d (Theorem 3.5)")
    p.add_argument("--dim", type=common.positive_int, default=2, help="embedding dim (Figure 1: 2)")
    p.add_argument("--aug-sigma", type=common.nonnegative_float, default=0.6,
                   help="std of the pixel noise X -> X' (Appendix C: 0.6)")
    p.add_argument("--critic", default="separable", choices=["separable", "concat", "bilinear"],
                   help="separable: <phi(a), psi(b)> (Tschannen et al.), the default for its "
                        "cost per step (2.5-4x cheaper than concat); concat: Table 2, the "
                        "paper's; bilinear: a^T W b")
    p.add_argument("--critic-impl", choices=["fast", "reference"], default="fast",
                   help="concat critic: fast (first layer split, bf16 row chunks, same function) "
                        "or reference (all B x B pairs materialised, the definition)")
    p.add_argument("--loss", choices=sorted(common.LOSSES), default="infonce",
                   help="MI bound (paper: infonce, eq. 2); redv/renwj: Choi & Lee")
    p.add_argument("--reg-weight", type=common.nonnegative_float, default=0.1,
                   help="lambda of the redv/renwj penalty (Choi & Lee try 0.1, 0.01, 0.001)")
    p.add_argument("--clip", type=common.nonnegative_float, default=10.0,
                   help="renwj: T clipped to [-clip, clip] in the NWJ terms (Choi & Lee, Table 1: "
                        "10); 0: no clipping")
    p.add_argument("--batch-size", type=common.bounded(int, 2), default=256, help="paper: 1024")
    p.add_argument("--lr", type=common.positive_float, default=1e-3,
                   help="Adam learning rate (Appendix C: 1e-3)")
    p.add_argument("--steps", type=common.bounded(int, 0), default=2000,
                   help="optimizer steps (paper: 2000 epochs of 60k images = 116,000 steps)")
    p.add_argument("--epochs", type=common.positive_int, default=None,
                   help="train for this many passes over the training set instead of --steps")
    p.add_argument("--seed", type=common.seed_int, default=0, help="fixes data order, noise, init")
    p.add_argument("--epss", type=common.open_interval(0, 0.5), nargs="+", default=None,
                   help="sweep: one run per eps (times --seeds) in sub-directories of --out")
    p.add_argument("--seeds", type=common.bounded(int, 1, 1000), default=1,
                   help="sweep: N runs with seeds --seed ... --seed + N - 1")
    p.add_argument("--jobs", type=common.positive_int, default=None,
                   help="sweep: runs at once, each a process with CPU threads / N threads; "
                        "default 2 on a CPU with 2+ threads (the most runs per hour, README)")
    p.add_argument("--device", type=common.device_flag, default="auto",
                   help="auto (CUDA when present), cpu, cuda, cuda:N, mps")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist", "mnist-test-split"],
                   default="mnist", help="mnist falls back to the shipped MNIST test split (8k/2k) "
                   "when the full set is neither on disk nor downloadable")
    p.add_argument("--data-dir", default=None, help="folder with the IDX files (optionally .gz)")
    p.add_argument("--no-download", action="store_true", help="never try to download data")
    p.add_argument("--ood", nargs="+", choices=common.OOD_SETS, default=[],
                   help="also embed these shifted test sets (test-split size) into embeddings.npz "
                        "as z_ood_<name> for evaluate.py outliers; inverted, noise: no download")
    p.add_argument("--out", default=None, help="run directory, or a sweep's parent directory; "
                                               "default: a new directory under runs/mnist_uniform/")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--eval-only", action="store_true", help="re-evaluate --out from its model.pt")
    p.add_argument("--subsample", type=common.bounded(int, 20), default=128,
                   help="subsample size of the bootstrapped normality tests (sets their power)")
    p.add_argument("--eval-every", type=common.bounded(int, 0), default=0,
                   help="full evaluation every N steps, stored as a convergence curve (0: off)")
    p.add_argument("--log-every", type=common.positive_int, default=10, help="progress interval")
    p.add_argument("--ckpt-every", type=common.positive_int, default=500, help="checkpoint every N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast for encoder and learned critics: default auto, bf16 on CUDA "
                        "(fp16 + scaler without bf16) and on CPUs with native bf16 (AMX, "
                        "AVX-512 BF16), float32 elsewhere; --amp / --no-amp force it")
    p.add_argument("--compile", action="store_true", help="torch.compile encoder and critic")
    p.add_argument("--bench", type=common.positive_int, default=0, metavar="N",
                   help="time N steps of this run and of the reference path (concat critic's "
                        "definition, float32, NCHW), print ms/step and projections, and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--paper", action="store_true",
                   help="the paper's settings: " + ", ".join(f"{k}={v}" for k, v in PAPER.items()))
    args = p.parse_args(argv)
    for one, other in (("eps", "epss"), ("steps", "epochs")):
        if getattr(args, one) != p.get_default(one) and getattr(args, other) is not None:
            p.error(f"--{one} and --{other} exclude each other")
    if args.paper:
        if given := [k.replace("_", "-") for k in PAPER if getattr(args, k) != p.get_default(k)]:
            p.error(f"--paper sets --{', --'.join(given)}; drop them or drop --paper")
        vars(args).update(PAPER)
    if args.resume or args.eval_only:
        common.check_resume(p, args, ["eps"])
    elif args.epss is None and args.seeds == 1:
        common.resolve_out(p, args, f"runs/mnist_uniform/eps{args.eps:g}_seed{args.seed}")
    return args


def build_models(args: argparse.Namespace, device: torch.device) -> nn.ModuleDict:
    """Encoder f (Table 2), the squash Phi(BatchNorm(.)) of Theorem 3.5 and a learned critic T."""
    models = nn.ModuleDict({"encoder": common.ConvEncoder(args.dim),
                            "head": common.UniformHead(args.dim),
                            "critic": common.make_critic(args.critic, args.dim,
                                                         fast=args.critic_impl == "fast")})
    return models.to(device).to(memory_format=torch.channels_last)


def infomax_loss(models: nn.ModuleDict, x: torch.Tensor, args: argparse.Namespace
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, MI estimate) of I(f(X'); f(X) + Z) on one batch of clean images x (Section 3)."""
    x_aug = x + args.aug_sigma * torch.randn_like(x)               # X -> X' (Appendix C)
    with common.autocast(x.device, args.amp):
        f, f_aug = models["encoder"](x), models["encoder"](x_aug)
        # each branch squashed over its own batch: Theorem 3.5 constrains f(X) alone
        b = models["head"](f.float())                              # Phi(BN(f(X))) in [0, 1]^d
        b = b + args.eps * (2 * torch.rand_like(b) - 1)            # f(X) + Z, Z ~ U[-eps, eps]^d
        a = models["head"](f_aug.float())                          # f(X'), no noise
        scores = models["critic"](a, b).float()                    # S[i, j] = T(a_i, b_j)
    return common.mi_loss(args.loss, args.reg_weight, args.clip or None)(scores)


def bench(args: argparse.Namespace, device: torch.device) -> None:
    """--bench N: ms per step of this run next to the reference path, and projected run times."""
    def ms_per_step(layout: torch.memory_format = torch.channels_last, **flags: object) -> float:
        run = argparse.Namespace(**{**vars(args), **flags})
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            models = build_models(run, device).to(memory_format=layout)
            opt = torch.optim.Adam(models.parameters(), lr=run.lr)
            x = torch.rand(run.batch_size, 1, 24, 24, device=device).to(memory_format=layout)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                infomax_loss(models, x, run)[0].backward()
                opt.step()
            return 1e3 * common.time_per_step(step, args.bench, device)

    dtype, why = common.precision(device, args.amp)
    other = dtype == torch.float32  # --amp of the other precision
    ms = ms_per_step()
    print(f"{device.type}, batch {args.batch_size}, critic {args.critic}, loss {args.loss}, "
          f"{args.bench} steps each\n  this run:  {ms:8.1f} ms/step   "
          f"{common.precision_name(dtype)}, channels-last, {args.critic_impl} ({why})", flush=True)
    print(f"  other:     {ms_per_step(amp=other):8.1f} ms/step   "
          f"{common.precision_name(common.precision(device, other)[0])}, channels-last; the "
          f"default (auto) picks {common.precision_name(common.precision(device)[0])}", flush=True)
    ms_ref = ms_per_step(torch.contiguous_format, critic_impl="reference", amp=False)
    print(f"  reference: {ms_ref:8.1f} ms/step   float32, NCHW, reference (all pairs "
          f"materialised for concat)\n  speed-up {ms_ref / ms:.1f}x; "
          f"{args.batch_size / ms * 1e3:.0f} pairs/s", flush=True)
    ms_paper = ms if args.paper else ms_per_step(**PAPER)
    steps = args.steps if args.epochs is None else args.epochs * (60_000 // args.batch_size)
    paper_steps = PAPER["epochs"] * (60_000 // PAPER["batch_size"])
    print(f"  projected: this run ({steps} steps) {ms * steps / 6e4:.1f} min; --paper "
          f"({paper_steps} steps at batch 1024, concat critic: {ms_paper:.0f} ms/step) "
          f"{ms_paper * paper_steps / 3.6e6:.1f} h")


@torch.no_grad()
def embed(models: nn.ModuleDict, x: torch.Tensor) -> np.ndarray:
    """Evaluation embeddings: the clean branch in eval mode, no noise, float32."""
    models.eval()
    return torch.cat([models["head"](models["encoder"](x[i:i + 2048]))
                      for i in range(0, len(x), 2048)]).float().cpu().numpy()


@torch.no_grad()
def evaluate(models: nn.ModuleDict, data: tuple, args: argparse.Namespace) -> dict:
    """Section 5 protocol: held-out MI against C = d log(1 + 1/(2 eps)) (eq. 6), the DM gap (Lemma
    B.4) and the MI d (eps - log 2 eps) of U[0, 1]^d (Remark 3.6); normality tests after Phi^-1
    (Section 3.3) and per-coordinate Kolmogorov-Smirnov tests; downstream scores."""
    x_tr, y_tr, x_te, y_te = data
    models.train()  # the held-out MI uses the training objective, each branch its own batch
    bs = min(args.batch_size, len(x_te))
    with torch.random.fork_rng(devices=[x_te.device] if x_te.device.type == "cuda" else []):
        torch.manual_seed(args.seed + 1)
        mis = [infomax_loss(models, x_te[i:i + bs], args)[1].item()
               for i in range(0, len(x_te) - bs + 1, bs)]
    # eval-mode embeddings: BatchNorm statistics recomputed on the clean training images
    common.recompute_bn_stats(models, lambda x: models["head"](models["encoder"](x)),
                              x_tr, args.batch_size)
    z_tr, z_te = embed(models, x_tr), embed(models, x_te)
    if not (np.isfinite(z_tr).all() and np.isfinite(z_te).all()):
        common.fail("the embeddings are not finite: training diverged; try a smaller --lr", code=3)
    mi, capacity = float(np.mean(mis)), common.uniform_capacity(args.dim, args.eps)
    se = float(np.std(mis, ddof=1) / math.sqrt(len(mis))) if len(mis) > 1 else math.nan
    return {"eps": args.eps, "mi_at_uniform": args.dim * (args.eps - math.log(2 * args.eps)),
            "uniformity": common.uniformity_report(z_te), "capacity": capacity, "mi_heldout": mi,
            "mi_heldout_se": se, "dm_gap": capacity - mi, "class_information": common.LOG10,
            "normality": common.normality_report(common.to_gaussian(z_te), seed=args.seed,
                                                 subsample=args.subsample),
            "downstream": common.downstream_report(z_tr, y_tr.cpu().numpy(), z_te,
                                                   y_te.cpu().numpy(), seed=args.seed),
            "embeddings": (z_tr, z_te)}


def scatter_with_marginals(u: np.ndarray, y: np.ndarray, eps: float, capacity: float) -> Any:
    """The test embeddings in the unit square coloured by digit, and each coordinate's histogram."""
    fig, axes = common.pyplot().subplots(1, 2, figsize=(11, 5))
    points = axes[0].scatter(u[:, 0], u[:, 1 % u.shape[1]], c=y, cmap="tab10", s=3, alpha=0.7,
                             vmin=-0.5, vmax=9.5)
    fig.colorbar(points, ax=axes[0], ticks=range(10), label="label")
    axes[0].set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xlabel="$u_1$", ylabel="$u_2$",
                title=f"eps = {eps:g}, C = {capacity:.2f} nats")
    for i in range(min(u.shape[1], 4)):
        axes[1].hist(u[:, i], bins=40, range=(0, 1), density=True, histtype="step",
                     label=f"$u_{i + 1}$")
    axes[1].axhline(1.0, color="k", linestyle="--", label="U[0, 1]")
    axes[1].set(xlabel="value", ylabel="density", title="marginals")
    axes[1].legend()
    return fig


def summary(m: dict) -> str:
    d = m["downstream"]
    return "\n".join([
        f"capacity C = {m['capacity']:.3f} nats   (class information log 10 = {common.LOG10:.3f})",
        f"MI estimate (held-out) = {m['mi_heldout']:.3f} +- {m['mi_heldout_se']:.3f}"
        f"   DM gap C - I = {m['dm_gap']:.3f}",
        "normality of Phi^-1(u) (Section 3.3):",
        *common.normality_lines(m["normality"]),
        f"uniformity: Kolmogorov-Smirnov mean p {m['uniformity']['ks_p_mean']:.3f}   "
        f"max D {m['uniformity']['ks_stat_max']:.3f}",
        f"accuracy: k-NN {d['knn_acc']:.4f}   GaussianNB {d['gnb_acc']:.4f}   "
        f"MLP {d['mlp_acc']:.4f}   silhouette {d['silhouette']:.3f}",
        f"wall time {m['wall_time_s']:.0f} s ({m['steps']} steps)"])


def train_and_evaluate(args: argparse.Namespace) -> None:
    """One run: data, models, --resume, training, evaluation, saving (or --bench, --eval-only)."""
    device = common.pick_device(args.device)
    torch.manual_seed(args.seed)
    if args.bench:
        return bench(args, device)
    dtype, why = common.precision(device, args.amp)
    print(f"{common.precision_name(dtype)}: {why}")
    started, out = time.time(), Path(args.out)
    if args.resume and (out / "metrics.json").is_file():
        return print(f"{out} is finished:\n" + summary(common.read_json(out / "metrics.json")))
    x_tr, y_tr, x_te, y_te, data_info = common.load_data(args.dataset, args.data_dir,
                                                         download=not args.no_download)
    if "note" in data_info:
        print(data_info["note"])
    x_tr, x_te = (x.to(device).contiguous(memory_format=torch.channels_last) for x in (x_tr, x_te))
    data = (x_tr, y_tr.to(device), x_te, y_te.to(device))
    shifted = {name: common.shifted_images(name, x_te, None, not args.no_download, args.seed)
               for name in args.ood}
    if args.batch_size > len(x_tr):
        common.fail(f"--batch-size {args.batch_size} exceeds the {len(x_tr)} training images")
    if args.epochs is not None:
        args.steps = args.epochs * (len(x_tr) // args.batch_size)

    models = build_models(args, device)
    opt = torch.optim.Adam(models.parameters(), lr=args.lr)
    scaler = common.grad_scaler(device, args.amp)  # float16 only; a pass-through otherwise
    start, history, curve, segments = (args.steps if args.eval_only else 0), [], [], []
    if args.eval_only:  # nothing left to train
        state = common.load_run_file(out / "model.pt", device)["models"]
        common.load_models(models, state, out / "model.pt")
    else:
        out.mkdir(parents=True, exist_ok=True)
        common.write_json({k: v for k, v in vars(args).items() if k not in common.RUNTIME_FLAGS},
                          out / "args.json")
    if args.resume and (out / "checkpoint.pt").exists():
        ckpt = common.load_run_file(out / "checkpoint.pt", device, (
            "step", "optimizer", "scaler", "rng", "cuda_rng", "segments", "history", "curve"))
        common.load_models(models, ckpt["models"], out / "checkpoint.pt")
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"].cpu())
        if device.type == "cuda" and ckpt["cuda_rng"] is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu(), device)
        start, history, curve, segments = map(ckpt.get, ("step", "history", "curve", "segments"))
        print(f"resuming {out} at step {start}")
    segments = segments + [[start, str(device), common.precision_name(dtype)]]
    if args.paper:
        print("paper settings (Table 2, Appendix C): "
              + ", ".join(f"{k}={getattr(args, k)}" for k in PAPER) + f" -> {args.steps} steps")

    # training: Adam on the InfoMax objective; log, evaluate and checkpoint every N steps
    train = nn.ModuleDict({name: torch.compile(m) if args.compile and name != "head" else m
                           for name, m in models.items()})
    per_epoch, bs = len(x_tr) // args.batch_size, args.batch_size
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.quiet,
               desc=f"eps={args.eps:g} seed={args.seed}", dynamic_ncols=True,
               mininterval=common.progress_interval())
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
                kept = (f"the last good checkpoint is kept in {out / 'checkpoint.pt'}"
                        if (out / "checkpoint.pt").is_file() else "no checkpoint was written yet")
                common.fail(f"the loss became {mean_loss} by step {done}: training diverged; try a "
                            f"smaller --lr (now {args.lr:g}); {kept}", code=3)
            history.append([done, mean_loss, mean_mi])
            bar.set_postfix(epoch=epoch, loss=f"{mean_loss:.3f}", mi=f"{mean_mi:.3f}",
                            refresh=False)
        if args.eval_every and done % args.eval_every == 0 and done < args.steps:
            m = evaluate(models, data, args)
            curve.append({"step": done, "mi_heldout": m["mi_heldout"],
                          "knn_acc": m["downstream"]["knn_acc"],
                          "henze_zirkler_p": m["normality"]["henze_zirkler_p"]})
        if done % args.ckpt_every == 0 or done == args.steps:
            cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
            common.atomic_save({"step": done, "models": models.state_dict(),
                                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                "rng": torch.get_rng_state(), "cuda_rng": cuda_rng,
                                "segments": segments, "history": history, "curve": curve},
                               out / "checkpoint.pt")

    metrics = evaluate(models, data, args)
    z_tr, z_te = metrics.pop("embeddings")
    metrics.update(dim=args.dim, critic=args.critic, loss=args.loss, steps=args.steps,
                   batch_size=args.batch_size, seed=args.seed, data=data_info, device=str(device),
                   precision={"dtype": common.precision_name(dtype), "why": why},
                   wall_time_s=time.time() - started, train_history=history, curve=curve,
                   segments=segments)
    if args.eval_only:  # the run's own files stay as they are
        common.write_json(metrics, out / "metrics_recomputed.json")
        return print(summary(metrics) + f"\nsaved to {out / 'metrics_recomputed.json'}")
    z_ood = {f"z_ood_{name.replace('-', '_')}": embed(models, x) for name, x in shifted.items()}
    with common.atomic_path(out / "embeddings.npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, z_train=z_tr, y_train=y_tr.numpy(), z_test=z_te,
                            y_test=y_te.numpy(), **z_ood)
    common.atomic_save({"models": models.state_dict(), "args": vars(args)}, out / "model.pt")
    common.save_figure(scatter_with_marginals(z_te, y_te.numpy(), args.eps, metrics["capacity"]),
                       out / "scatter.png")
    common.write_json(metrics, out / "metrics.json")
    print(summary(metrics) + f"\nsaved to {out}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.epss is None and args.seeds == 1:
        try:
            return train_and_evaluate(args)
        except common.DataError as err:  # a missing or damaged file: one line, exit code 2
            common.fail(str(err))
    # a sweep: this script once per (eps, seed), --jobs at a time, each with --resume
    jobs = args.jobs or (1 if common.pick_device(args.device).type == "cuda"
                         else min(2, torch.get_num_threads()))
    runs = common.sweep_plan(args, "eps", args.epss or [args.eps], "runs/mnist_uniform")
    quiet = ["--quiet"] if args.quiet or jobs > 1 else []
    codes = common.run_commands([[sys.executable, __file__, "--out", run, "--resume", "--device",
                                  args.device, *quiet] for run in runs], jobs)
    if any(codes):
        common.fail(f"{sum(map(bool, codes))} of {len(codes)} runs failed; repeat the command to "
                    "resume them", code=max(abs(c) for c in codes))


if __name__ == "__main__":
    main()

"""Gaussian distribution matching on MNIST with Noise-Injected Deep InfoMax (Section 5).

Train the Table 2 ConvNet f to maximize I(f(X'); f(X) + Z), X' = X + N(0, 0.6^2) pixel noise,
f(X) normalized by BatchNorm, Z ~ N(0, sigma^2 I): f(X) then approaches N(0, I) (Theorem 3.4).
Saved in --out: the capacity C (eq. 5), the held-out MI, the DM gap C - I_hat >= D_KL(f(X) + Z
|| N(0, (1 + sigma^2) I)) (Lemma B.1), normality tests, downstream accuracies, a Figure 2 scatter.

    python mnist_gauss.py --sigma 0.6                        # minutes on a laptop CPU
    python mnist_gauss.py --sigma 0.6 --paper                # Table 2 / Appendix C settings
    python mnist_gauss.py --sigmas 0 0.1 0.3 1 --seeds 3     # a Figure 1 sweep (subprocesses)
    python mnist_gauss.py --out RUN --resume                 # continue a killed run
    python mnist_gauss.py --out RUN --eval-only              # re-evaluate a finished run
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import common

PAPER = {"batch_size": 1024, "epochs": 2000, "steps": None, "critic": "concat", "loss": "infonce",
         "lr": 1e-3, "aug_sigma": 0.6}  # Appendix C and Table 2
ONE_BATCH = 2000  # most test images in the one-batch MI estimates (B x B scores of every critic)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sigma", type=common.nonnegative_float, default=0.3,
                   help="std of the injected noise Z ~ N(0, sigma^2 I) (Theorem 3.4); 0: plain "
                        "DIM; 0.3 gives C = 2.49 nats, just above the class information log 10")
    p.add_argument("--dim", type=common.positive_int, default=2, help="embedding dim (Figure 1: 2)")
    p.add_argument("--aug-sigma", type=common.nonnegative_float, default=0.6,
                   help="std of the pixel noise X -> X' (Appendix C: 0.6)")
    p.add_argument("--critic", default="separable",
                   choices=["separable", "gaussian", "concat", "bilinear"],
                   help="separable: <phi(a), psi(b)> (Tschannen et al.), the default for its "
                        "cost per step (2.5-4x cheaper than concat, which matches or beats it in "
                        "2000 steps, README); gaussian: the parameter-free Theorem 4.1 critic "
                        "(sigma > 0); concat: Table 2, the paper's; bilinear: a^T W b")
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
    p.add_argument("--sigmas", type=common.nonnegative_float, nargs="+", default=None,
                   help="sweep: one run per sigma (times --seeds) in sub-directories of --out")
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
                                               "default: a new directory under runs/mnist_gauss/")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--eval-only", action="store_true", help="re-evaluate --out from its model.pt")
    p.add_argument("--subsample", type=common.bounded(int, 20), default=128,
                   help="subsample size of the bootstrapped normality tests (sets their power)")
    p.add_argument("--eval-every", type=common.bounded(int, 0), default=0,
                   help="evaluate every N steps into the metrics.json curve (0: off)")
    p.add_argument("--eval-at", type=common.positive_int, nargs="+", default=[], metavar="STEP",
                   help="also evaluate at these steps (log-spaced: 1000 2000 4000 ...); a curve "
                        "point holds sliced W2 (test and train), normality tests, MI and k-NN")
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
    for one, other in (("sigma", "sigmas"), ("steps", "epochs")):
        if getattr(args, one) != p.get_default(one) and getattr(args, other) is not None:
            p.error(f"--{one} and --{other} exclude each other")
    if args.paper:
        if given := [k.replace("_", "-") for k in PAPER if getattr(args, k) != p.get_default(k)]:
            p.error(f"--paper sets --{', --'.join(given)}; drop them or drop --paper")
        vars(args).update(PAPER)
    if args.resume or args.eval_only:
        common.check_resume(p, args, ["sigma"])
    elif args.sigmas is None and args.seeds == 1:
        common.resolve_out(p, args, f"runs/mnist_gauss/sigma{args.sigma:g}_seed{args.seed}")
    if args.critic == "gaussian" and 0 in (args.sigmas or [args.sigma]):
        p.error("--critic gaussian (Theorem 4.1) needs --sigma > 0; else use a learned critic")
    return args


def build_models(args: argparse.Namespace, device: torch.device) -> nn.ModuleDict:
    """Encoder f (Table 2), the normalization of Theorem 3.4 (BatchNorm1d, no affine), critic T."""
    models = nn.ModuleDict({"encoder": common.ConvEncoder(args.dim),
                            "head": common.GaussianHead(args.dim),
                            "critic": common.make_critic(args.critic, args.dim, args.sigma,
                                                         fast=args.critic_impl == "fast")})
    return models.to(device).to(memory_format=torch.channels_last)


def two_views(models: nn.ModuleDict, x: torch.Tensor, args: argparse.Namespace
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """a = f(X') and b = f(X) + Z on one batch of clean images x (Section 3)."""
    x_aug = x + args.aug_sigma * torch.randn_like(x)               # X -> X' (Appendix C)
    with common.autocast(x.device, args.amp):
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
    with common.autocast(x.device, args.amp):
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
def evaluate(models: nn.ModuleDict, data: tuple, args: argparse.Namespace,
             estimates: bool = True) -> dict:
    """Section 5 protocol: held-out MI against C = d/2 log(1 + 1/sigma^2) (eq. 5) and the DM gap
    (Lemma B.1), normality of the clean test embeddings, downstream accuracies and silhouette; with
    `estimates`, InfoNCE, NWJ and DV (eqs. 2-3) of the trained and (sigma > 0) Theorem 4.1 critics
    on the test batches and on one batch of n_test <= ONE_BATCH test images, where InfoNCE's cap
    log B is higher and NWJ / DV can reach C beyond it (README, Higher dimension)."""
    x_tr, y_tr, x_te, y_te = data
    models.train()  # the held-out MI uses the training objective, each branch its own batch
    bs, n_test = min(args.batch_size, len(x_te)), min(len(x_te), ONE_BATCH)
    critics = {"trained": models["critic"]}
    if estimates and args.sigma > 0:
        critics["theorem41"] = common.GaussianCritic(args.sigma)
    with torch.random.fork_rng(devices=[x_te.device] if x_te.device.type == "cuda" else []):
        torch.manual_seed(args.seed + 1)
        batches = [x_te[i:i + bs] for i in range(0, len(x_te) - bs + 1, bs)]
        views = [two_views(models, x, args) for x in batches + [x_te[:n_test]] * estimates]
    with common.autocast(x_te.device, args.amp):
        scores = {name: [t(a, b).float() for a, b in views] for name, t in critics.items()}
    loss = common.mi_loss(args.loss, args.reg_weight, args.clip or None)
    mis = [loss(s)[1].item() for s in scores["trained"][:len(batches)]]
    # eval-mode embeddings: BatchNorm statistics recomputed on the clean training images
    common.recompute_bn_stats(models, lambda x: models["head"](models["encoder"](x)),
                              x_tr, args.batch_size)
    z_tr, z_te = embed(models, x_tr), embed(models, x_te)
    if not (np.isfinite(z_tr).all() and np.isfinite(z_te).all()):
        common.fail("the embeddings are not finite: training diverged; try a smaller --lr", code=3)
    mi, capacity = float(np.mean(mis)), common.gaussian_capacity(args.dim, args.sigma)
    se = float(np.std(mis, ddof=1) / math.sqrt(len(mis))) if len(mis) > 1 else math.nan
    return {"sigma": args.sigma, "capacity": capacity, "mi_heldout": mi, "mi_heldout_se": se,
            "dm_gap": capacity - mi, "class_information": common.LOG10,
            **({"mi_estimates": {"batch": bs, "n_test": n_test, **{
                name: common.bound_estimates_table(s[:-1], s[-1]) for name, s in scores.items()}}}
               if estimates else {}),
            "normality": common.normality_report(z_te, seed=args.seed, subsample=args.subsample),
            "downstream": common.downstream_report(z_tr, y_tr.cpu().numpy(), z_te,
                                                   y_te.cpu().numpy(), seed=args.seed),
            "embeddings": (z_tr, z_te)}


def curve_point(step: int, m: dict) -> dict:
    """One point of the convergence curve: what Figure 1 shows without the null levels (the final
    metrics hold them), plus sliced W2 of the training embeddings (null: N(0, I) of that size)."""
    tests = {k: v for k, v in m["normality"].items() if not k.startswith(("null", "sliced_w2_"))}
    return {"step": step, "mi_heldout": m["mi_heldout"], "knn_acc": m["downstream"]["knn_acc"],
            "sliced_w2_train": common.sliced_w2(m["embeddings"][0]), **tests}


def summary(m: dict) -> str:
    d = m["downstream"]
    return "\n".join([
        f"capacity C = {m['capacity']:.3f} nats   (class information log 10 = {common.LOG10:.3f})",
        f"MI estimate (held-out) = {m['mi_heldout']:.3f} +- {m['mi_heldout_se']:.3f}"
        f"   DM gap C - I = {m['dm_gap']:.3f}",
        *[f"  one batch of {m['mi_estimates']['n_test']} test images, {name} critic: "
          + "   ".join(f"{k} {e['whole'][0]:.3f} +- {e['whole'][1]:.3f}" for k, e in est.items())
          for name, est in m.get("mi_estimates", {}).items() if isinstance(est, dict)],
        *common.normality_lines(m["normality"]),
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
               desc=f"sigma={args.sigma:g} seed={args.seed}", dynamic_ncols=True,
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
        if done < args.steps and (done in args.eval_at
                                  or args.eval_every and done % args.eval_every == 0):
            curve.append(curve_point(done, evaluate(models, data, args, estimates=False)))
        if done % args.ckpt_every == 0 or done == args.steps:
            cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
            common.atomic_save({"step": done, "models": models.state_dict(),
                                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                "rng": torch.get_rng_state(), "cuda_rng": cuda_rng,
                                "segments": segments, "history": history, "curve": curve},
                               out / "checkpoint.pt")

    metrics = evaluate(models, data, args)
    if curve or args.eval_at:  # the curve ends at the final evaluation
        curve.append(curve_point(args.steps, metrics))
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
    title = f"sigma = {args.sigma:g}, C = {metrics['capacity']:.2f} nats"
    common.save_figure(common.scatter_embeddings(z_te, y_te.numpy(), title), out / "scatter.png")
    common.write_json(metrics, out / "metrics.json")
    print(summary(metrics) + f"\nsaved to {out}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.sigmas is None and args.seeds == 1:
        try:
            return train_and_evaluate(args)
        except common.DataError as err:  # a missing or damaged file: one line, exit code 2
            common.fail(str(err))
    # a sweep: this script once per (sigma, seed), --jobs at a time, each with --resume
    jobs = args.jobs or (1 if common.pick_device(args.device).type == "cuda"
                         else min(2, torch.get_num_threads()))
    runs = common.sweep_plan(args, "sigma", args.sigmas or [args.sigma], "runs/mnist_gauss")
    quiet = ["--quiet"] if args.quiet or jobs > 1 else []
    codes = common.run_commands([[sys.executable, __file__, "--out", run, "--resume", "--device",
                                  args.device, *quiet] for run in runs], jobs)
    if any(codes):
        common.fail(f"{sum(map(bool, codes))} of {len(codes)} runs failed; repeat the command to "
                    "resume them", code=max(abs(c) for c in codes))


if __name__ == "__main__":
    main()

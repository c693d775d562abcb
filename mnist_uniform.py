"""Uniform distribution matching on MNIST with Noise-Injected Deep InfoMax (Section 3.2).

Train the Table 2 ConvNet f to maximize I(f(X'); f(X) + Z) with f(X) squashed into [0, 1]^d by
Phi(BatchNorm(.)) and Z ~ U[-eps, eps]^d (Theorem 3.5). The embeddings then approach U[0, 1]^d.
The run ends with the capacity C = d log(1 + 1/(2 eps)) (eq. 6), the MI a continuous uniform
embedding would reach (Remark 3.6), the held-out MI estimate, the DM gap (Lemma B.4), uniformity
tests (normality tests after the probability integral transform Phi^-1, Section 3.3, and
per-coordinate Kolmogorov-Smirnov tests), downstream accuracies and a scatter with histograms.

    python mnist_uniform.py --eps 0.1           # minutes on a laptop CPU
    python mnist_uniform.py --eps 0.1 --paper   # Table 2 / Appendix C settings
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from torch import nn

from common import (
    ConvEncoder,
    UniformNoise,
    add_run_flags,
    check_run_args,
    evaluate_infomax,
    make_critic,
    pyplot,
    run_all,
    to_gaussian,
    uniform_capacity,
    uniformity_report,
)


def half_width(text: str) -> float:
    """argparse type: eps in (0, 1/2), where Theorem 3.5 and Remark 3.6 hold."""
    value = float(text)
    if not 0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1/2) (Theorem 3.5), got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--eps", type=half_width, default=0.1,
                   help="half-width of the injected noise Z ~ U[-eps, eps]^d (Theorem 3.5)")
    p.add_argument("--epss", type=half_width, nargs="+", default=None,
                   help="sweep: one run per eps (times --seeds) in sub-directories of --out")
    add_run_flags(p, critics=["separable", "concat", "bilinear"], default_critic="separable")
    return check_run_args(p, p.parse_args(argv), key="eps", script="mnist_uniform")


def build_models(args: argparse.Namespace, device: torch.device) -> nn.ModuleDict:
    """Encoder f (Table 2), uniform noise head (Phi(BatchNorm) + Z) and a learned critic T."""
    models = nn.ModuleDict({"encoder": ConvEncoder(args.dim),
                            "head": UniformNoise(args.dim, args.eps),
                            "critic": make_critic(args.critic, args.dim,
                                                  fast=args.critic_impl == "fast")})
    return models.to(device).to(memory_format=torch.channels_last)


def evaluate(models: nn.ModuleDict, data: tuple, args: argparse.Namespace) -> dict:
    """Section 5 protocol with C = d log(1 + 1/(2 eps)) (eq. 6), normality tests after Phi^-1,
    per-coordinate KS tests, and the MI d (eps - log 2 eps) of U[0, 1]^d (Remark 3.6)."""
    metrics = evaluate_infomax(models, data, args, uniform_capacity(args.dim, args.eps),
                               transform=to_gaussian)
    return {"eps": args.eps, "mi_at_uniform": args.dim * (args.eps - math.log(2 * args.eps)),
            "uniformity": uniformity_report(metrics["embeddings"][1]), **metrics}


def figures(metrics: dict, u_te: np.ndarray, y_te: np.ndarray) -> dict:
    """The test embeddings in the unit square coloured by digit, and each coordinate's histogram."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 5))
    points = axes[0].scatter(u_te[:, 0], u_te[:, 1 % u_te.shape[1]], c=y_te, cmap="tab10", s=3,
                             alpha=0.7, vmin=-0.5, vmax=9.5)
    fig.colorbar(points, ax=axes[0], ticks=range(10), label="label")
    axes[0].set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xlabel="$u_1$", ylabel="$u_2$",
                title=f"eps = {metrics['eps']:g}, C = {metrics['capacity']:.2f} nats")
    for i in range(min(u_te.shape[1], 4)):
        axes[1].hist(u_te[:, i], bins=40, range=(0, 1), density=True, histtype="step",
                     label=f"$u_{i + 1}$")
    axes[1].axhline(1.0, color="k", linestyle="--", label="U[0, 1]")
    axes[1].set(xlabel="value", ylabel="density", title="marginals")
    axes[1].legend()
    return {"scatter.png": fig}


def main(argv: list[str] | None = None) -> None:
    run_all(parse_args(argv), "eps", build_models, evaluate, figures)


if __name__ == "__main__":
    main()

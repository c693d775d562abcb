"""Evaluate saved runs of mnist_gauss.py / mnist_uniform.py (Section 5, Figure 1).

Three modes:

    python evaluate.py runs/sweep [RUN_DIR ...] --out figure1
        Figure 1: every metric against the capacity C, mean over seeds with 99% confidence
        intervals, the sigma = 0 and untrained-encoder baselines as horizontal lines; writes
        PREFIX.png, PREFIX.pdf, PREFIX.md and PREFIX.csv, prints the table, and lists every run
        whose MI estimate exceeds its bound C by more than 3 standard errors.
    python evaluate.py --embeddings RUN_DIR/embeddings.npz [--uniform]
        The normality tests (and downstream accuracies when labels are present) of Section 5 on
        saved embeddings (an .npz of a run, or an (n, d) .npy array), printed as JSON.
    python evaluate.py --checkpoint RUN_DIR
        Recompute a run's metrics from its model.pt; writes RUN_DIR/metrics_recomputed.json.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch

import mnist_gauss
import mnist_uniform
from common import (
    LOG10,
    atomic_path,
    downstream_report,
    fail,
    normality_report,
    pick_device,
    positive_int,
    pyplot,
    run_data,
    run_record,
    save_figure,
    summary,
    to_gaussian,
    uniformity_report,
    write_json,
)

Z99 = float(scipy.stats.norm.ppf(0.995))
"""z_{0.995}: the 99% two-sided asymptotic confidence interval is mean +- Z99 * s / sqrt(n)."""

METRICS = [("dagostino_p", "normality.dagostino_p", "D'Agostino-Pearson p"),
           ("shapiro_p", "normality.shapiro_p", "Shapiro-Wilk p"),
           ("henze_zirkler_p", "normality.henze_zirkler_p", "Henze-Zirkler p"),
           ("mi_heldout", "mi_heldout", "MI estimate (nats)"),
           ("gnb_acc", "downstream.gnb_acc", "GaussianNB accuracy"),
           ("knn_acc", "downstream.knn_acc", "k-NN accuracy"),
           ("mlp_acc", "downstream.mlp_acc", "MLP accuracy"),
           ("silhouette", "downstream.silhouette", "silhouette")]
"""The panels of Figure 1: (column name, entry of metrics.json, title)."""
UNIFORM_METRICS = [("ks_p_mean", "uniformity.ks_p_mean", "Kolmogorov-Smirnov p (mean)"),
                   ("ks_stat_max", "uniformity.ks_stat_max", "Kolmogorov-Smirnov D (max)")]
"""Extra panels for uniform DM (Section 3.2): per-coordinate tests against U[0, 1]."""

FAMILIES = {"sigma": ("Gaussian", "σ", "eq. 5"), "eps": ("uniform", "ε", "eq. 6")}
"""Noise key in metrics.json -> (name, symbol, capacity equation)."""
SHARED = ("dim", "data.dataset", "data.split", "data.n_train", "data.n_test",
          "normality.subsample")
"""Settings every run of one figure must share: embedding size, data, power of the tests."""
TRAINING = ("critic", "loss", "steps", "batch_size")
"""Settings shared by all trained runs, and within each baseline."""


# --------------------------------------------------------------------------------------------
# Mode 1: Figure 1 from many runs
# --------------------------------------------------------------------------------------------

def mean_ci99(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 99% asymptotic confidence interval (Figure 1).

    half-width = z_{0.995} s / sqrt(n), s the sample standard deviation (ddof = 1); NaN for a
    single value, which has no interval.
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), Z99 * float(x.std(ddof=1)) / math.sqrt(len(x))


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    """tree["a"]["b"] for dotted = "a.b"; KeyError when an entry is missing."""
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def find_runs(paths: list[str]) -> list[Path]:
    """Run directories (those holding metrics.json) at or below each path, in sorted order."""
    found: dict[Path, None] = {}
    for name in paths:
        path = Path(name)
        if not path.exists():
            fail(f"{path} does not exist")
        runs = sorted(file.parent for file in path.rglob("metrics.json")) if path.is_dir() else []
        if not runs:
            fail(f"{path} holds no metrics.json: expected a run directory of mnist_gauss.py / "
                 "mnist_uniform.py or a folder of them")
        found.update((run.resolve(), None) for run in runs)
    return list(found)


def load_run(path: Path) -> dict[str, Any]:
    """The entries of path/metrics.json that Figure 1 needs, as floats ("inf" -> inf)."""
    file = path / "metrics.json"
    try:
        saved = json.loads(file.read_text())
        noise_key = "eps" if "eps" in saved else "sigma"
        metrics = METRICS + (UNIFORM_METRICS if noise_key == "eps" else [])
        return {"path": path, "noise_key": noise_key, "noise": float(saved[noise_key]),
                "capacity": float(saved["capacity"]), "seed": saved["seed"],
                "mi_se": float(saved["mi_heldout_se"]),
                "kind": ("untrained" if saved["steps"] == 0
                         else "no noise" if math.isinf(float(saved["capacity"])) else "trained"),
                "values": {name: float(lookup(saved, key)) for name, key, _ in metrics},
                "settings": {key: lookup(saved, key) for key in SHARED + TRAINING}}
    except KeyError as err:
        fail(f"{file} lacks the entry {err}")
    except (OSError, ValueError, TypeError) as err:
        fail(f"{file} is not a valid metrics.json ({err})")


def check_same(runs: list[dict[str, Any]], keys: tuple[str, ...], what: str) -> None:
    """Stop with one line when two runs to be averaged together differ in one of `keys`."""
    for key in keys:
        first = runs[0]
        for run in runs[1:]:
            if run["settings"][key] != first["settings"][key]:
                fail(f"{first['path']} and {run['path']} differ in {key} "
                     f"({first['settings'][key]!r} vs {run['settings'][key]!r}): "
                     f"{what} must share it")


def group_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per noise value of the trained runs, then one per baseline (kind, noise value).

    Refuses Gaussian and uniform runs together, runs whose shared settings differ, and two
    runs with the same seed in one row (averaging them would count one seed twice).
    """
    families = {run["noise_key"] for run in runs}
    if len(families) > 1:
        gauss = next(r for r in runs if r["noise_key"] == "sigma")
        unif = next(r for r in runs if r["noise_key"] == "eps")
        fail(f"cannot mix Gaussian (sigma) and uniform (eps) runs in one figure: "
             f"{gauss['path']} is Gaussian, {unif['path']} is uniform")
    check_same(runs, SHARED, "runs of one figure")
    trained = [run for run in runs if run["kind"] == "trained"]
    if not trained:
        fail(f"none of the {len(runs)} runs is a trained run with finite capacity C")
    check_same(trained, TRAINING, "the trained runs of one figure")
    groups: dict[tuple[int, float], list[dict[str, Any]]] = {}
    order = {"trained": 0, "no noise": 1, "untrained": 2}
    for run in runs:
        groups.setdefault((order[run["kind"]], run["noise"]), []).append(run)
    rows = []
    for (_, noise), members in sorted(groups.items()):
        kind = members[0]["kind"]
        if kind != "trained":
            check_same(members, TRAINING, f"the {kind} baseline runs")
        seeds: dict[Any, Path] = {}
        for run in members:
            if run["seed"] in seeds:
                fail(f"{seeds[run['seed']]} and {run['path']} are both seed {run['seed']} of "
                     f"{run['noise_key']} = {noise:g} ({kind}): pass only one of them")
            seeds[run["seed"]] = run["path"]
        names = members[0]["values"]
        rows.append({"kind": kind, "noise": noise, "capacity": members[0]["capacity"],
                     "seeds": len(members),
                     **{name: mean_ci99([run["values"][name] for run in members])
                        for name in names}})
    return rows


def baseline_label(row: dict[str, Any], symbol: str) -> str:
    """How a baseline row is named in the legend of Figure 1."""
    if row["kind"] == "no noise":
        return f"{symbol} = 0 (no noise)"
    return f"untrained encoder ({symbol} = {row['noise']:g})"


def mi_bound_violations(runs: list[dict[str, Any]]) -> list[str]:
    """Trained runs whose held-out MI exceeds the capacity C by more than 3 standard errors.

    Theorems 3.4 and 3.5 bound I(f(X'); f(X) + Z) by C (eqs. 5, 6); an estimate above it is a
    bug, not a result. A run without a standard error (one held-out batch) is held to I <= C.
    """
    lines = []
    for run in runs:
        se = run["mi_se"] if math.isfinite(run["mi_se"]) else 0.0
        mi, capacity = run["values"]["mi_heldout"], run["capacity"]
        if run["kind"] == "trained" and mi > capacity + 3 * se:
            lines.append(f"  {run['path']}: I = {mi:.3f} +- {se:.3f} > C = {capacity:.3f}")
    return lines


def fmt(x: float) -> str:
    """A table cell: 3 decimals, scientific for tiny p-values."""
    if not math.isfinite(x):
        return str(x)
    return f"{x:.1e}" if 0 < abs(x) < 1e-3 else f"{x:.3f}"


def markdown(rows: list[dict[str, Any]], metrics: list[tuple[str, str, str]], symbol: str,
             caption: str) -> str:
    """The numbers of Figure 1 as a markdown table: mean +- 99% CI half-width per metric."""
    header = ["runs", symbol, "C", "seeds", *(title for _, _, title in metrics)]
    lines = [caption, "", "| " + " | ".join(header) + " |",
             "| --- | " + " | ".join("---:" for _ in header[1:]) + " |"]
    for row in rows:
        cells = [row["kind"], f"{row['noise']:g}", fmt(row["capacity"]), str(row["seeds"])]
        for name, _, _ in metrics:
            mean, half = row[name]
            cells.append(fmt(mean) if math.isnan(half) else f"{fmt(mean)} ± {fmt(half)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(rows: list[dict[str, Any]], metrics: list[tuple[str, str, str]],
             noise_key: str) -> str:
    """The same numbers as CSV: NAME_mean and NAME_ci99 (half-width, nan for one seed)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["kind", noise_key, "capacity", "seeds",
                     *(f"{name}_{stat}" for name, _, _ in metrics for stat in ("mean", "ci99"))])
    for row in rows:
        writer.writerow([row["kind"], row["noise"], row["capacity"], row["seeds"],
                         *(value for name, _, _ in metrics for value in row[name])])
    return buffer.getvalue()


def plot_figure1(rows: list[dict[str, Any]], metrics: list[tuple[str, str, str]], symbol: str,
                 title: str) -> Any:
    """Figure 1: each metric against capacity C, mean over seeds with 99% CI error bars.

    Dashed: the bound I = C in the MI panel; dotted: C = log 10, below which the noisy channel
    cannot carry the digit; horizontal lines: the baselines (mean over their seeds).
    """
    plt = pyplot()
    ncols = 4
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    trained = [row for row in rows if row["kind"] == "trained"]
    baselines = [row for row in rows if row["kind"] != "trained"]
    capacity = [row["capacity"] for row in trained]
    for ax, (name, _, panel) in zip(axes.flat, metrics, strict=False):
        mean = [row[name][0] for row in trained]
        half = np.nan_to_num([row[name][1] for row in trained])
        ax.errorbar(capacity, mean, yerr=half, fmt="o-", capsize=3, color="C0",
                    label="trained: mean ± 99% CI")
        for i, row in enumerate(baselines):
            ax.axhline(row[name][0], color=f"C{i + 1}", linestyle="-.",
                       label=baseline_label(row, symbol))
        if name == "mi_heldout":
            # through a plotted point, so that the line does not stretch the axes
            ax.axline((capacity[0], capacity[0]), slope=1, color="k", linestyle="--",
                      linewidth=1, label="bound I = C")
            legend_ax = ax
        ax.axvline(LOG10, color="gray", linestyle=":", label="C = log 10")
        ax.set(title=panel, xlabel="capacity C (nats)")
    for ax in axes.flat[len(metrics):]:
        ax.remove()
    handles, labels = legend_ax.get_legend_handles_labels()
    fig.suptitle(title)
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(labels), 4))
    return fig


def aggregate(paths: list[str], prefix: str) -> None:
    """Mode 1: Figure 1, its table (markdown and CSV) and the MI-bound check for many runs."""
    runs = [load_run(path) for path in find_runs(paths)]
    rows = group_rows(runs)
    noise_key = runs[0]["noise_key"]
    family, symbol, equation = FAMILIES[noise_key]
    metrics = METRICS + (UNIFORM_METRICS if noise_key == "eps" else [])
    settings = runs[0]["settings"]
    trained = [run for run in runs if run["kind"] == "trained"]
    first = trained[0]["settings"]
    about = (f"{family} DM, d = {settings['dim']}, {settings['data.dataset']}, "
             f"{first['critic']} critic, {first['steps']} steps, "
             f"normality tests on {settings['normality.subsample']}-point subsamples")
    caption = (f"Figure 1 ({about}): mean ± 99% CI half-width over seeds "
               f"(z = {Z99:.3f}, none for one seed); C from {equation}")
    violations = mi_bound_violations(runs)
    check = (f"MI check (I <= C + 3 SE, {equation}): "
             + (f"{len(violations)} of {len(trained)} trained runs exceed the bound:\n"
                + "\n".join(violations) if violations
                else f"no trained run exceeds the bound ({len(trained)} checked)"))
    text = markdown(rows, metrics, symbol, caption) + "\n\n" + check + "\n"
    out = Path(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = plot_figure1(rows, metrics, symbol, f"Figure 1: {about}")
    for suffix in ("png", "pdf"):
        save_figure(fig, f"{out}.{suffix}")
    with atomic_path(f"{out}.md") as tmp:
        Path(tmp).write_text(text)
    with atomic_path(f"{out}.csv") as tmp:
        Path(tmp).write_text(csv_text(rows, metrics, noise_key))
    print(text + f"\nsaved {out}.png, {out}.pdf, {out}.md, {out}.csv")


# --------------------------------------------------------------------------------------------
# Mode 2: tests on saved embeddings
# --------------------------------------------------------------------------------------------

def embeddings_report(file: Path, uniform: bool, subsample: int, seed: int) -> dict[str, Any]:
    """Section 5 normality tests of the test embeddings; downstream scores when labelled.

    With `uniform` (Section 3.3) the embeddings must lie in [0, 1]^d: they are tested against
    U[0, 1] coordinate by coordinate (Kolmogorov-Smirnov) and, after the probability integral
    transform Phi^-1, for normality. Downstream scores use the embeddings as saved.
    """
    try:
        loaded = np.load(file, allow_pickle=False)
        arrays = ({k: loaded[k] for k in loaded.files} if isinstance(loaded, np.lib.npyio.NpzFile)
                  else {"z_test": loaded})
    except FileNotFoundError:
        fail(f"{file} does not exist")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        fail(f"{file} is not a NumPy .npy/.npz file ({str(err).splitlines()[0]})")
    if "z_test" not in arrays:
        fail(f"{file} holds no z_test array (a run's embeddings.npz holds z_train, y_train, "
             "z_test, y_test)")
    z = np.asarray(arrays["z_test"], dtype=np.float64)
    if z.ndim != 2 or not np.isfinite(z).all():
        fail(f"{file}: expected a finite (n, d) array of embeddings, got shape {z.shape}")
    if uniform and (z.min() < 0 or z.max() > 1):
        fail(f"{file}: --uniform needs embeddings in [0, 1], found [{z.min():.3g}, {z.max():.3g}]")
    report: dict[str, Any] = {"file": str(file), "n": len(z), "dim": z.shape[1],
                              "uniform": uniform}
    try:
        if uniform:
            report["uniformity"] = uniformity_report(z)
        report["normality"] = normality_report(to_gaussian(z) if uniform else z, seed=seed,
                                               subsample=subsample)
        if {"z_train", "y_train", "y_test"} <= arrays.keys():
            report["downstream"] = downstream_report(arrays["z_train"], arrays["y_train"], z,
                                                     arrays["y_test"], seed=seed)
    except ValueError as err:
        fail(f"{file}: {str(err).splitlines()[0]}")
    return report


# --------------------------------------------------------------------------------------------
# Mode 3: recompute a run's metrics from its saved model
# --------------------------------------------------------------------------------------------

def recompute(run_dir: Path, device_name: str) -> dict[str, Any]:
    """A run's evaluate() (Section 5 protocol) on its model.pt, with the run's own settings.

    Data and models are prepared exactly as common.run_infomax prepares them, so on the run's
    device the numbers reproduce metrics.json.
    """
    args_file = run_dir / "args.json"
    if not args_file.is_file():
        fail(f"{run_dir} holds no args.json: not a run directory of mnist_gauss.py / "
             "mnist_uniform.py")
    try:
        saved = json.loads(args_file.read_text())
    except (OSError, ValueError) as err:
        fail(f"{args_file} is not valid JSON ({err})")
    script = mnist_uniform if "eps" in saved else mnist_gauss
    args = script.parse_args(["--out", str(run_dir), "--resume", "--quiet",
                              "--device", device_name])
    device = pick_device(args.device)
    started = time.time()
    data, data_info = run_data(args, device)
    models = script.build_models(args, device)
    model_file = run_dir / "model.pt"
    if not model_file.is_file():
        fail(f"{run_dir} holds no model.pt: the run has not finished")
    try:
        models.load_state_dict(torch.load(model_file, map_location=device,
                                          weights_only=True)["models"])
    except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as err:
        fail(f"{model_file} does not hold this run's models ({str(err).splitlines()[0]})")
    metrics = script.evaluate(models, data, args)
    del metrics["embeddings"]
    metrics.update(run_record(args, device, data_info, started))
    return metrics


def compare_with_saved(run_dir: Path) -> str:
    """One line: do metrics_recomputed.json and metrics.json of run_dir hold the same numbers?"""
    saved_file = run_dir / "metrics.json"
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError) as err:
        return f"nothing to compare with: {saved_file} is unreadable ({err})"
    again = json.loads((run_dir / "metrics_recomputed.json").read_text())
    differ = [key for key in again if key not in ("data", "device", "wall_time_s")
              and saved.get(key) != again[key]]
    return (f"identical to {saved_file}" if not differ
            else f"differs from {saved_file} in: {', '.join(differ)}")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show the defaults and keep the mode list of the module docstring as written."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help="Figure 1 mode: run directories, or folders searched recursively for "
                        "run directories (those holding metrics.json)")
    p.add_argument("--out", default="figure1", metavar="PREFIX",
                   help="Figure 1 mode: write PREFIX.png, PREFIX.pdf, PREFIX.md, PREFIX.csv")
    p.add_argument("--embeddings", default=None, metavar="FILE",
                   help="embeddings mode: a run's embeddings.npz (z_test tested; z_train, "
                        "y_train, y_test give downstream scores) or an (n, d) .npy array")
    p.add_argument("--uniform", action="store_true",
                   help="embeddings in [0, 1]^d (uniform DM, Section 3.3): Kolmogorov-Smirnov "
                        "tests against U[0, 1], normality tests after Phi^-1")
    p.add_argument("--subsample", type=positive_int, default=128,
                   help="subsample size of the bootstrapped normality tests (as in the scripts)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the test subsamples, projections and MLP (a run used its --seed)")
    p.add_argument("--json-out", default=None, metavar="FILE",
                   help="embeddings mode: also write the report to FILE")
    p.add_argument("--checkpoint", default=None, metavar="RUN_DIR",
                   help="checkpoint mode: recompute the run's metrics from RUN_DIR/model.pt")
    p.add_argument("--device", default="auto",
                   help="checkpoint mode: auto (CUDA when present), cpu, cuda; the run's own "
                        "device reproduces its numbers exactly")
    args = p.parse_args(argv)
    if bool(args.runs) + (args.embeddings is not None) + (args.checkpoint is not None) != 1:
        p.error("give run directories, --embeddings FILE or --checkpoint RUN_DIR (one mode)")
    if args.embeddings is None and (args.uniform or args.json_out):
        p.error("--uniform and --json-out go with --embeddings")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.runs:
        aggregate(args.runs, args.out)
    elif args.embeddings is not None:
        report = embeddings_report(Path(args.embeddings), args.uniform, args.subsample,
                                   args.seed)
        if args.json_out:
            write_json(report, args.json_out)
        print(json.dumps(report, indent=2))
    else:
        run_dir = Path(args.checkpoint)
        if not run_dir.is_dir():
            fail(f"{run_dir} is not a directory")
        metrics = recompute(run_dir, args.device)
        write_json(metrics, run_dir / "metrics_recomputed.json")
        print(summary(metrics))
        print(compare_with_saved(run_dir)
              + f"\nsaved to {run_dir / 'metrics_recomputed.json'}")


if __name__ == "__main__":
    main()

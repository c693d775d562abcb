"""Evaluate saved runs of mnist_gauss.py / mnist_uniform.py / cifar_ssl.py (Section 5).

Four modes:

    python evaluate.py runs/sweep [RUN_DIR ...] --out figure1
        Figure 1: every metric against the capacity C, mean over seeds with 99% confidence
        intervals, the sigma = 0 and untrained-encoder baselines as horizontal lines; writes
        PREFIX.png, PREFIX.pdf, PREFIX.md and PREFIX.csv, prints the table, and lists every run
        whose MI estimate exceeds its bound C by more than 3 standard errors. For a sigma sweep
        of cifar_ssl.py runs (poster Figure 2) the panels are the normality p-values of the
        normalized projector outputs and the probe accuracies, against sigma.
    python evaluate.py --table runs/cifar_ssl [RUN_DIR ...] --out table1
        Table 1: linear-probe top-1 / top-5 of cifar_ssl.py runs by method and sigma, next to
        the paper's numbers; VICReg runs on ImageFolder trees of 100 or 1000 classes at 128 px
        or more go into poster Table 2 (ImageNet-100 / 1k, mean +- std over seeds); prints the
        tables and writes PREFIX.md.
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
from collections.abc import Callable
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
    read_json,
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

SSL_METRICS = METRICS[:3] + [
    ("top1", "probe.top1", "linear probe top-1"),
    ("top5", "probe.top5", "linear probe top-5"),
    ("online_top1", "online_probe.test_top1", "online probe top-1")]
"""The panels for cifar_ssl.py runs: normality of the normalized projector outputs, probes."""

FAMILIES = {"sigma": ("Gaussian", "σ", "eq. 5"), "eps": ("uniform", "ε", "eq. 6"),
            "ssl": ("SSL Gaussian", "σ", "eq. 5")}
"""Kind of run -> (name, symbol, capacity equation): mnist_gauss.py, mnist_uniform.py,
cifar_ssl.py."""
SHARED = ("dim", "data.dataset", "data.split", "data.n_train", "data.n_test",
          "normality.subsample")
"""Settings every run of one figure must share: embedding size, data, power of the tests."""
TRAINING = ("critic", "loss", "steps", "batch_size")
"""Settings shared by all trained runs, and within each baseline."""
SSL_SHARED = ("dim", "data.dataset", "data.n_train", "probe_images.train", "probe_images.test",
              "normality.subsample")
SSL_TRAINING = ("method", "arch", "steps", "batch_size")
"""The same for cifar_ssl.py runs."""

PAPER_TABLE1 = {
    ("simclr", 0.0): (90.83, 99.76, 65.64, 89.91), ("simclr", 0.1): (90.96, 99.72, 67.03, 90.49),
    ("simclr", 0.3): (91.56, 99.77, 65.72, 89.76), ("simclr", 0.5): (90.51, 99.74, 65.58, 89.56),
    ("vicreg", 0.0): (90.63, 99.67, 65.71, 88.96), ("vicreg", 0.1): (91.09, 99.68, 68.92, 90.50),
    ("vicreg", 0.3): (90.75, 99.61, 67.31, 89.89), ("vicreg", 0.5): (91.02, 99.75, 66.52, 89.66)}
"""Paper Table 1 (800 epochs): (CIFAR-10 top-1, top-5, CIFAR-100 top-1, top-5) in %."""
PAPER_TABLE2 = {
    0.0: ((72.18, 0.40), (92.02, 0.12), (67.41, 0.17), (87.43, 0.08)),
    0.05: ((72.27, 0.38), (91.99, 0.18), (67.29, 0.20), (87.47, 0.06)),
    0.1: ((72.07, 0.27), (91.65, 0.13), (67.30, 0.13), (87.43, 0.02)),
    0.2: ((71.68, 0.50), (91.61, 0.24), (67.19, 0.12), (87.32, 0.09))}
"""Poster Table 2 (VICReg, 100 epochs), by sigma: (ImageNet-100 top-1, top-5, ImageNet-1k
top-1, top-5) as (mean, std over seeds) in %."""


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
                 "mnist_uniform.py / cifar_ssl.py or a folder of them")
        found.update((run.resolve(), None) for run in runs)
    return list(found)


def panels(family: str) -> list[tuple[str, str, str]]:
    """The metrics Figure 1 shows for runs of one family (a key of FAMILIES)."""
    return {"sigma": METRICS, "eps": METRICS + UNIFORM_METRICS, "ssl": SSL_METRICS}[family]


def settings_of(family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(settings all runs of a figure share, settings shared within trained runs / baselines)."""
    return (SSL_SHARED, SSL_TRAINING) if family == "ssl" else (SHARED, TRAINING)


def load_run(path: Path) -> dict[str, Any]:
    """The entries of path/metrics.json that Figure 1 needs, as floats ("inf" -> inf; a test
    that was not run, null, -> nan)."""
    file = path / "metrics.json"
    try:
        saved = json.loads(file.read_text())
        family = "ssl" if "method" in saved else "eps" if "eps" in saved else "sigma"
        noise_key = "eps" if family == "eps" else "sigma"
        shared, training = settings_of(family)
        return {"path": path, "family": family, "noise_key": noise_key,
                "noise": float(saved[noise_key]), "capacity": float(saved["capacity"]),
                "seed": saved["seed"], "mi_se": float(saved.get("mi_heldout_se", math.nan)),
                "kind": ("untrained" if saved["steps"] == 0
                         else "no noise" if math.isinf(float(saved["capacity"])) else "trained"),
                "values": {name: math.nan if lookup(saved, key) is None
                           else float(lookup(saved, key)) for name, key, _ in panels(family)},
                "settings": {key: lookup(saved, key) for key in shared + training},
                "saved": saved}
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


def refuse_repeated_seeds(members: list[dict[str, Any]], what: str) -> None:
    """Stop with one line when two runs averaged together share a seed (it would count twice)."""
    seeds: dict[Any, Path] = {}
    for run in members:
        if run["seed"] in seeds:
            fail(f"{seeds[run['seed']]} and {run['path']} are both seed {run['seed']} of "
                 f"{what}: pass only one of them")
        seeds[run["seed"]] = run["path"]


def group_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per noise value of the trained runs, then one per baseline (kind, noise value).

    Refuses runs of different families (Gaussian, uniform, SSL) together, runs whose shared
    settings differ, and two runs with the same seed in one row (averaging them would count one
    seed twice).
    """
    families = [family for family in FAMILIES if any(run["family"] == family for run in runs)]
    if len(families) > 1:
        first, second = (next(r for r in runs if r["family"] == f) for f in families[:2])
        fail(f"cannot mix {FAMILIES[families[0]][0]} ({families[0]}) and "
             f"{FAMILIES[families[1]][0]} ({families[1]}) runs in one figure: {first['path']} is "
             f"{FAMILIES[families[0]][0]}, {second['path']} is {FAMILIES[families[1]][0]}")
    shared, training = settings_of(families[0])
    check_same(runs, shared, "runs of one figure")
    trained = [run for run in runs if run["kind"] == "trained"]
    if not trained:
        fail(f"none of the {len(runs)} runs is a trained run with finite capacity C")
    check_same(trained, training, "the trained runs of one figure")
    groups: dict[tuple[int, float], list[dict[str, Any]]] = {}
    order = {"trained": 0, "no noise": 1, "untrained": 2}
    for run in runs:
        groups.setdefault((order[run["kind"]], run["noise"]), []).append(run)
    rows = []
    for (_, noise), members in sorted(groups.items()):
        kind = members[0]["kind"]
        if kind != "trained":
            check_same(members, training, f"the {kind} baseline runs")
        refuse_repeated_seeds(members, f"{members[0]['noise_key']} = {noise:g} ({kind})")
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
                 title: str, against_noise: bool = False) -> Any:
    """Figure 1: each metric against capacity C, mean over seeds with 99% CI error bars.

    Dashed: the bound I = C in the MI panel; dotted: C = log 10, below which the noisy channel
    cannot carry the digit; horizontal lines: the baselines (mean over their seeds).
    `against_noise`: the noise level on the x-axis instead of C (cifar_ssl.py sweeps, where C
    grows with the projector's dimension and the paper's tables are indexed by sigma).
    """
    plt = pyplot()
    ncols = 4
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    trained = [row for row in rows if row["kind"] == "trained"]
    baselines = [row for row in rows if row["kind"] != "trained"]
    capacity = [row["capacity"] for row in trained]
    x = [row["noise"] for row in trained] if against_noise else capacity
    legend_ax = axes.flat[0]
    for ax, (name, _, panel) in zip(axes.flat, metrics, strict=False):
        mean = [row[name][0] for row in trained]
        half = np.nan_to_num([row[name][1] for row in trained])
        ax.errorbar(x, mean, yerr=half, fmt="o-", capsize=3, color="C0",
                    label="trained: mean ± 99% CI")
        for i, row in enumerate(baselines):
            ax.axhline(row[name][0], color=f"C{i + 1}", linestyle="-.",
                       label=baseline_label(row, symbol))
        if name == "mi_heldout":
            # through a plotted point, so that the line does not stretch the axes
            ax.axline((capacity[0], capacity[0]), slope=1, color="k", linestyle="--",
                      linewidth=1, label="bound I = C")
            legend_ax = ax
        if against_noise:
            ax.set(title=panel, xlabel=f"noise {symbol}")
        else:
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
    noise_key, ssl = runs[0]["noise_key"], runs[0]["family"] == "ssl"
    family, symbol, equation = FAMILIES[runs[0]["family"]]
    metrics = panels(runs[0]["family"])
    settings = runs[0]["settings"]
    trained = [run for run in runs if run["kind"] == "trained"]
    first = trained[0]["settings"]
    model = (f"{first['method']} {first['arch']}, projector output" if ssl
             else f"{first['critic']} critic,")
    about = (f"{family} DM, {model} d = {settings['dim']}, {settings['data.dataset']}, "
             f"{first['steps']} steps, "
             f"normality tests on {settings['normality.subsample']}-point subsamples")
    caption = (f"Figure 1 ({about}): mean ± 99% CI half-width over seeds "
               f"(z = {Z99:.3f}, none for one seed); C from {equation}")
    if ssl:  # the SSL losses give no MI estimate to hold against C
        check = "MI check: none (cifar_ssl.py runs record no MI estimate)"
    else:
        violations = mi_bound_violations(runs)
        check = (f"MI check (I <= C + 3 SE, {equation}): "
                 + (f"{len(violations)} of {len(trained)} trained runs exceed the bound:\n"
                    + "\n".join(violations) if violations
                    else f"no trained run exceeds the bound ({len(trained)} checked)"))
    text = markdown(rows, metrics, symbol, caption) + "\n\n" + check + "\n"
    out = Path(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = plot_figure1(rows, metrics, symbol, f"Figure 1: {about}", against_noise=ssl)
    for suffix in ("png", "pdf"):
        save_figure(fig, f"{out}.{suffix}")
    with atomic_path(f"{out}.md") as tmp:
        Path(tmp).write_text(text)
    with atomic_path(f"{out}.csv") as tmp:
        Path(tmp).write_text(csv_text(rows, metrics, noise_key))
    print(text + f"\nsaved {out}.png, {out}.pdf, {out}.md, {out}.csv")


# --------------------------------------------------------------------------------------------
# Mode 2: Table 1 from cifar_ssl.py runs
# --------------------------------------------------------------------------------------------

TABLE_DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
METHOD_NAMES = {"simclr": "SimCLR", "vicreg": "VICReg"}
UNTRAINED = ("untrained", 0.0)
"""The Table 1 row of random-init encoders (--steps 0), whatever their method and sigma."""


def table_cell(values: list[float], paper: float | None) -> str:
    """Our mean in % (± 99% CI half-width over seeds when there are several), then the paper's
    number in parentheses; "–" where there is no run or no paper number."""
    ours = "–"
    if values:
        mean, half = mean_ci99(values)
        ours = f"{100 * mean:.2f}" + ("" if math.isnan(half) else f" ± {100 * half:.2f}")
    return ours + ("" if paper is None else f" ({paper:.2f})")


def check_seeds(members: list[dict[str, Any]], what: str) -> None:
    """The runs of one table cell must share their settings and differ in their seeds."""
    check_same(members, ("arch", "steps", "batch_size", "probe_images.train",
                         "probe_images.test"), what)
    refuse_repeated_seeds(members, what)


def table1_text(runs: list[dict[str, Any]]) -> str:
    """Table 1 in the paper's layout (method x sigma rows; top-1 / top-5 per dataset), our runs
    next to the paper's numbers; datasets beyond CIFAR get columns of their own, and random-init
    encoders (--steps 0) a row of their own. Runs of one cell are seeds of one setting."""
    cells: dict[tuple[tuple[str, float], str], list[dict[str, Any]]] = {}
    for run in runs:
        row = (UNTRAINED if run["kind"] == "untrained"
               else (run["saved"]["method"], run["noise"]))
        cells.setdefault((row, run["saved"]["dataset"]), []).append(run)
    for (row, dataset), members in cells.items():
        check_seeds(members, f"the runs of {row[0]} sigma = {row[1]:g} on {dataset}")
    datasets = list(TABLE_DATASETS) + sorted({key[1] for key in cells} - set(TABLE_DATASETS))
    rows = sorted(set(PAPER_TABLE1) | {key[0] for key in cells} - {UNTRAINED})
    rows += [UNTRAINED] if any(key[0] == UNTRAINED for key in cells) else []
    header = ["", *(f"{TABLE_DATASETS.get(d, d)} top-{k}" for d in datasets for k in (1, 5))]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for method, sigma in rows:
        label = ("random-init encoder" if (method, sigma) == UNTRAINED
                 else METHOD_NAMES[method] + ("" if sigma == 0 else f" σ = {sigma:g}"))
        row = [label]
        for d in datasets:
            probes = [run["saved"]["probe"] for run in cells.get(((method, sigma), d), [])]
            paper = PAPER_TABLE1.get((method, sigma)) if d in TABLE_DATASETS else None
            offset = 2 * list(TABLE_DATASETS).index(d) if paper else 0
            for k, key in enumerate(("top1", "top5")):
                row.append(table_cell([probe[key] for probe in probes],
                                      paper[offset + k] if paper else None))
        lines.append("| " + " | ".join(row) + " |")
    return ("Table 1: linear-probe accuracy (%) on the test split, ours (paper's in parentheses: "
            "ResNet-18, 800 epochs, batch 256)\n\n" + "\n".join(lines)
            + f"\n\nour runs ({len(runs)}): {run_notes(runs, lambda r: r['saved']['dataset'])}\n")


def run_notes(runs: list[dict[str, Any]], name: Callable[[dict[str, Any]], str]) -> str:
    """The settings of the runs of a table, one entry per data set (`name` of a run)."""
    settings = sorted({(name(r), r["saved"]["arch"], round(r["saved"]["epochs"], 2),
                        r["saved"]["batch_size"], r["saved"]["probe_images"]["train"])
                       for r in runs})
    return "; ".join(f"{d}: {arch}, {epochs:g} epochs, batch {batch}, probe on {n} images"
                     for d, arch, epochs, batch, n in settings)


TABLE2_DATASETS = {100: "ImageNet-100", 1000: "ImageNet-1k"}
"""Poster Table 2's columns, by the number of classes of the ImageFolder tree."""


def in_table2(run: dict[str, Any]) -> bool:
    """A VICReg run (or random-init encoder) on an ImageFolder tree of 100 or 1000 classes at
    128 px or more: the ImageNet-100 / ImageNet-1k setting of poster Table 2 (224 px)."""
    saved = run["saved"]
    return (saved["dataset"] == "folder" and saved["method"] == "vicreg"
            and saved["data"].get("n_classes") in TABLE2_DATASETS
            and saved["data"].get("image_size", 0) >= 128)


def mean_std_cell(values: list[float], paper: tuple[float, float] | None) -> str:
    """Our mean in % (± standard deviation over seeds, ddof 1, when there are several), then
    the poster's mean ± std in parentheses; "–" where there is no run or no poster number."""
    ours = "–"
    if values:
        ours = f"{100 * np.mean(values):.2f}" + (f" ± {100 * np.std(values, ddof=1):.2f}"
                                                 if len(values) > 1 else "")
    return ours + ("" if paper is None else f" ({paper[0]:.2f} ± {paper[1]:.2f})")


def table2_text(runs: list[dict[str, Any]]) -> str:
    """Poster Table 2 in its layout: one row per sigma (the poster's four and any other of our
    runs, then the random-init encoder), top-1 / top-5 on ImageNet-100 and ImageNet-1k, our mean
    ± std over seeds next to the poster's."""
    cells: dict[tuple[float | str, int], list[dict[str, Any]]] = {}
    for run in runs:
        row = "untrained" if run["kind"] == "untrained" else run["noise"]
        cells.setdefault((row, run["saved"]["data"]["n_classes"]), []).append(run)
    for (row, classes), members in cells.items():
        check_seeds(members, f"the runs of sigma = {row} on {TABLE2_DATASETS[classes]}")
    sigmas = sorted(set(PAPER_TABLE2) | {row for row, _ in cells if row != "untrained"})
    rows: list[float | str] = [*sigmas]
    rows += ["untrained"] if any(row == "untrained" for row, _ in cells) else []
    header = ["σ", *(f"{name} top-{k}" for name in TABLE2_DATASETS.values() for k in (1, 5))]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for row in rows:
        line = ["random-init encoder" if row == "untrained" else f"{row:g}"]
        paper = PAPER_TABLE2.get(row) if row != "untrained" else None
        for c, classes in enumerate(TABLE2_DATASETS):
            probes = [run["saved"]["probe"] for run in cells.get((row, classes), [])]
            for k, key in enumerate(("top1", "top5")):
                line.append(mean_std_cell([probe[key] for probe in probes],
                                          paper[2 * c + k] if paper else None))
        lines.append("| " + " | ".join(line) + " |")
    return ("Table 2 (poster): VICReg linear-probe accuracy (%) on the validation split, ours "
            "(poster's in parentheses: ResNet-50, 100 epochs; mean ± std over seeds)\n\n"
            + "\n".join(lines) + f"\n\nour runs ({len(runs)}): "
            + run_notes(runs, lambda r: TABLE2_DATASETS[r["saved"]["data"]["n_classes"]]) + "\n")


def table1(paths: list[str], prefix: str) -> None:
    """Mode 2: print Table 1 (and poster Table 2 when there are ImageNet runs) from cifar_ssl.py
    run directories and write PREFIX.md."""
    runs = [load_run(path) for path in find_runs(paths)]
    for run in runs:
        if run["family"] != "ssl":
            fail(f"{run['path']} is not a cifar_ssl.py run (its metrics.json has no method)")
    imagenet = [run for run in runs if in_table2(run)]
    others = [run for run in runs if not in_table2(run)]
    parts = [table1_text(others)] if others or not imagenet else []
    text = "\n".join(parts + ([table2_text(imagenet)] if imagenet else []))
    out = Path(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(f"{out}.md") as tmp:
        Path(tmp).write_text(text)
    print(text + f"\nsaved {out}.md")


# --------------------------------------------------------------------------------------------
# Mode 3: tests on saved embeddings
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
# Mode 4: recompute a run's metrics from its saved model
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
    saved = read_json(args_file)
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
                   help="Figure 1 and Table 1 modes: run directories, or folders searched "
                        "recursively for run directories (those holding metrics.json)")
    p.add_argument("--table", action="store_true",
                   help="Table 1 mode: the RUN_DIRs are cifar_ssl.py runs")
    p.add_argument("--out", default=None, metavar="PREFIX",
                   help="Figure 1 mode: write PREFIX.png, PREFIX.pdf, PREFIX.md, PREFIX.csv "
                        "(default figure1); Table 1 mode: PREFIX.md (default table1)")
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
    if args.table and not args.runs:
        p.error("--table needs the cifar_ssl.py run directories")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        table1(args.runs, args.out or "table1")
    elif args.runs:
        aggregate(args.runs, args.out or "figure1")
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

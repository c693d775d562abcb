"""End-to-end tests of mnist_gauss.py on a tiny data set in MNIST's IDX format."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_core import write_idx

import common
import mnist_gauss
from common import SHIPPED_MNIST, load_mnist

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    """400 train and 200 test real digits from the shipped test split, written as IDX files."""
    root = tmp_path_factory.mktemp("tiny_mnist")
    x, y = load_mnist(SHIPPED_MNIST, train=False)
    images = (x[:, 0] * 255).round().numpy()
    for split, sl in (("train", slice(0, 400)), ("t10k", slice(400, 600))):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images[sl])
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", y[sl].numpy())
    return root


def run(tiny_mnist, out, *flags):
    mnist_gauss.main(["--data-dir", str(tiny_mnist), "--batch-size", "64", "--subsample", "32",
                      "--quiet", "--out", str(out), *flags])
    return json.loads((out / "metrics.json").read_text())


def comparable(metrics):
    return {k: v for k, v in metrics.items() if k not in ("wall_time_s", "train_history")}


def test_short_run_writes_metrics_and_files(tiny_mnist, tmp_path):
    metrics = run(tiny_mnist, tmp_path / "run", "--steps", "4", "--sigma", "0.5")
    assert metrics["capacity"] == pytest.approx(np.log(5))
    assert metrics["dm_gap"] == pytest.approx(metrics["capacity"] - metrics["mi_heldout"])
    assert metrics["data"]["n_train"] == 400 and metrics["data"]["n_test"] == 200
    assert metrics["normality"]["subsample"] == 32
    for key in ("dagostino_p", "shapiro_p", "henze_zirkler_p"):
        assert 0 <= metrics["normality"][key] <= 1
    for key in ("gnb_acc", "knn_acc", "mlp_acc"):
        assert 0 <= metrics["downstream"][key] <= 1
    assert metrics["steps"] == 4
    for name in ("args.json", "checkpoint.pt", "model.pt", "embeddings.npz", "scatter.png"):
        assert (tmp_path / "run" / name).is_file()
    emb = np.load(tmp_path / "run" / "embeddings.npz")
    assert emb["z_test"].shape == (200, 2)
    # eval-mode embeddings are normalized with statistics recomputed on the training images
    assert np.allclose(emb["z_train"].mean(0), 0, atol=0.05)
    assert np.allclose(emb["z_train"].std(0), 1, atol=0.05)


def test_same_seed_same_metrics_and_resume_continues_exactly(tiny_mnist, tmp_path):
    flags = ("--steps", "6", "--sigma", "0.3", "--ckpt-every", "3", "--log-every", "3")
    full = run(tiny_mnist, tmp_path / "a", *flags)
    again = run(tiny_mnist, tmp_path / "b", *flags)
    assert comparable(full) == comparable(again)
    # a run killed after its step-3 checkpoint: train 3 steps, then resume the 6-step run
    part = tmp_path / "c"
    run(tiny_mnist, part, *flags[2:], "--steps", "3")
    saved = json.loads((part / "args.json").read_text())
    saved["steps"] = 6
    (part / "args.json").write_text(json.dumps(saved))
    (part / "metrics.json").unlink()
    mnist_gauss.main(["--out", str(part), "--resume", "--quiet"])
    resumed = json.loads((part / "metrics.json").read_text())
    assert comparable(resumed) == comparable(full)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_mnist, tmp_path, monkeypatch):
    calls = []

    def loss_turning_nan(name, reg_weight):
        def loss(scores):
            calls.append(1)
            value = scores.mean() * (float("nan") if len(calls) > 3 else 1.0)
            return value, value.detach()
        return loss

    monkeypatch.setattr(common, "mi_loss", loss_turning_nan)
    with pytest.raises(SystemExit) as exc:
        run(tiny_mnist, tmp_path / "run", "--steps", "6", "--ckpt-every", "2", "--log-every", "2")
    assert exc.value.code == 3
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("critic,loss", [("separable", "infonce"), ("concat", "nwj"),
                                         ("bilinear", "js"), ("gaussian", "redv"),
                                         ("separable", "renwj"), ("gaussian", "dv")])
def test_every_critic_and_loss_trains(tiny_mnist, tmp_path, critic, loss):
    sigma = "0" if critic == "separable" and loss == "infonce" else "0.5"
    metrics = run(tiny_mnist, tmp_path / "run", "--steps", "2", "--sigma", sigma,
                  "--critic", critic, "--loss", loss)
    assert np.isfinite(metrics["mi_heldout"])


@pytest.mark.parametrize("flags,message", [
    (["--sigma", "-1"], "--sigma"),
    (["--dim", "0"], "--dim"),
    (["--sigma", "0", "--critic", "gaussian"], "Theorem 4.1"),
    (["--steps", "-5"], "--steps"),
    (["--resume"], "--resume"),
])
def test_bad_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        mnist_gauss.parse_args(flags)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_existing_out_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit):
        mnist_gauss.parse_args(["--out", str(tmp_path)])
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "metrics.json").read_text() == "{}"


def test_missing_data_dir_is_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "mnist_gauss.py"), "--data-dir",
                           str(tmp_path), "--out", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "train-images-idx3-ubyte" in lines[0] and "--data-dir" in lines[0]
    assert not (tmp_path / "run").exists()


def test_bench_prints_fast_and_reference_side_by_side(capsys):
    mnist_gauss.main(["--bench", "1", "--batch-size", "32", "--critic", "concat",
                      "--device", "cpu"])
    out = capsys.readouterr().out
    run, reference = (re.search(rf"{name}: +([0-9.]+) ms/step .*critic concat \(([a-z ,]+)\)",
                                out) for name in ("this run", "reference"))
    assert run.group(2).startswith("first layer split") and "bf16" in out.splitlines()[1]
    assert reference.group(2) == "all pairs materialised" and "float32" in out.splitlines()[2]
    ratio = float(reference.group(1)) / float(run.group(1))
    speed_up = float(re.search(r"speed-up ([0-9.]+)x", out).group(1))
    assert speed_up == pytest.approx(ratio, rel=0.02, abs=0.06)
    assert "--paper (116000 steps at batch 1024" in out and "2000 steps" in out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("extra", [[], ["--compile"]])
def test_cuda_autocast_and_compile_paths(tiny_mnist, tmp_path, extra):
    metrics = run(tiny_mnist, tmp_path / "run", "--steps", "3", "--device", "cuda", *extra)
    assert metrics["device"].startswith("cuda") and np.isfinite(metrics["mi_heldout"])

"""Tests of mnist_uniform.py (Section 3.2) and of the sweeps of both MNIST scripts."""
import json
import math
import re
import zipfile

import numpy as np
import pytest
import torch
from conftest import TINY_FLAGS as FLAGS

import mnist_gauss
import mnist_uniform
from common import infonce, uniformity_report


@pytest.mark.parametrize("eps", ["0.7", "0", "0.5", "-0.1"])
def test_eps_outside_open_half_interval_is_rejected(eps, capsys):
    with pytest.raises(SystemExit) as exc:
        mnist_uniform.parse_args(["--eps", eps])
    assert exc.value.code == 2
    assert "(0, 0.5)" in capsys.readouterr().err


class InnerProduct(torch.nn.Module):
    """A critic T(a, b) = <a, b> that keeps the views it was given."""

    def forward(self, a, b):
        self.views = (a, b)
        return a @ b.T


def test_infomax_loss_adds_uniform_z_to_the_squashed_clean_branch(tmp_path):
    args = mnist_uniform.parse_args(["--eps", "0.2", "--dim", "3", "--no-amp",
                                     "--out", str(tmp_path / "unused")])
    torch.manual_seed(0)
    models = mnist_uniform.build_models(args, torch.device("cpu")).train()
    models["critic"] = InnerProduct()
    x = torch.rand(2048, 1, 24, 24)
    torch.manual_seed(1)
    loss, mi = mnist_uniform.infomax_loss(models, x, args)
    a, b = models["critic"].views
    assert torch.equal(loss, infonce(a @ b.T)[0]) and torch.equal(mi, infonce(a @ b.T)[1])
    torch.manual_seed(1)
    x_aug = x + 0.6 * torch.randn_like(x)
    with torch.no_grad():
        clean, augmented = (models["head"](models["encoder"](v)) for v in (x, x_aug))
    assert torch.allclose(a, augmented, atol=1e-5) and a.min() >= 0 and a.max() <= 1
    z = b - clean  # Z ~ U[-0.2, 0.2]^3: variance 0.2^2 / 3
    assert z.abs().max() <= 0.2 + 1e-6 and z.abs().max() > 0.19
    assert torch.allclose(z.var(0), torch.full((3,), 0.04 / 3), rtol=0.1)


def test_short_uniform_run_writes_metrics(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    mnist_uniform.main(["--data-dir", str(tiny_mnist), "--out", str(out), "--steps", "3",
                        "--eps", "0.2", *FLAGS])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["capacity"] == pytest.approx(2 * math.log(1 + 1 / 0.4))
    assert metrics["mi_at_uniform"] == pytest.approx(2 * (0.2 - math.log(0.4)))
    assert metrics["mi_at_uniform"] < metrics["capacity"]
    assert 0 <= metrics["uniformity"]["ks_p_mean"] <= 1
    assert 0 <= metrics["normality"]["henze_zirkler_p"] <= 1
    u = np.load(out / "embeddings.npz")["z_test"]
    assert u.shape == (200, 2) and u.min() >= 0 and u.max() <= 1
    with zipfile.ZipFile(out / "embeddings.npz") as npz:  # np.savez_compressed
        assert {entry.compress_type for entry in npz.infolist()} == {zipfile.ZIP_DEFLATED}
    assert (out / "scatter.png").is_file()


def test_eval_every_curve_and_resume_continue_exactly(run_script, same_metrics, tmp_path):
    flags = ("--steps", "6", "--eps", "0.2", "--ckpt-every", "3", "--log-every", "3",
             "--eval-every", "2")
    full = run_script(mnist_uniform, tmp_path / "a", *flags)
    assert [point["step"] for point in full["curve"]] == [2, 4]  # the final metrics hold step 6
    assert all(0 <= point["knn_acc"] <= 1 for point in full["curve"])
    # a run killed after its step-3 checkpoint: train 3 steps, then resume the 6-step run
    part = tmp_path / "b"
    run_script(mnist_uniform, part, *flags[2:], "--steps", "3")
    saved = json.loads((part / "args.json").read_text())
    (part / "args.json").write_text(json.dumps({**saved, "steps": 6}))
    (part / "metrics.json").unlink()
    mnist_uniform.main(["--out", str(part), "--resume", "--quiet"])
    assert same_metrics(json.loads((part / "metrics.json").read_text()), full)


def test_uniformity_report_separates_uniform_from_peaked():
    rng = np.random.default_rng(0)
    assert uniformity_report(rng.uniform(size=(2000, 2)))["ks_p_mean"] > 0.05
    peaked = uniformity_report(rng.beta(2, 2, size=(2000, 2)))
    assert peaked["ks_p_mean"] < 1e-6 and peaked["ks_stat_max"] > 0.05


def test_sweep_runs_every_combination_and_skips_finished_runs(tiny_mnist, tmp_path):
    parent = tmp_path / "sweep"
    argv = ["--data-dir", str(tiny_mnist), "--out", str(parent), "--steps", "2",
            "--epss", "0.1", "0.3", "--seeds", "2", "--seed", "5", "--jobs", "1", *FLAGS]
    mnist_uniform.main(argv)
    names = sorted(p.name for p in parent.iterdir())
    assert names == ["eps0.1_seed5", "eps0.1_seed6", "eps0.3_seed5", "eps0.3_seed6"]
    saved = json.loads((parent / "eps0.3_seed6" / "args.json").read_text())
    assert (saved["eps"], saved["seed"], saved["seeds"], saved["epss"]) == (0.3, 6, 1, None)
    stamps = {n: (parent / n / "metrics.json").stat().st_mtime_ns for n in names}
    mnist_uniform.main(argv)  # the same command again: every run is finished
    assert stamps == {n: (parent / n / "metrics.json").stat().st_mtime_ns for n in names}
    with pytest.raises(SystemExit) as exc:  # other settings into the same parent: nothing runs
        mnist_uniform.main([*argv, "--lr", "0.01", "--epss", "0.45", "0.1"])
    assert exc.value.code == 2
    assert not (parent / "eps0.45_seed5").exists()


def test_gaussian_sweep_with_seeds_only(tiny_mnist, tmp_path, capsys):
    parent = tmp_path / "sweep"
    mnist_gauss.main(["--data-dir", str(tiny_mnist), "--out", str(parent), "--steps", "2",
                      "--sigma", "0.4", "--seeds", "2", "--jobs", "1", *FLAGS])
    assert sorted(p.name for p in parent.iterdir()) == ["sigma0.4_seed0", "sigma0.4_seed1"]
    a, b = (json.loads((parent / n / "metrics.json").read_text())
            for n in ("sigma0.4_seed0", "sigma0.4_seed1"))
    assert a["mi_heldout"] != b["mi_heldout"]
    with pytest.raises(SystemExit):
        mnist_gauss.parse_args(["--sigmas", "0.5", "0", "--critic", "gaussian"])
    assert "Theorem 4.1" in capsys.readouterr().err


def test_parallel_sweep_reproduces_the_sequential_one(tiny_mnist, same_metrics, tmp_path,
                                                       capsys, monkeypatch):
    argv = ["--data-dir", str(tiny_mnist), "--steps", "3", "--sigmas", "0.2", "0.5", *FLAGS]
    with monkeypatch.context() as m:
        m.setenv("OMP_NUM_THREADS", "1")  # what each of the two workers gets on 2 cores
        mnist_gauss.main([*argv, "--out", str(tmp_path / "sequential"), "--jobs", "1"])
    mnist_gauss.main([*argv, "--out", str(tmp_path / "parallel"), "--jobs", "2"])
    assert re.search(r"\[2/2\] .*sigma0\.[25]_seed0 --resume .* finished", capsys.readouterr().out)
    for name in ("sigma0.2_seed0", "sigma0.5_seed0"):
        a, b = (json.loads((tmp_path / mode / name / "metrics.json").read_text())
                for mode in ("sequential", "parallel"))
        assert same_metrics(a, b)


def test_sweep_values_sharing_a_folder_are_refused_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        mnist_gauss.main(["--sigmas", "0.1", "0.1000001", "--out", str(tmp_path / "s")])
    assert exc.value.code == 2
    assert "share the run directory" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_failed_runs_of_a_parallel_sweep_set_the_exit_code(tiny_mnist, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        mnist_gauss.main(["--data-dir", str(tiny_mnist), "--steps", "3", "--sigmas", "0.2", "0.5",
                          "--lr", "1e30", "--jobs", "2", "--out", str(tmp_path), *FLAGS])
    assert exc.value.code == 3
    assert "2 of 2 runs failed" in capsys.readouterr().err

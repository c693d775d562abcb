"""End-to-end tests of mnist_gauss.py on a tiny data set in MNIST's IDX format."""
import json
import re
import zipfile

import numpy as np
import pytest
import torch

import mnist_gauss


def test_two_views_adds_z_to_the_clean_branch_only_each_normalized_over_its_own_batch(tmp_path):
    args = mnist_gauss.parse_args(["--sigma", "0.5", "--dim", "3", "--out", str(tmp_path / "new")])
    args.dtype = torch.float32
    torch.manual_seed(0)
    models = mnist_gauss.build_models(args, torch.device("cpu")).train()
    x = torch.rand(4096, 1, 24, 24)
    torch.manual_seed(1)
    a, b = mnist_gauss.two_views(models, x, args)
    torch.manual_seed(1)
    x_aug = x + 0.6 * torch.randn_like(x)
    with torch.no_grad():
        clean, augmented = (models["head"](models["encoder"](v)) for v in (x, x_aug))
    assert torch.allclose(a, augmented, atol=1e-5)  # a = BN(f(X')) over X' alone, no noise
    assert torch.allclose(a.var(0, unbiased=False), torch.ones(3), atol=1e-3)
    assert torch.allclose(clean.var(0, unbiased=False), torch.ones(3), atol=1e-3)
    z = b - clean  # b = BN(f(X)) + Z, Z ~ N(0, 0.5^2 I)
    assert torch.allclose(z.std(0), torch.full((3,), 0.5), atol=0.02)
    assert torch.allclose(b.var(0), torch.full((3,), 1.25), atol=0.08)


def test_short_run_prints_its_data_and_writes_metrics_and_files(run_script, tmp_path, capsys):
    metrics = run_script(mnist_gauss, tmp_path / "run", "--steps", "4", "--sigma", "0.5")
    printed = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"mnist: 400 training / 200 test images \(official train/test, .*\)",
                        printed[1])
    assert metrics["capacity"] == pytest.approx(np.log(5))
    assert metrics["dm_gap"] == pytest.approx(metrics["capacity"] - metrics["mi_heldout"])
    assert metrics["data"]["n_train"] == 400 and metrics["data"]["n_test"] == 200
    assert metrics["normality"]["subsample"] == 32
    for key in ("dagostino_p", "shapiro_p", "henze_zirkler_p"):
        assert 0 <= metrics["normality"][key] <= 1
    for key in ("gnb_acc", "knn_acc", "mlp_acc"):
        assert 0 <= metrics["downstream"][key] <= 1
    assert metrics["steps"] == 4 and metrics["curve"] == []
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [  # no temporary file left behind
        "args.json", "checkpoint.pt", "embeddings.npz", "metrics.json", "model.pt", "scatter.png"]
    emb = np.load(run / "embeddings.npz")
    assert emb["z_test"].shape == (200, 2)
    assert emb["z_test"].dtype == np.float32 and emb["y_test"].dtype == np.int64
    with zipfile.ZipFile(run / "embeddings.npz") as npz:  # np.savez_compressed
        assert {entry.compress_type for entry in npz.infolist()} == {zipfile.ZIP_DEFLATED}
    # eval-mode embeddings are normalized with statistics recomputed on the training images
    assert np.allclose(emb["z_train"].mean(0), 0, atol=0.05)
    assert np.allclose(emb["z_train"].std(0), 1, atol=0.05)


def test_non_invariance_is_zero_without_augmentation_and_grows_with_it(run_script, tmp_path):
    """E (f(X') - f(X))^2 per coordinate of the trained encoder's test embeddings (Var f_i = 1):
    X' = X without augmentation noise, farther apart the stronger the noise."""
    flags = ("--steps", "2", "--sigma", "0.5")
    none, default, strong = (run_script(mnist_gauss, tmp_path / name, *flags, "--aug-sigma", s)
                             for name, s in (("none", "0"), ("default", "0.6"), ("strong", "3")))
    assert none["non_invariance"] == 0.0 and none["aug_sigma"] == 0.0
    assert 0 < default["non_invariance"] < strong["non_invariance"]


def test_non_invariance_nats_is_half_log_det_of_one_plus_residual_over_sigma2(tmp_path):
    """Lemma B.1's last term I(f(X) + Z; f(X) | f(X')) <= 1/2 log det(I + R / sigma^2), R the
    residual covariance of f(X) after its least-squares fit on f(X'), here from the normal
    equations on a linear encoder; 0 when X' = X."""
    args = mnist_gauss.parse_args(["--sigma", "0.4", "--out", str(tmp_path / "r")])
    args.dtype = torch.float32
    torch.manual_seed(0)
    models = mnist_gauss.build_models(args, torch.device("cpu"))
    models["encoder"] = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(576, 2))
    gen = torch.Generator().manual_seed(1)
    x_tr, x_te = (torch.rand(n, 1, 24, 24, generator=gen) for n in (300, 200))
    data = (x_tr, torch.arange(300) % 3, x_te, torch.arange(200) % 3)
    for aug in (0.6, 0.0):
        args.aug_sigma = aug
        metrics = mnist_gauss.evaluate(models, data, args, estimates=False)
        noise = torch.randn(x_te.shape, generator=torch.Generator().manual_seed(args.seed + 2))
        z, z_aug = mnist_gauss.embed(models, x_te), mnist_gauss.embed(models, x_te + aug * noise)
        c = np.cov(np.hstack([z, z_aug]).T)
        r = c[:2, :2] - c[:2, 2:] @ np.linalg.inv(c[2:, 2:]) @ c[2:, :2]
        expected = 0.5 * np.linalg.slogdet(np.eye(2) + r / 0.4 ** 2)[1]
        assert metrics["non_invariance_nats"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert metrics["non_invariance"] == pytest.approx(np.mean((z_aug - z) ** 2), rel=1e-6)
    assert expected == pytest.approx(0.0, abs=1e-9)


def test_mi_estimates_per_critic_and_one_batch_capped(run_script, tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_gauss, "ONE_BATCH", 150)  # the tiny test split has 200 images
    metrics = run_script(mnist_gauss, tmp_path / "run", "--steps", "2", "--sigma", "0.5")
    est = metrics["mi_estimates"]
    assert est["batch"] == 64 and est["n_test"] == 150
    assert set(est) == {"batch", "n_test", "trained", "theorem41"}
    for critic in ("trained", "theorem41"):
        for name in ("infonce", "nwj", "dv"):
            assert len(est[critic][name]["batch"]) == 2 and len(est[critic][name]["whole"]) == 2
        assert est[critic]["infonce"]["whole"][0] <= np.log(150) + 1e-6
    # the InfoNCE of the trained critic on the test batches is the held-out MI estimate
    assert est["trained"]["infonce"]["batch"][0] == pytest.approx(metrics["mi_heldout"])


def test_summary_names_a_diverged_run_and_hides_a_learned_critics_nwj_and_dv(run_script,
                                                                              tmp_path):
    metrics = run_script(mnist_gauss, tmp_path / "run", "--steps", "2", "--sigma", "0.5")
    assert metrics["diverged"] == []  # 2 steps: too short to judge the loss; MI not < -3 SE
    lines = mnist_gauss.summary(metrics).splitlines()
    assert not any("DIVERGED" in line for line in lines)
    trained = next(line for line in lines if "trained critic" in line)
    theorem41 = next(line for line in lines if "theorem41 critic" in line)
    assert "infonce" in trained and "nwj" not in trained and "dv" not in trained
    assert all(name in theorem41 for name in ("infonce", "nwj", "dv"))
    metrics["diverged"] = ["held-out MI -0.388 +- 0.049: < -3 SE"]
    assert "DIVERGED, not a result: held-out MI -0.388" in mnist_gauss.summary(metrics)


def test_same_seed_same_metrics_and_resume_continues_exactly(run_script, same_metrics,
                                                              tmp_path):
    flags = ("--steps", "6", "--sigma", "0.3", "--ckpt-every", "3", "--log-every", "3")
    full = run_script(mnist_gauss, tmp_path / "a", *flags)
    again = run_script(mnist_gauss, tmp_path / "b", *flags)
    assert same_metrics(full, again)
    # a run killed after its step-3 checkpoint: train 3 steps, then resume the 6-step run
    part = tmp_path / "c"
    run_script(mnist_gauss, part, *flags[2:], "--steps", "3")
    saved = json.loads((part / "args.json").read_text())
    (part / "args.json").write_text(json.dumps({**saved, "steps": 6}))
    (part / "metrics.json").unlink()
    mnist_gauss.main(["--out", str(part), "--resume", "--quiet"])
    resumed = json.loads((part / "metrics.json").read_text())
    assert same_metrics(resumed, full)
    precision = full["precision"]["dtype"]
    assert full["segments"] == [[0, "cpu", precision]]
    assert resumed["segments"] == [[0, "cpu", precision], [3, "cpu", precision]]


def test_a_repeated_sweep_command_starts_then_passes_by_each_run(run_script, tmp_path, capsys):
    """The shell loop of a sweep types every setting and --resume: the first time it starts the
    run (a folder not there yet), the next time it leaves the finished run as it is."""
    out = tmp_path / "sweep" / "sigma0.4_seed1"
    flags = ("--steps", "2", "--sigma", "0.4", "--seed", "1", "--resume")
    metrics = run_script(mnist_gauss, out, *flags)
    assert metrics["sigma"] == 0.4 and metrics["seed"] == 1
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_script(mnist_gauss, out, *flags)
    assert exc.value.code is None and "is finished" in capsys.readouterr().out
    assert files == {p.name: p.read_bytes() for p in out.iterdir()}


def test_eval_only_reproduces_the_metrics_and_keeps_the_run(run_script, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = run_script(mnist_gauss, out, "--steps", "4", "--sigma", "0.4")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    mnist_gauss.main(["--out", str(out), "--eval-only", "--quiet"])
    again = json.loads((out / "metrics_recomputed.json").read_text())
    for key in ("mi_heldout", "normality", "downstream", "capacity"):
        assert again[key] == metrics[key]
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in before}
    assert "metrics_recomputed.json" in capsys.readouterr().out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(run_script, tmp_path, monkeypatch,
                                                          capsys):
    calls = []

    def loss_turning_nan(name, reg_weight, clip):
        def loss(scores):
            calls.append(1)
            value = scores.mean() * (float("nan") if len(calls) > 3 else 1.0)
            return value, value.detach()
        return loss

    monkeypatch.setattr(mnist_gauss.common, "mi_loss", loss_turning_nan)
    with pytest.raises(SystemExit) as exc:
        run_script(mnist_gauss, tmp_path / "run", "--steps", "6", "--ckpt-every", "2",
                   "--log-every", "2")
    assert exc.value.code == 3
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "step 4" in lines[0] and "--lr" in lines[0]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("critic,loss", [("separable", "infonce"), ("concat", "nwj"),
                                         ("bilinear", "js"), ("gaussian", "redv"),
                                         ("separable", "renwj"), ("gaussian", "dv")])
def test_every_critic_and_loss_trains(run_script, tmp_path, critic, loss):
    sigma = "0" if critic == "separable" and loss == "infonce" else "0.5"
    metrics = run_script(mnist_gauss, tmp_path / "run", "--steps", "2", "--sigma", sigma,
                         "--critic", critic, "--loss", loss)
    assert np.isfinite(metrics["mi_heldout"])


def test_bench_times_the_training_step_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mnist_gauss.main(["--bench", "1", "--batch-size", "32", "--critic", "concat",
                      "--device", "cpu"])
    out = capsys.readouterr().out
    assert re.fullmatch(r"cpu, (float32|bfloat16 autocast), batch 32, critic concat: "
                        r"[0-9.]+ ms/step, [0-9]+ images/s\n", out)
    assert not any(tmp_path.iterdir())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("extra", [[], ["--compile"]])
def test_cuda_autocast_and_compile_paths(run_script, tmp_path, extra):
    metrics = run_script(mnist_gauss, tmp_path / "run", "--steps", "3", "--device", "cuda",
                         *extra)
    assert metrics["device"].startswith("cuda") and np.isfinite(metrics["mi_heldout"])

"""Tests of mnist_uniform.py (Section 3.2), and of the curve format both MNIST scripts share."""
import json
import math
import zipfile

import numpy as np
import pytest
import torch

import common
import mnist_gauss
import mnist_uniform
from common import infonce, uniformity_report


class InnerProduct(torch.nn.Module):
    """A critic T(a, b) = <a, b> that keeps the views it was given."""

    def forward(self, a, b):
        self.views = (a, b)
        return a @ b.T


def test_infomax_loss_adds_uniform_z_to_the_squashed_clean_branch(tmp_path):
    args = mnist_uniform.parse_args(["--eps", "0.2", "--dim", "3", "--out", str(tmp_path / "new")])
    args.dtype = torch.float32
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


def test_short_uniform_run_writes_metrics(run_script, tmp_path):
    out = tmp_path / "run"
    metrics = run_script(mnist_uniform, out, "--steps", "3", "--eps", "0.2")
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


def test_eval_at_curve_and_resume_continue_exactly(run_script, same_metrics, tmp_path):
    flags = ("--steps", "6", "--eps", "0.2", "--ckpt-every", "3", "--log-every", "3",
             "--eval-at", "2", "4")
    full = run_script(mnist_uniform, tmp_path / "a", *flags)
    assert [point["step"] for point in full["curve"]] == [2, 4, 6]  # 6: the final evaluation
    assert all(0 <= point["knn_acc"] <= 1 for point in full["curve"])
    # a run killed after its step-3 checkpoint: train 3 steps, then resume the 6-step run
    part = tmp_path / "b"
    run_script(mnist_uniform, part, *flags[2:], "--steps", "3")
    saved = json.loads((part / "args.json").read_text())
    (part / "args.json").write_text(json.dumps({**saved, "steps": 6}))
    (part / "metrics.json").unlink()
    mnist_uniform.main(["--out", str(part), "--resume", "--quiet"])
    assert same_metrics(json.loads((part / "metrics.json").read_text()), full)


def test_both_scripts_write_curve_points_of_one_format(run_script, tmp_path):
    """evaluate.py curve reads either script's runs: the same entries in every point, those of
    the final normality block but its null levels (uniform: of Phi^-1 of the embeddings)."""
    points = {}
    for script in (mnist_gauss, mnist_uniform):
        metrics = run_script(script, tmp_path / script.__name__, "--steps", "2", "--eval-at", "1")
        assert [point["step"] for point in metrics["curve"]] == [1, 2]
        final = metrics["curve"][-1]
        assert {k: final[k] for k in metrics["normality"] if k != "null"} == {
            k: v for k, v in metrics["normality"].items() if k != "null"}
        assert final["mi_heldout"] == metrics["mi_heldout"]
        assert final["knn_acc"] == metrics["downstream"]["knn_acc"]
        z_train = np.load(tmp_path / script.__name__ / "embeddings.npz")["z_train"]
        normal = common.to_gaussian(z_train) if script is mnist_uniform else z_train
        assert final["sliced_w2_train"] == pytest.approx(common.sliced_w2(normal), rel=1e-5)
        points[script] = final
    assert points[mnist_gauss].keys() == points[mnist_uniform].keys()
    assert {"step", "mi_heldout", "knn_acc", "sliced_w2", "sliced_w2_train"} <= set(
        points[mnist_uniform])
    assert "null" not in points[mnist_uniform]


def test_uniformity_report_separates_uniform_from_peaked():
    rng = np.random.default_rng(0)
    assert uniformity_report(rng.uniform(size=(2000, 2)))["ks_p_mean"] > 0.05
    peaked = uniformity_report(rng.beta(2, 2, size=(2000, 2)))
    assert peaked["ks_p_mean"] < 1e-6 and peaked["ks_stat_max"] > 0.05

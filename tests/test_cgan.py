"""Tests of cgan.py (Appendix D) on tiny IDX data, conditioned by a tiny mnist_gauss.py run."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from test_mnist_gauss import tiny_mnist  # noqa: F401  (pytest fixture)

import cgan
import mnist_gauss
from common import SHIPPED_MNIST, center_crop, load_data, load_mnist

FAST = ("--batch-size", "32", "--latent-dim", "8", "--width", "8", "--clf-epochs", "1",
        "--n-samples", "50", "--log-every", "2", "--quiet")


@pytest.fixture(scope="module")
def encoder_run(tiny_mnist, tmp_path_factory):  # noqa: F811
    """A finished 3-step mnist_gauss.py run with sigma = 0.1, d = 2 on the tiny data."""
    out = tmp_path_factory.mktemp("encoder") / "run"
    mnist_gauss.main(["--data-dir", str(tiny_mnist), "--sigma", "0.1", "--dim", "2",
                      "--steps", "3", "--batch-size", "64", "--subsample", "32", "--quiet",
                      "--out", str(out)])
    return out


def run(tiny_mnist, out, *flags):  # noqa: F811
    cgan.main(["--data-dir", str(tiny_mnist), "--out", str(out), *FAST, *flags])
    return json.loads((out / "metrics.json").read_text())


def comparable(metrics):
    return {k: v for k, v in metrics.items() if k != "wall_time_s"}


def test_generator_and_discriminator_shapes_and_conditioning():
    torch.manual_seed(0)
    gen, disc = cgan.Generator(latent_dim=16, width=8), cgan.Discriminator(width=8)
    z, c, c_other = torch.randn(5, 16), torch.randn(5, 2), torch.randn(5, 2)
    x = gen(z, c)
    assert x.shape == (5, 1, 24, 24)
    assert x.min() >= 0 and x.max() <= 1
    assert not torch.allclose(x, gen(z, c_other))
    assert disc(x, c).shape == (5,)
    # the projection makes D's dependence on c differ between images (a sum of an image term
    # and a condition term could not check that they belong together)
    x_other = torch.rand(5, 1, 24, 24)
    shift, shift_other = disc(x, c) - disc(x, c_other), disc(x_other, c) - disc(x_other, c_other)
    assert not torch.allclose(shift, shift_other)


@pytest.fixture(scope="module")
def digits():
    """500 real test digits (24x24) and a classifier that knows exactly these images."""
    x, y = load_mnist(SHIPPED_MNIST, train=False)
    x, y = center_crop(x[:500]), y[:500]

    def lookup(images):
        nearest = torch.cdist(images.flatten(1), x.flatten(1)).argmin(1)
        return torch.nn.functional.one_hot(y[nearest], 10).float()
    return x, y, lookup


def test_consistency_is_one_for_source_images_and_chance_for_others(digits):
    x, y, lookup = digits
    cond = torch.randn(len(x), 2)
    assert cgan.conditional_consistency(lambda c, rows: x[rows], lookup, cond, y,
                                        batch_size=64) == 1.0
    noise = torch.Generator().manual_seed(0)
    random_images = cgan.conditional_consistency(
        lambda c, rows: torch.rand(len(c), 1, 24, 24, generator=noise), lookup, cond, y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    shuffled = cgan.conditional_consistency(lambda c, rows: x[perm[rows]], lookup, cond, y)
    assert random_images == pytest.approx(0.1, abs=0.04)
    assert shuffled == pytest.approx(0.1, abs=0.04)


def test_class_report_entropy_tv_and_confidence():
    balanced = torch.nn.functional.one_hot(torch.arange(1000) % 10, 10).float()
    uniform = np.full(10, 0.1)
    report = cgan.class_report(balanced, uniform)
    assert report["entropy"] == pytest.approx(math.log(10))
    assert report["tv_to_test_embeddings"] == pytest.approx(0)
    assert report["confidence"] == pytest.approx(1)
    one_class = torch.full((1000, 10), 0.05)
    one_class[:, 3] = 0.55
    report = cgan.class_report(one_class, uniform)
    assert report["entropy"] == 0 and report["shares"][3] == 1
    assert report["tv_to_test_embeddings"] == pytest.approx(0.9)
    assert report["confidence"] == pytest.approx(0.55)


def test_short_run_writes_figures_and_metrics(tiny_mnist, encoder_run, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    metrics = run(tiny_mnist, out, "--encoder", str(encoder_run), "--steps", "4")
    for name in ("args.json", "checkpoint.pt", "model.pt", "metrics.json", "conditional.png",
                 "unconditional.png", "mismatched.png", "classes.png"):
        assert (out / name).is_file()
    assert not (out / "encoder").exists()
    assert metrics["steps"] == 4 and len(metrics["train_history"]) == 2
    assert metrics["encoder"]["sigma"] == 0.1 and metrics["encoder"]["dim"] == 2
    assert metrics["data"]["n_train"] == 400 and metrics["data"]["n_test"] == 200
    for key in ("classifier_accuracy", "consistency", "retrieval_consistency"):
        assert 0 <= metrics[key] <= 1
    unc = metrics["unconditional"]
    assert unc["n_samples"] == 50 and unc["box_half_width"] == 3.0
    for key in ("test_labels", "test_embeddings", "train_embeddings", "gaussian_prior",
                "box_prior"):
        assert sum(unc[key]["shares"]) == pytest.approx(1)
        assert 0 <= unc[key]["entropy"] <= math.log(10) + 1e-9
    assert unc["test_embeddings"]["tv_to_test_embeddings"] == 0
    saved = torch.load(out / "model.pt", weights_only=False)
    gen = cgan.Generator(8, width=8)
    gen.load_state_dict(saved["generator"])


def test_conditions_are_the_encoder_runs_embeddings(tiny_mnist, encoder_run):  # noqa: F811
    x_tr, _, x_te, _, info = load_data("mnist", str(tiny_mnist))
    enc = cgan.encoder_args(encoder_run, info["dataset"])
    c_tr, c_te = cgan.conditioning_vectors(
        encoder_run, enc, x_tr.contiguous(memory_format=torch.channels_last),
        x_te.contiguous(memory_format=torch.channels_last))
    saved = np.load(encoder_run / "embeddings.npz")
    assert np.allclose(c_tr.numpy(), saved["z_train"], atol=1e-5)
    assert np.allclose(c_te.numpy(), saved["z_test"], atol=1e-5)


def test_without_encoder_trains_one_and_resume_reuses_it(tiny_mnist, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    first = run(tiny_mnist, out, "--steps", "2", "--encoder-steps", "2")
    encoder = json.loads((out / "encoder" / "args.json").read_text())
    assert (encoder["sigma"], encoder["dim"], encoder["steps"]) == (0.1, 2, 2)
    assert first["encoder"]["run"] == str(out / "encoder")
    weights = (out / "encoder" / "model.pt").read_bytes()
    (out / "metrics.json").unlink()
    cgan.main(["--out", str(out), "--resume", "--quiet"])
    assert (out / "encoder" / "model.pt").read_bytes() == weights
    assert comparable(json.loads((out / "metrics.json").read_text())) == comparable(first)


def test_same_seed_same_metrics_and_resume_continues_exactly(tiny_mnist, encoder_run,  # noqa: F811
                                                             tmp_path):
    flags = ("--encoder", str(encoder_run), "--steps", "6", "--ckpt-every", "3")
    full = run(tiny_mnist, tmp_path / "a", *flags)
    assert comparable(run(tiny_mnist, tmp_path / "b", *flags)) == comparable(full)
    assert comparable(run(tiny_mnist, tmp_path / "c", *flags, "--seed", "1")) != comparable(full)
    # a run killed after its step-3 checkpoint: train 3 steps, then resume the 6-step run
    part = tmp_path / "d"
    run(tiny_mnist, part, *flags, "--steps", "3")
    saved = json.loads((part / "args.json").read_text())
    saved["steps"] = 6
    (part / "args.json").write_text(json.dumps(saved))
    (part / "metrics.json").unlink()
    cgan.main(["--out", str(part), "--resume", "--quiet"])
    assert comparable(json.loads((part / "metrics.json").read_text())) == comparable(full)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_mnist, encoder_run,  # noqa: F811
                                                           tmp_path, monkeypatch):
    calls = []
    forward = cgan.Discriminator.forward

    def turning_nan(self, x, c):
        calls.append(1)
        return forward(self, x, c) * (math.nan if len(calls) > 6 else 1.0)  # 3 calls per step

    monkeypatch.setattr(cgan.Discriminator, "forward", turning_nan)
    with pytest.raises(SystemExit) as exc:
        run(tiny_mnist, tmp_path / "run", "--encoder", str(encoder_run), "--steps", "6",
            "--ckpt-every", "2")
    assert exc.value.code == 3
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("defect,message", [
    ("missing", "no such run directory"),
    ("unfinished", "unfinished"),
    ("dim3", "--dim 3"),
    ("uniform", "not a Gaussian"),
    ("fashion", "--dataset fashion-mnist"),
])
def test_unusable_encoder_run_is_refused_in_one_line(tiny_mnist, encoder_run, tmp_path,  # noqa: F811
                                                     capsys, defect, message):
    bad = tmp_path / "encoder"
    if defect != "missing":
        shutil.copytree(encoder_run, bad)
    args, metrics = json.loads((encoder_run / "args.json").read_text()), None
    if defect == "unfinished":
        (bad / "metrics.json").unlink()
    elif defect == "dim3":
        args["dim"] = 3
    elif defect == "uniform":
        args["eps"] = args.pop("sigma")
    elif defect == "fashion":
        metrics = json.loads((encoder_run / "metrics.json").read_text())
        metrics["data"]["dataset"] = "fashion-mnist"
        (bad / "metrics.json").write_text(json.dumps(metrics))
    if defect != "missing":
        (bad / "args.json").write_text(json.dumps(args))
    with pytest.raises(SystemExit) as exc:
        run(tiny_mnist, tmp_path / "run", "--encoder", str(bad), "--steps", "2")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,message", [
    (["--lr-g", "-1"], "--lr-g"),
    (["--lr-d", "0"], "--lr-d"),
    (["--clf-lr", "nan"], "--clf-lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--latent-dim", "0"], "--latent-dim"),
    (["--box", "0"], "--box"),
    (["--n-samples", "0"], "--n-samples"),
    (["--sigma", "-0.1"], "--sigma"),
    (["--steps", "-5"], "--steps"),
    (["--resume"], "--resume"),
])
def test_bad_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cgan.parse_args(flags)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_existing_out_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit):
        cgan.parse_args(["--out", str(tmp_path)])
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "metrics.json").read_text() == "{}"


def test_bench_prints_ms_per_step(capsys):
    cgan.main(["--bench", "2", "--batch-size", "16", "--width", "8", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "ms/step" in out and "images/s" in out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_path(tiny_mnist, encoder_run, tmp_path):  # noqa: F811
    metrics = run(tiny_mnist, tmp_path / "run", "--encoder", str(encoder_run), "--steps", "3",
                  "--device", "cuda")
    assert metrics["device"].startswith("cuda") and 0 <= metrics["consistency"] <= 1

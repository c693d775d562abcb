"""Tests of cgan.py (Appendix D) on tiny IDX data (conftest's tiny_mnist), conditioned by a fake
finished encoder run (and, once, by an encoder that cgan.py trains with mnist_gauss.py as a
subprocess)."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

import cgan
from common import SHIPPED_MNIST, center_crop, load_data, load_mnist

FAST = ("--batch-size", "32", "--latent-dim", "8", "--width", "8", "--clf-epochs", "1",
        "--n-samples", "50", "--log-every", "2", "--quiet")


def write_fake_encoder_run(out, data_dir, seed=0):
    """A finished mnist_gauss.py run folder (sigma 0.1, d = 2) with random embeddings."""
    _, y_tr, _, y_te, data = load_data("mnist", str(data_dir))
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    (out / "args.json").write_text(json.dumps({"sigma": 0.1, "dim": 2, "steps": 3,
                                               "dataset": "mnist", "data_dir": str(data_dir)}))
    (out / "metrics.json").write_text(json.dumps({
        "sigma": 0.1, "capacity": 2.31, "mi_heldout": 1.5, "dim": 2, "critic": "separable",
        "steps": 3, "downstream": {"knn_acc": 0.5}, "normality": {"henze_zirkler_p": 0.4},
        "data": data, "wall_time_s": 1.0}))
    np.savez_compressed(  # as mnist_gauss.py writes it
        out / "embeddings.npz",
        z_train=rng.standard_normal((len(y_tr), 2)).astype(np.float32), y_train=y_tr.numpy(),
        z_test=rng.standard_normal((len(y_te), 2)).astype(np.float32), y_test=y_te.numpy())
    torch.save({"models": {}}, out / "model.pt")
    return out


@pytest.fixture(scope="module")
def encoder_run(tiny_mnist, tmp_path_factory):
    return write_fake_encoder_run(tmp_path_factory.mktemp("encoder") / "run", tiny_mnist)


def run(tiny_mnist, out, *flags):
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


def test_short_run_writes_figures_and_metrics(tiny_mnist, encoder_run, tmp_path):
    out = tmp_path / "run"
    metrics = run(tiny_mnist, out, "--encoder", str(encoder_run), "--steps", "4")
    for name in ("args.json", "checkpoint.pt", "model.pt", "metrics.json", "conditional.png",
                 "unconditional.png", "mismatched.png", "classes.png"):
        assert (out / name).is_file()
    assert not (out / "encoder").exists()
    assert metrics["steps"] == 4 and len(metrics["train_history"]) == 2
    assert metrics["encoder"]["sigma"] == 0.1 and metrics["encoder"]["dim"] == 2
    assert metrics["encoder"]["knn_acc"] == 0.5 and metrics["encoder"]["steps"] == 3
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
    saved = torch.load(out / "model.pt", weights_only=True)
    gen = cgan.Generator(8, width=8)
    gen.load_state_dict(saved["models"]["generator"])


def test_conditions_are_the_encoder_runs_embeddings(tiny_mnist, encoder_run):
    _, y_tr, _, y_te, data = load_data("mnist", str(tiny_mnist))
    record, c_tr, c_te = cgan.read_encoder_run(encoder_run, data, y_tr, y_te)
    saved = np.load(encoder_run / "embeddings.npz")
    assert c_tr.dtype == torch.float32 and np.array_equal(c_tr.numpy(), saved["z_train"])
    assert np.array_equal(c_te.numpy(), saved["z_test"])
    assert record["run"] == str(encoder_run) and record["capacity"] == 2.31


def test_without_encoder_trains_one_by_subprocess_and_resume_reuses_it(tiny_mnist, tmp_path,
                                                                       capfd):
    out = tmp_path / "run"
    first = run(tiny_mnist, out, "--steps", "2", "--encoder-steps", "2")
    printed = capfd.readouterr().out
    assert "mnist_gauss.py" in printed and "--sigma 0.1 --dim 2" in printed
    encoder = json.loads((out / "encoder" / "args.json").read_text())
    assert (encoder["sigma"], encoder["dim"], encoder["steps"]) == (0.1, 2, 2)
    assert first["encoder"]["run"] == str(out / "encoder")
    weights = (out / "encoder" / "model.pt").read_bytes()
    (out / "metrics.json").unlink()
    cgan.main(["--out", str(out), "--resume", "--quiet"])
    assert (out / "encoder" / "model.pt").read_bytes() == weights
    assert comparable(json.loads((out / "metrics.json").read_text())) == comparable(first)


def test_same_seed_same_metrics_and_resume_continues_exactly(tiny_mnist, encoder_run,
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


@pytest.mark.parametrize("ckpt_every,kept", [("2", "the last good checkpoint (step 2)"),
                                             ("10", "no checkpoint was written yet")])
def test_nan_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(
        tiny_mnist, encoder_run, tmp_path, monkeypatch, capsys, ckpt_every, kept):
    calls = []
    forward = cgan.Discriminator.forward

    def turning_nan(self, x, c):
        calls.append(1)
        return forward(self, x, c) * (math.nan if len(calls) > 6 else 1.0)  # 3 calls per step

    monkeypatch.setattr(cgan.Discriminator, "forward", turning_nan)
    with pytest.raises(SystemExit) as exc:
        run(tiny_mnist, tmp_path / "run", "--encoder", str(encoder_run), "--steps", "6",
            "--ckpt-every", ckpt_every)
    assert exc.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 3" in err[0] and "--lr" in err[0] and kept in err[0]
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    if ckpt_every == "2":
        assert torch.load(checkpoint, weights_only=True)["step"] == 2
    else:
        assert not checkpoint.exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


def damage(run, defect):
    """Break a copy of a finished encoder run in one way."""
    args = json.loads((run / "args.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    arrays = dict(np.load(run / "embeddings.npz"))
    if defect == "unfinished":
        (run / "metrics.json").unlink()
    elif defect == "dim3":
        args["dim"] = 3
    elif defect == "uniform":
        args["eps"] = args.pop("sigma")
    elif defect == "sigma as text":
        args["sigma"] = "0.1"
    elif defect == "args not a dict":
        args = [0.1, 2]
    elif defect == "fashion":
        metrics["data"]["dataset"] = "fashion-mnist"
    elif defect == "other sizes":
        arrays["z_train"], arrays["y_train"] = arrays["z_train"][:300], arrays["y_train"][:300]
    elif defect == "metrics lacks downstream":
        del metrics["downstream"]
    elif defect == "no embeddings":
        (run / "embeddings.npz").unlink()
    elif defect == "truncated embeddings":
        data = (run / "embeddings.npz").read_bytes()
        (run / "embeddings.npz").write_bytes(data[:len(data) // 2])
    elif defect == "embeddings lack z_test":
        del arrays["z_test"]
    elif defect == "3-d embeddings":
        arrays["z_train"] = np.zeros((400, 3), np.float32)
    elif defect == "nan embeddings":
        arrays["z_test"][0, 0] = np.nan
    elif defect == "other labels":
        arrays["y_train"] = np.roll(arrays["y_train"], 1)
    (run / "args.json").write_text(json.dumps(args))
    if (run / "metrics.json").exists():
        (run / "metrics.json").write_text(json.dumps(metrics))
    if defect in ("embeddings lack z_test", "3-d embeddings", "nan embeddings", "other labels",
                  "other sizes"):
        np.savez(run / "embeddings.npz", **arrays)


@pytest.mark.parametrize("defect,message", [
    ("missing", "no such run directory"),
    ("unfinished", "unfinished"),
    ("dim3", "--dim 3"),
    ("uniform", "not a Gaussian"),
    ("sigma as text", "args.json is damaged"),
    ("args not a dict", "not a Gaussian"),
    ("fashion", "--dataset fashion-mnist"),
    ("other sizes", "embedded 300 train images, this run has 400"),
    ("metrics lacks downstream", "metrics.json is damaged"),
    ("no embeddings", "embeddings.npz is missing"),
    ("truncated embeddings", "damaged"),
    ("embeddings lack z_test", "z_test"),
    ("3-d embeddings", "(400, 2)"),
    ("nan embeddings", "finite"),
    ("other labels", "labels differ"),
])
def test_unusable_encoder_run_is_refused_in_one_line_before_anything_is_written(
        tiny_mnist, encoder_run, tmp_path, capsys, defect, message):
    bad = tmp_path / "encoder"
    if defect != "missing":
        shutil.copytree(encoder_run, bad)
        damage(bad, defect)
    with pytest.raises(SystemExit) as exc:
        run(tiny_mnist, tmp_path / "run", "--encoder", str(bad), "--steps", "2")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "run").exists()


def cgan_run_folder(tmp_path, tiny_mnist, encoder_run, **changes):
    """A started cgan.py run folder (args.json only), its settings changed by `changes`."""
    out = tmp_path / "started"
    args = vars(cgan.parse_args(["--out", str(out), "--data-dir", str(tiny_mnist),
                                 "--encoder", str(encoder_run), *FAST]))
    out.mkdir()
    saved = {k: v for k, v in args.items() if k not in ("out", "resume", "device", "quiet",
                                                         "bench")}
    (out / "args.json").write_text(json.dumps({**saved, **changes}))
    return out


def setup(kind, tmp_path, tiny_mnist, encoder_run):
    """Build what a bad-input case needs in tmp_path; returns the path to put in its flags."""
    if kind in ("file", "file/run"):
        (tmp_path / "file").write_text("not a folder")
        return tmp_path / kind
    if kind == "gauss run":
        shutil.copytree(encoder_run, tmp_path / "gauss")
        return tmp_path / "gauss"
    if kind == "args not JSON":
        out = cgan_run_folder(tmp_path, tiny_mnist, encoder_run)
        (out / "args.json").write_text("{not json")
        return out
    if kind.startswith("args "):  # "args KEY=JSON": one stored setting of the wrong type
        key, value = kind[5:].split("=")
        return cgan_run_folder(tmp_path, tiny_mnist, encoder_run, **{key: json.loads(value)})
    out = cgan_run_folder(tmp_path, tiny_mnist, encoder_run)
    if kind == "truncated checkpoint":
        torch.save({"step": 1, "models": torch.zeros(1000)}, out / "checkpoint.pt")
        data = (out / "checkpoint.pt").read_bytes()
        (out / "checkpoint.pt").write_bytes(data[:len(data) // 2])
    elif kind == "checkpoint is a folder":
        (out / "checkpoint.pt").mkdir()
    elif kind == "checkpoint of other models":
        gen, disc, opt_g, opt_d = cgan.build_gan(cgan.parse_args(["--width", "4", "--bench", "1"]),
                                                 torch.device("cpu"))
        torch.save({"step": 2, "models": {"generator": gen.state_dict(),
                                          "discriminator": disc.state_dict()},
                    "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "scaler": {},
                    "rng": torch.get_rng_state(), "history": []}, out / "checkpoint.pt")
    return out


BAD_INPUTS = [  # flags ({} is the path setup() builds), setup, exit code, text in the message
    (["--lr-g", "nan"], None, 2, "--lr-g"),
    (["--lr-d", "inf"], None, 2, "--lr-d"),
    (["--clf-lr", "0"], None, 2, "--clf-lr"),
    (["--seed", "-1"], None, 2, "--seed"),
    (["--seed", str(2**32)], None, 2, "--seed"),
    (["--batch-size", "1"], None, 2, "--batch-size"),
    (["--steps", "-1"], None, 2, "--steps"),
    (["--encoder-steps", "-1"], None, 2, "--encoder-steps"),
    (["--epochs", "0"], None, 2, "--epochs"),
    (["--width", "two"], None, 2, "--width"),
    (["--dataset", "cifar10"], None, 2, "--dataset"),
    (["--device", "foo"], None, 2, "--device"),
    (["--out", "{}"], "file/run", 2, "--out"),
    (["--resume"], None, 2, "--resume"),
    (["--resume", "--out", "{}"], "gauss run", 2, "not a run of"),
    (["--resume", "--out", "{}"], "args not JSON", 2, "not valid JSON"),
    (["--resume", "--out", "{}"], 'args lr_g="fast"', 2, "--lr-g"),
    (["--resume", "--out", "{}"], "args steps=-5", 2, "--steps"),
    (["--resume", "--out", "{}"], "args amp=1", 2, "--amp"),
    (["--resume", "--out", "{}"], 'args dataset="cifar10"', 2, "--dataset"),
    (["--resume", "--out", "{}"], "args batch_size=1", 2, "--batch-size"),
    (["--resume", "--out", "{}"], "truncated checkpoint", 2, "checkpoint.pt is damaged"),
    (["--resume", "--out", "{}"], "checkpoint is a folder", 2, "checkpoint.pt is damaged"),
    (["--resume", "--out", "{}"], "checkpoint of other models", 2, "does not fit"),
]


@pytest.mark.parametrize("flags,kind,code,message", BAD_INPUTS,
                         ids=[" ".join(case[0]) + (f" [{case[1]}]" if case[1] else "")
                              for case in BAD_INPUTS])
def test_bad_input_ends_in_one_line(tiny_mnist, encoder_run, tmp_path, capsys, flags, kind,
                                    code, message):
    path = setup(kind, tmp_path, tiny_mnist, encoder_run) if kind else None
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        cgan.main([flag.format(path) for flag in flags] + ["--quiet"])
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if lines[0].startswith("usage:"):  # argparse: usage, then the error naming the flag
        assert message in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_command_line_error_is_one_line_without_traceback(tmp_path, cli):
    (tmp_path / "file").write_text("x")
    result = cli("cgan.py", "--out", tmp_path / "file" / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is a file, not a folder" in result.stderr.strip().splitlines()[-1]


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
def test_cuda_path(tiny_mnist, encoder_run, tmp_path):
    metrics = run(tiny_mnist, tmp_path / "run", "--encoder", str(encoder_run), "--steps", "3",
                  "--device", "cuda")
    assert metrics["device"].startswith("cuda") and 0 <= metrics["consistency"] <= 1

"""Tests of cgan.py (Appendix D) on tiny IDX data (conftest's tiny_mnist), conditioned by a fake
finished encoder run (and, once, by an encoder that cgan.py trains with mnist_gauss.py as a
subprocess)."""
import argparse
import inspect
import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

import cgan
import mnist_gauss
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
    return out


@pytest.fixture(scope="module")
def encoder_run(tiny_mnist, tmp_path_factory):
    return write_fake_encoder_run(tmp_path_factory.mktemp("encoder") / "run", tiny_mnist)


def run(tiny_mnist, out, *flags):
    cgan.main(["--data-dir", str(tiny_mnist), "--out", str(out), *FAST, *flags])
    return json.loads((out / "metrics.json").read_text())


def comparable(metrics):
    return {k: v for k, v in metrics.items() if k != "wall_time_s"}


def test_range_type_bounds_and_nan():
    count, rate = cgan.number(int, 1, 5), cgan.number(float, 0, 1, strict=True)
    assert count("1") == 1 and count("5") == 5 and rate("0.5") == 0.5
    for parse, text in ((count, "0"), (count, "6"), (rate, "0"), (rate, "1"), (rate, "nan"),
                        (rate, "1e30")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    with pytest.raises(ValueError):  # argparse reports it as "invalid int value"
        count("two")


def test_precision_is_the_same_function_as_mnist_gauss():
    assert inspect.getsource(cgan.precision) == inspect.getsource(mnist_gauss.precision)


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
    assert cgan.conditional_consistency(lambda c, rows: x[rows], lookup, cond, y) == 1.0
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
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    assert not (out / "encoder").exists()
    saved = json.loads((out / "args.json").read_text())
    assert saved["sigma"] is None and saved["encoder_steps"] is None  # not used, not recorded
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
    cgan.Generator(8, width=8).load_state_dict(saved["models"]["generator"])


def test_conditions_are_the_encoder_runs_embeddings(tiny_mnist, encoder_run):
    _, y_tr, _, y_te, _ = load_data("mnist", str(tiny_mnist))
    record, c_tr, c_te = cgan.read_encoder_run(encoder_run, y_tr, y_te)
    saved = np.load(encoder_run / "embeddings.npz")
    assert c_tr.dtype == torch.float32 and np.array_equal(c_tr.numpy(), saved["z_train"])
    assert np.array_equal(c_te.numpy(), saved["z_test"])
    assert record["run"] == str(encoder_run) and record["capacity"] == 2.31


def test_without_encoder_trains_one_by_subprocess_and_resume_reuses_it(tiny_mnist, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    first = run(tiny_mnist, out, "--steps", "2", "--encoder-steps", "2", "--no-amp")
    encoder = json.loads((out / "encoder" / "args.json").read_text())
    assert (encoder["sigma"], encoder["dim"], encoder["steps"]) == (0.1, 2, 2)
    assert (encoder["seed"], encoder["amp"], encoder["data_dir"]) == (0, False, str(tiny_mnist))
    assert first["encoder"]["run"] == str(out / "encoder")
    assert first["precision"] == {"dtype": "float32", "why": "--no-amp"}
    weights = (out / "encoder" / "model.pt").read_bytes()
    (out / "metrics.json").unlink()
    cgan.main(["--out", str(out), "--resume", "--quiet"])
    assert (out / "encoder" / "model.pt").read_bytes() == weights
    assert comparable(json.loads((out / "metrics.json").read_text())) == comparable(first)
    capsys.readouterr()
    cgan.main(["--out", str(out), "--resume", "--quiet"])  # finished: nothing is redone
    assert str(out / "metrics.json") in capsys.readouterr().out
    assert (out / "encoder" / "model.pt").read_bytes() == weights


@pytest.mark.parametrize("code", [2, 3])  # 3: the encoder diverged
def test_a_failed_encoder_run_ends_in_one_line_with_its_exit_code(tiny_mnist, tmp_path,
                                                                  monkeypatch, capsys, code):
    monkeypatch.setattr(cgan.subprocess, "run",
                        lambda cmd, check: subprocess.CompletedProcess(cmd, code))
    with pytest.raises(SystemExit) as exc:
        run(tiny_mnist, tmp_path / "run", "--steps", "2")
    assert exc.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "run" / "encoder") in err[0]


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


@pytest.mark.parametrize("ckpt_every", ["2", "10"])
def test_nan_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(
        tiny_mnist, encoder_run, tmp_path, monkeypatch, capsys, ckpt_every):
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
    assert len(err) == 1 and "--lr-g" in err[0]
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    if ckpt_every == "2":
        assert str(checkpoint) in err[0]
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
    elif defect == "dim 3":
        args["dim"] = 3
    elif defect == "a mnist_uniform.py run":
        args["eps"] = args.pop("sigma")
    elif defect == "metrics lacks downstream":
        del metrics["downstream"]
    elif defect == "truncated embeddings":
        data = (run / "embeddings.npz").read_bytes()
        (run / "embeddings.npz").write_bytes(data[:len(data) // 2])
    elif defect == "embeddings lack z_test":
        del arrays["z_test"]
    elif defect == "nan embeddings":
        arrays["z_test"][0, 0] = np.nan
    elif defect == "other labels":
        arrays["y_train"] = np.roll(arrays["y_train"], 1)
    (run / "args.json").write_text(json.dumps(args))
    if (run / "metrics.json").exists():
        (run / "metrics.json").write_text(json.dumps(metrics))
    if defect in ("embeddings lack z_test", "nan embeddings", "other labels"):
        np.savez(run / "embeddings.npz", **arrays)


@pytest.mark.parametrize("defect", ["missing", "unfinished", "dim 3", "a mnist_uniform.py run",
                                    "metrics lacks downstream", "truncated embeddings",
                                    "embeddings lack z_test", "nan embeddings", "other labels"])
def test_unusable_encoder_run_is_refused_in_one_line_before_anything_is_written(
        tiny_mnist, encoder_run, tmp_path, capsys, defect):
    bad = tmp_path / "encoder"
    if defect != "missing":
        shutil.copytree(encoder_run, bad)
        damage(bad, defect)
    with pytest.raises(SystemExit) as exc:
        run(tiny_mnist, tmp_path / "run", "--encoder", str(bad), "--steps", "2")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0], err
    assert not (tmp_path / "run").exists()


def cgan_run_folder(tmp_path, tiny_mnist, encoder_run, **changes):
    """A started cgan.py run folder (args.json only), its settings changed by `changes`."""
    out = tmp_path / "started"
    args = vars(cgan.parse_args(["--out", str(out), "--data-dir", str(tiny_mnist),
                                 "--encoder", str(encoder_run), *FAST]))
    out.mkdir()
    saved = {k: v for k, v in args.items() if k not in cgan.RUNTIME}
    (out / "args.json").write_text(json.dumps({**saved, **changes}))
    return out


def setup(kind, tmp_path, tiny_mnist, encoder_run):
    """Build what a bad-input case needs in tmp_path; returns the path to put in its flags."""
    if kind == "file":
        (tmp_path / "file").write_text("not a folder")
        return tmp_path / "file"
    if kind == "holds files":
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "notes.txt").write_text("x")
        return tmp_path / "old"
    if kind == "gauss run":
        shutil.copytree(encoder_run, tmp_path / "gauss")
        return tmp_path / "gauss"
    if kind.startswith("args "):  # "args KEY=JSON": one stored setting of the wrong type
        key, value = kind[5:].split("=")
        return cgan_run_folder(tmp_path, tiny_mnist, encoder_run, **{key: json.loads(value)})
    out = cgan_run_folder(tmp_path, tiny_mnist, encoder_run)  # "started" and the following
    if kind == "not JSON":
        (out / "args.json").write_text("{not json")
    elif kind == "empty checkpoint":
        (out / "checkpoint.pt").write_bytes(b"")
    elif kind == "checkpoint of other models":
        args = cgan.parse_args(["--width", "4", "--bench", "1"])
        args.dtype = torch.float32
        gan = cgan.build_gan(args, torch.device("cpu"))
        torch.save({"step": 2, **{k: part.state_dict() for k, part in gan.items()},
                    "rng": torch.get_rng_state(), "history": []}, out / "checkpoint.pt")
    return out


BAD_INPUTS = [  # flags ({} is the path setup() builds), setup, what the message names
    (["--lr-g", "1e30"], None, "--lr-g"),
    (["--clf-lr", "1e30"], None, "--clf-lr"),
    (["--n-samples", "1000000000"], None, "--n-samples"),
    (["--latent-dim", "10000000"], None, "--latent-dim"),
    (["--width", "10000000"], None, "--width"),
    (["--batch-size", "100000000"], None, "--batch-size"),
    (["--batch-size", "500"], None, "--batch-size"),  # more than the 400 training images
    (["--sigma", "1e30"], None, "--sigma"),
    (["--seed", "-1"], None, "--seed"),
    (["--dataset", "cifar10"], None, "--dataset"),
    (["--device", "tpu"], None, "--device"),
    (["--encoder", "{}", "--sigma", "0.3"], "gauss run", "--sigma"),
    (["--encoder", "{}", "--encoder-steps", "10"], "gauss run", "--encoder-steps"),
    (["--data-dir", "{}"], "file", "file"),
    (["--out", "{}/run"], "file", "file"),
    (["--out", "{}"], "holds files", "--out"),
    (["--resume"], None, "--resume"),
    (["--resume", "--out", "{}"], "gauss run", "gauss"),  # a healthy run of mnist_gauss.py
    (["--resume", "--out", "{}"], "not JSON", "args.json"),
    (["--resume", "--out", "{}"], 'args lr_g="fast"', "args.json"),
    (["--resume", "--out", "{}", "--steps", "7"], "started", "--steps"),  # the run has 6000
    (["--resume", "--out", "{}"], "empty checkpoint", "checkpoint.pt"),
    (["--resume", "--out", "{}"], "checkpoint of other models", "checkpoint.pt"),
]


@pytest.mark.parametrize("flags,kind,named", BAD_INPUTS,
                         ids=[" ".join(case[0]) + (f" [{case[1]}]" if case[1] else "")
                              for case in BAD_INPUTS])
def test_bad_input_ends_in_one_line(tiny_mnist, encoder_run, tmp_path, capsys, flags, kind,
                                    named):
    path = setup(kind, tmp_path, tiny_mnist, encoder_run) if kind else None
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        cgan.main(["--data-dir", str(tiny_mnist), *FAST,
                   *[flag.format(path) for flag in flags]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if not lines[0].startswith("usage:"):  # argparse: usage, then the line naming the flag
        assert len(lines) == 1, err
    assert named in lines[-1], err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_command_line_error_is_one_line_without_traceback(tiny_mnist, tmp_path, cli):
    (tmp_path / "file").write_text("x")
    result = cli("cgan.py", "--encoder", tmp_path / "file", "--data-dir", tiny_mnist,
                 "--out", tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert str(tmp_path / "file") in result.stderr


def test_bench_prints_ms_per_step(capsys):
    cgan.main(["--bench", "2", "--batch-size", "16", "--width", "8", "--device", "cpu"])
    assert "ms/step" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_path(tiny_mnist, encoder_run, tmp_path):
    metrics = run(tiny_mnist, tmp_path / "run", "--encoder", str(encoder_run), "--steps", "3",
                  "--device", "cuda")
    assert metrics["device"].startswith("cuda") and 0 <= metrics["consistency"] <= 1

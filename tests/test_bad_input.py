"""Bad input to the MNIST scripts ends in exit code 2 and one line on stderr that names the flag or
the file (argparse prints its usage above a refused flag), never a traceback, and changes nothing
the user had. Each check of the scripts is tested once here; a diverged run (exit code 3) is in
test_mnist_gauss.py, the data checks of common.load_data in test_core.py."""
import argparse
import json
import shutil

import numpy as np
import pytest
import torch

import mnist_gauss
import mnist_uniform


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refusal(script, argv, capsys):
    """The stderr line with which main(argv) exits with code 2, checked to be the only line
    besides argparse's usage."""
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2, lines
    assert "error:" in lines[-1] and all(line.startswith(("usage:", " ")) for line in lines[:-1])
    return lines[-1]


# --- Flags: the range type, once as a unit, then the bounds each flag gives it -----------------

def test_number_takes_its_closed_or_open_range_and_nothing_else():
    closed, open_ = mnist_gauss.number(float, 0, 100), mnist_gauss.number(float, 0, 0.5, True)
    assert closed("0") == 0.0 and closed("100") == 100.0 and open_("0.25") == 0.25
    for parse, text in ((closed, "-1"), (closed, "1e30"), (closed, "nan"), (closed, "inf"),
                        (open_, "0"), (open_, "0.5")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    for text in ("1e3", "2.5", "many"):  # argparse reports a ValueError as an invalid int
        with pytest.raises(ValueError):
            mnist_gauss.number(int, 0, 10 ** 8)(text)


FLAG_CASES = [  # (script, flags, the flag the message names)
    (mnist_gauss, ["--sigma", "-1"], "--sigma"),
    (mnist_gauss, ["--sigma", "1e30"], "--sigma"),
    (mnist_gauss, ["--sigma", "nan"], "--sigma"),
    (mnist_gauss, ["--lr", "1e30"], "--lr"),
    (mnist_gauss, ["--lr", "0"], "--lr"),
    (mnist_gauss, ["--dim", "100000"], "--dim"),
    (mnist_gauss, ["--batch-size", "1"], "--batch-size"),
    (mnist_gauss, ["--batch-size", "1000000"], "--batch-size"),
    (mnist_gauss, ["--seed", "1e3"], "--seed"),
    (mnist_gauss, ["--steps", "1e99"], "--steps"),
    (mnist_gauss, ["--clip", "1000"], "--clip"),
    (mnist_gauss, ["--device", "tpu"], "--device"),
    (mnist_gauss, ["--sigma", "0", "--critic", "gaussian"], "--sigma"),
    (mnist_gauss, ["--paper", "--steps", "2"], "--steps"),
    (mnist_uniform, ["--eps", "0.5"], "--eps"),
    (mnist_uniform, ["--eps", "0"], "--eps"),
    (mnist_uniform, ["--critic", "gaussian"], "--critic"),
]


@pytest.mark.parametrize("script,flags,flag", FLAG_CASES,
                         ids=[f"{c[0].__name__} {' '.join(c[1])}" for c in FLAG_CASES])
def test_bad_flags_are_refused_by_the_parser(script, flags, flag, capsys, tmp_path):
    assert flag in refusal(script, [*flags, "--out", str(tmp_path / "run")], capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_is_refused(capsys, tmp_path):
    assert "--device" in refusal(mnist_gauss, ["--device", "cuda", "--out", str(tmp_path)], capsys)


# --- Run folders: another script's, damaged, or in the way -------------------------------------

@pytest.fixture(scope="module")
def finished_run(run_script, tmp_path_factory):
    """A finished 2-step run of each script (copied per test)."""
    root = tmp_path_factory.mktemp("finished")
    run_script(mnist_gauss, root / "gauss", "--steps", "2", "--sigma", "0.5")
    run_script(mnist_uniform, root / "uniform", "--steps", "2", "--eps", "0.2")
    return root


def damage(run, how):
    """Damage the run folder `run` in one way; the file the message must name."""
    if how == "cgan_args":  # a healthy cgan.py run folder
        (run / "args.json").write_text(json.dumps({"sigma": 0.1, "dim": 2, "latent_dim": 64,
                                                   "lr_g": 2e-4, "lr_d": 2e-4, "seed": 0}))
        return str(run)
    if how == "args_garbage":
        (run / "args.json").write_text("{not json")
        return "args.json"
    if how == "no_args":
        (run / "args.json").unlink()
        return "args.json"
    if how.startswith("model"):
        if how == "model_missing":
            (run / "model.pt").unlink()
        else:
            (run / "model.pt").write_bytes(b"" if how == "model_empty" else
                                           (run / "model.pt").read_bytes()[:100])
        return "model.pt"
    (run / "metrics.json").unlink()  # an unfinished run: --resume reads the checkpoint
    ckpt = run / "checkpoint.pt"
    if how == "checkpoint_empty":
        ckpt.write_bytes(b"")
    elif how == "checkpoint_truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    elif how == "checkpoint_dir":
        ckpt.unlink()
        ckpt.mkdir()
    else:
        state = torch.load(ckpt, weights_only=True)
        if how == "checkpoint_lacking":
            del state["scaler"]
        else:  # the weights of a run with another --dim
            state["models"] = {k: torch.cat([v, v]) if v.ndim and v.shape[0] == 2 else v
                               for k, v in state["models"].items()}
        torch.save(state, ckpt)
    return "checkpoint.pt"


RUN_CASES = [  # (script, the finished run it is given, the damage, flags)
    (mnist_uniform, "gauss", None, ["--resume"]),
    (mnist_gauss, "uniform", None, ["--eval-only"]),
    (mnist_gauss, "gauss", "cgan_args", ["--resume"]),
    (mnist_gauss, "gauss", "args_garbage", ["--resume"]),
    (mnist_gauss, "gauss", "no_args", ["--eval-only"]),
    (mnist_gauss, "gauss", None, ["--resume", "--sigma", "0.9"]),
    (mnist_gauss, "gauss", "model_missing", ["--eval-only"]),
    (mnist_gauss, "gauss", "model_empty", ["--eval-only"]),
    (mnist_gauss, "gauss", "model_truncated", ["--eval-only"]),
    (mnist_gauss, "gauss", "checkpoint_empty", ["--resume"]),
    (mnist_gauss, "gauss", "checkpoint_truncated", ["--resume"]),
    (mnist_gauss, "gauss", "checkpoint_dir", ["--resume"]),
    (mnist_gauss, "gauss", "checkpoint_other_dim", ["--resume"]),
    (mnist_gauss, "gauss", "checkpoint_lacking", ["--resume"]),
]


@pytest.mark.parametrize("script,folder,how,flags", RUN_CASES,
                         ids=[f"{c[0].__name__}-{c[1]}-{c[2]}-{' '.join(c[3])}" for c in RUN_CASES])
def test_a_run_folder_that_does_not_fit_is_refused_before_anything_is_written(
        finished_run, tmp_path, capsys, script, folder, how, flags):
    run = tmp_path / folder
    shutil.copytree(finished_run / folder, run)
    named = damage(run, how) if how else "--sigma" if "--sigma" in flags else str(run)
    before = snapshot(tmp_path)
    assert named in refusal(script, ["--out", str(run), "--quiet", *flags], capsys)
    assert snapshot(tmp_path) == before  # args.json included: nothing is rewritten


def test_resume_of_a_finished_run_passes_it_by_without_reading_its_metrics(finished_run, tmp_path,
                                                                            capsys):
    run = tmp_path / "gauss"
    shutil.copytree(finished_run / "gauss", run)
    (run / "metrics.json").write_text('{"sigma": 0.5')  # truncated: a finished run all the same
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exc:
        mnist_gauss.main(["--out", str(run), "--resume", "--quiet"])
    out = capsys.readouterr()
    assert exc.value.code is None and out.err == ""
    assert out.out.count("\n") == 1 and str(run / "metrics.json") in out.out
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["full_folder", "file", "under_file"])
def test_an_out_in_the_way_of_a_new_run_is_refused(tiny_mnist, tmp_path, capsys, where):
    (tmp_path / "f").write_text("keep me")
    out = {"full_folder": tmp_path, "file": tmp_path / "f", "under_file": tmp_path / "f" / "run"}
    line = refusal(mnist_gauss, ["--out", str(out[where]), "--data-dir", str(tiny_mnist),
                                 "--batch-size", "64", "--steps", "1", "--quiet"], capsys)
    assert str(out[where]) in line
    assert snapshot(tmp_path) == {tmp_path / "f": b"keep me"}


def test_a_batch_larger_than_the_training_set_is_refused(tiny_mnist, tmp_path, capsys):
    line = refusal(mnist_gauss, ["--data-dir", str(tiny_mnist), "--batch-size", "500", "--out",
                                 str(tmp_path / "run"), "--quiet"], capsys)
    assert "--batch-size" in line and not (tmp_path / "run").exists()


def test_data_the_encoder_cannot_take_is_one_line_from_the_command_line(cli, write_idx, tmp_path):
    rng = np.random.default_rng(0)  # valid IDX files of 8 x 8 images: smaller than the crop
    for split, n in (("train", 40), ("t10k", 20)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 8, 8)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    proc = cli("mnist_uniform.py", "--data-dir", tmp_path, "--out", tmp_path / "run", "--quiet")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert str(tmp_path) in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("dim", ["1", "40"])
def test_embedding_sizes_the_plots_and_tests_must_handle(run_script, tmp_path, dim, capsys):
    metrics = run_script(mnist_gauss, tmp_path / "run", "--steps", "2", "--dim", dim)
    assert (tmp_path / "run" / "scatter.png").is_file()
    whitened = dim == "1"  # the Henze-Zirkler test needs d < subsample (32 here)
    assert (metrics["normality"]["henze_zirkler_p"] is not None) == whitened
    assert ("n/a (d >= subsample)" in capsys.readouterr().out) != whitened

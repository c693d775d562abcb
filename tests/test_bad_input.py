"""Bad input to the MNIST scripts ends in one clear line and exit code 2 (3 for a diverged run):
malformed or meaningless flags, conflicting flags, wrong paths, damaged data files and broken
run folders. Each case checks the exit code, the message, that there is no traceback, and that
nothing the user had was changed."""
import argparse
import gzip
import json
import shutil

import numpy as np
import pytest
import torch

import common
import mnist_gauss
import mnist_uniform

SCRIPTS = {"gauss": mnist_gauss, "uniform": mnist_uniform}


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def expect_exit(script, argv, capsys, code=2):
    """Run main(argv); return the stderr of its SystemExit, checked to be `code`."""
    with pytest.raises(SystemExit) as exc:
        SCRIPTS[script].main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    assert "Traceback" not in err
    return err


# (script, flags, text the message must contain): refused by the parser, naming the flag
FLAG_CASES = [
    ("gauss", ["--lr", "nan"], "--lr"),
    ("gauss", ["--lr", "inf"], "--lr"),
    ("gauss", ["--lr", "0"], "--lr"),
    ("gauss", ["--seed", "-1"], "--seed"),
    ("gauss", ["--seed", "1e3"], "--seed"),
    ("gauss", ["--batch-size", "1"], "--batch-size"),
    ("gauss", ["--subsample", "3"], "--subsample"),
    ("gauss", ["--subsample", "1"], "--subsample"),
    ("gauss", ["--dim", "0"], "--dim"),
    ("gauss", ["--sigma", "-1"], "--sigma"),
    ("gauss", ["--sigma", "nan"], "--sigma"),
    ("gauss", ["--aug-sigma", "inf"], "--aug-sigma"),
    ("gauss", ["--reg-weight", "-1"], "--reg-weight"),
    ("gauss", ["--steps", "-5"], "--steps"),
    ("gauss", ["--eval-every", "-1"], "--eval-every"),
    ("gauss", ["--log-every", "-1"], "--log-every"),
    ("gauss", ["--seeds", "1000000000"], "--seeds"),
    ("gauss", ["--device", "foo"], "--device"),
    ("gauss", ["--sigma", "0", "--critic", "gaussian"], "Theorem 4.1"),
    ("gauss", ["--sigma", "0.5", "--sigmas", "0.1", "0.2"], "--sigmas"),
    ("gauss", ["--paper", "--steps", "2"], "--paper"),
    ("gauss", ["--resume"], "--resume"),
    ("gauss", ["--eval-only"], "--eval-only"),
    ("uniform", ["--eps", "0.7"], "--eps"),
    ("uniform", ["--epss", "0.1", "0"], "--epss"),
    ("uniform", ["--eps", "0.2", "--epss", "0.1"], "--epss"),
    ("uniform", ["--critic", "gaussian"], "--critic"),
    ("uniform", ["--lr", "-1e-3"], "--lr"),
]


@pytest.mark.parametrize("script,flags,message", FLAG_CASES,
                         ids=[" ".join(c[1]) or "empty" for c in FLAG_CASES])
def test_bad_flags_are_one_argparse_error(script, flags, message, capsys, tmp_path):
    last = expect_exit(script, [*flags, "--out", str(tmp_path / "run")], capsys).splitlines()[-1]
    assert "error:" in last and message in last
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_one_line(cli, tmp_path):
    proc = cli("mnist_gauss.py", "--device", "cuda", "--out", tmp_path / "run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "CUDA is not available" in proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished_run(run_script, tmp_path_factory):
    """A finished 2-step Gaussian run and a finished uniform run (copied per test)."""
    root = tmp_path_factory.mktemp("finished")
    run_script(mnist_gauss, root / "gauss", "--steps", "2", "--sigma", "0.5")
    run_script(mnist_uniform, root / "uniform", "--steps", "2", "--eps", "0.2")
    return root


RUN_CASES = [
    # (script, the run folder to damage, how, extra flags, exit code, message)
    ("uniform", "gauss", None, ["--resume"], 2, "not a run of"),
    ("gauss", "uniform", None, ["--resume"], 2, "not a run of"),
    ("gauss", "gauss", None, ["--resume", "--sigma", "0.9"], 2, "--sigma 0.9 differs"),
    ("gauss", "gauss", "args_types", ["--resume"], 2, "--batch-size"),
    ("gauss", "gauss", "args_garbage", ["--resume"], 2, "not valid JSON"),
    ("gauss", "gauss", "no_model", ["--eval-only"], 2, "holds no model.pt"),
    ("gauss", "gauss", "model_truncated", ["--eval-only"], 2, "model.pt is damaged"),
    ("gauss", "gauss", "checkpoint_truncated", ["--resume"], 2, "checkpoint.pt is damaged"),
    ("gauss", "gauss", "checkpoint_dir", ["--resume"], 2, "checkpoint.pt is damaged"),
    ("gauss", "gauss", "checkpoint_other_dim", ["--resume"], 2, "other model settings"),
    ("gauss", "gauss", "checkpoint_older", ["--resume"], 2, "lacks scaler, segments"),
    ("uniform", "uniform", "metrics_older", ["--resume"], 2, "evaluate.py renormalize RUN_DIR"),
]


@pytest.mark.parametrize("script,folder,damage,flags,code,message", RUN_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{' '.join(c[3])}" for c in RUN_CASES])
def test_broken_run_folders_are_refused_before_anything_is_written(
        finished_run, tmp_path, capsys, script, folder, damage, flags, code, message):
    run = tmp_path / folder
    shutil.copytree(finished_run / folder, run)
    if damage == "args_types":
        saved = json.loads((run / "args.json").read_text())
        (run / "args.json").write_text(json.dumps({**saved, "batch_size": "many"}))
    elif damage == "args_garbage":
        (run / "args.json").write_text("{not json")
    elif damage == "no_model":
        (run / "model.pt").unlink()
    elif damage == "metrics_older":  # a finished run whose normality block predates the null
        metrics = json.loads((run / "metrics.json").read_text())
        del metrics["normality"]["null"], metrics["normality"]["correlation"]
        (run / "metrics.json").write_text(json.dumps(metrics))
    elif damage == "model_truncated":
        (run / "model.pt").write_bytes((run / "model.pt").read_bytes()[:100])
    elif damage in ("checkpoint_truncated", "checkpoint_dir", "checkpoint_other_dim",
                    "checkpoint_older"):
        (run / "metrics.json").unlink()  # an unfinished run, so --resume reads the checkpoint
        if damage == "checkpoint_truncated":
            (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:200])
        elif damage == "checkpoint_dir":
            (run / "checkpoint.pt").unlink()
            (run / "checkpoint.pt").mkdir()
        else:
            ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
            if damage == "checkpoint_older":  # written before the scaler and segments were saved
                del ckpt["scaler"], ckpt["segments"]
            else:
                ckpt["models"] = {k: torch.cat([v, v]) if v.ndim and v.shape[0] == 2 else v
                                  for k, v in ckpt["models"].items()}
            torch.save(ckpt, run / "checkpoint.pt")
    before = snapshot(tmp_path)
    lines = expect_exit(script, ["--out", str(run), "--quiet", *flags], capsys, code).splitlines()
    assert "error:" in lines[-1] and message in lines[-1]
    assert len(lines) == 1 or lines[0].startswith("usage:")  # one line, or argparse's two
    assert snapshot(tmp_path) == before


def write_digits(write_idx, root, n_train=40, n_test=20, labels=None):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz",
                  np.arange(n) % 10 if labels is None else np.full(n, labels))


def damage_file(path, how):
    data = gzip.decompress(path.read_bytes())
    if how == "truncated_gzip":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif how == "not_gzip":
        path.write_bytes(b"this is not a gzip stream" * 10)
    elif how == "empty":
        path.write_bytes(gzip.compress(b""))
    elif how == "bad_magic":
        path.write_bytes(gzip.compress(b"\x01\x02\x08\x03" + data[4:]))
    elif how == "header_cut":
        path.write_bytes(gzip.compress(data[:6]))
    elif how == "values_missing":
        path.write_bytes(gzip.compress(data[:-50]))


DATA_CASES = [
    ("truncated_gzip", "train-images-idx3-ubyte.gz", "is damaged"),
    ("not_gzip", "train-images-idx3-ubyte.gz", "is damaged"),
    ("empty", "t10k-labels-idx1-ubyte.gz", "shorter than an IDX header"),
    ("bad_magic", "train-labels-idx1-ubyte.gz", "not an unsigned-byte IDX file"),
    ("header_cut", "t10k-images-idx3-ubyte.gz", "not an unsigned-byte IDX file"),
    ("values_missing", "train-images-idx3-ubyte.gz", "is truncated"),
    ("few_images", None, "at least 20 images"),
    ("one_label", None, "2 labels"),
    ("no_files", None, "--data-dir"),
]


@pytest.mark.parametrize("how,name,message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_damaged_data_is_one_line_naming_the_file(write_idx, tmp_path, capsys, how, name,
                                                  message):
    data = tmp_path / "data"
    data.mkdir()
    if how == "few_images":
        write_digits(write_idx, data, n_train=5, n_test=5)
    elif how == "one_label":
        write_digits(write_idx, data, labels=3)
    elif how != "no_files":
        write_digits(write_idx, data)
        damage_file(data / name, how)
    err = expect_exit("gauss", ["--data-dir", str(data), "--out", str(tmp_path / "run"),
                                "--quiet", "--batch-size", "4", "--subsample", "20"], capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    if name:
        assert name in lines[0]


def test_truncated_gzip_from_the_command_line_is_one_line(cli, write_idx, tmp_path):
    write_digits(write_idx, tmp_path)
    damage_file(tmp_path / "t10k-images-idx3-ubyte.gz", "truncated_gzip")
    proc = cli("mnist_uniform.py", "--data-dir", tmp_path, "--out", tmp_path / "run", "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "t10k-images-idx3-ubyte.gz is damaged" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("target", ["under_file"])
def test_out_that_is_or_lies_under_a_file_is_refused(tmp_path, capsys, target):
    (tmp_path / "f").write_text("keep me")
    out = tmp_path / "f" if target == "file" else tmp_path / "f" / "run"
    err = expect_exit("gauss", ["--out", str(out)], capsys)
    assert "is a file, not a folder" in err.strip().splitlines()[-1]
    assert (tmp_path / "f").read_text() == "keep me"


def test_sweep_into_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("keep me")
    err = expect_exit("gauss", ["--sigmas", "0.1", "0.2", "--out", str(tmp_path / "f")], capsys)
    assert "is a file" in err and (tmp_path / "f").read_text() == "keep me"


def test_diverged_run_names_the_step_and_suggests_a_smaller_lr(run_script, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_script(mnist_gauss, tmp_path / "run", "--steps", "6", "--lr", "1e30",
                   "--log-every", "2")
    assert exc.value.code == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "by step 2" in lines[0] and "smaller --lr" in lines[0]
    assert "no checkpoint was written yet" in lines[0]
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("dim", ["1", "40"])
def test_embedding_sizes_the_plots_and_tests_must_handle(run_script, tmp_path, dim, capsys):
    metrics = run_script(mnist_gauss, tmp_path / "run", "--steps", "2", "--dim", dim)
    assert (tmp_path / "run" / "scatter.png").is_file()
    assert (metrics["normality"]["henze_zirkler_p"] is None) == (int(dim) >= 32)
    assert "n/a (d >= subsample)" in capsys.readouterr().out or dim == "1"


# --- The validators of common.py, once each: the scripts above and in test_cifar_ssl.py and
# test_cgan.py show only that they use them ------------------------------------------------

def validator_parser():
    """A parser like the scripts': a bounded number, a choice, a switch and a run-time flag."""
    p = argparse.ArgumentParser(prog="script.py")
    p.add_argument("--steps", type=common.bounded(int, 0), default=10)
    p.add_argument("--kind", choices=["a", "b"], default="a")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    for flag in ("--out", "--device"):
        p.add_argument(flag, default=None)
    for flag in ("--resume", "--eval-only", "--bench"):
        p.add_argument(flag, action="store_true")
    return p


def parse_or_message(argv, capsys):
    """The parsed and resolved namespace, or argparse's last stderr line."""
    p = validator_parser()
    try:
        args = p.parse_args(argv)
        if args.resume or args.eval_only:
            common.check_resume(p, args, ["kind"])
        else:
            common.resolve_out(p, args, "runs/x")
        return args
    except SystemExit:
        return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("text,ok", [("auto", True), ("cpu", True), ("foo", False), ("", False),
                                     ("meta", False), ("cuda:x", False), ("cuda:99", False)])
def test_device_flag(text, ok):
    if ok:
        assert common.device_flag(text) == text
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            common.device_flag(text)


@pytest.mark.parametrize("saved,flags,message", [
    (None, ["--resume"], "--resume needs --out pointing at a run directory with args.json"),
    (None, ["--eval-only"], "--eval-only needs --out"),
    ("{not json", ["--resume"], "is not valid JSON"),
    ({"steps": 3}, ["--resume"], "is not a run of script.py (its args.json lacks kind)"),
    ({"kind": "c"}, ["--resume"], "args.json is damaged: argument --kind: invalid choice"),
    ({"kind": "a", "steps": -5}, ["--resume"], "damaged: argument --steps: must be a finite"),
    ({"kind": "a", "steps": 2.5}, ["--resume"], "damaged: argument --steps: expected int"),
    ({"kind": "a", "amp": 1}, ["--resume"], "damaged: argument --amp"),
    ({"kind": "a", "steps": 3}, ["--resume", "--steps", "4"], "--steps 4 differs from the run's 3"),
    ({"kind": "a"}, ["--eval-only"], "holds no model.pt (the run has not finished)"),
])
def test_check_resume_refuses_with_one_line(tmp_path, capsys, saved, flags, message):
    if saved is not None:
        (tmp_path / "args.json").write_text(saved if isinstance(saved, str) else json.dumps(saved))
    out = ["--out", str(tmp_path)] if saved is not None else []
    assert message in parse_or_message([*flags, *out], capsys)


def test_check_resume_takes_the_saved_settings_and_the_run_time_flags(tmp_path, capsys):
    saved = {"kind": "b", "steps": 3, "amp": False, "device": "cuda", "extra": [1]}
    (tmp_path / "args.json").write_text(json.dumps(saved))
    args = parse_or_message(["--resume", "--out", str(tmp_path), "--device", "cpu"], capsys)
    assert (args.kind, args.steps, args.amp, args.device, args.extra) == ("b", 3, False, "cpu", [1])
    (tmp_path / "model.pt").write_bytes(b"")
    args = parse_or_message(["--eval-only", "--out", str(tmp_path), "--kind", "b"], capsys)
    assert args.kind == "b"


def test_resolve_out_refuses_files_and_full_folders_and_stamps_a_default(tmp_path, capsys,
                                                                          monkeypatch):
    (tmp_path / "f").write_text("keep me")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert "is a file, not a folder" in parse_or_message(["--out", str(tmp_path / "f")], capsys)
    assert "is a file" in parse_or_message(["--out", str(tmp_path / "f" / "run")], capsys)
    assert "pass --resume" in parse_or_message(["--out", str(tmp_path / "full")], capsys)
    monkeypatch.chdir(tmp_path)
    assert parse_or_message([], capsys).out.startswith("runs/x_")
    assert parse_or_message(["--bench"], capsys).out is None

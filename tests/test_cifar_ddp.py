"""Multi-process cifar_ssl.py on the CPU (gloo): gathered losses, the noise head's global
statistics, and a 2-process torchrun run on a generated ImageFolder tree."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch import distributed as dist
from torch import nn

import cifar_ssl
from cifar_ssl import nt_xent, vicreg_loss

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
ROWS = 6
"""Rows per process; the global batch is WORLD * ROWS."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(seed: int = 0, dim: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(WORLD * ROWS, dim, generator=gen),
            torch.randn(WORLD * ROWS, dim, generator=gen))


def losses_and_grads(z1: torch.Tensor, z2: torch.Tensor,
                     rows: slice = slice(None)) -> dict[str, list[torch.Tensor]]:
    """Each loss of ssl_loss and the gradients of its value wrt (z1, z2); the noise head's
    output, its running statistics and the gradient of a weighted sum of the output, whose
    weights are those of the global batch's `rows`."""
    results = {}
    for method in ("simclr", "vicreg"):
        args = cifar_ssl.parse_args(["--method", method, "--out", "unused"])
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = cifar_ssl.ssl_loss(args)(a, b)
        loss.backward()
        results[method] = [loss.detach(), a.grad, b.grad]
    head = cifar_ssl.GlobalHead(z1.shape[1])  # global statistics under a process group
    a = z1.clone().requires_grad_()
    out = head(a)
    weights = torch.arange(WORLD * ROWS * z1.shape[1]).reshape(WORLD * ROWS, -1).float().sin()
    (out * weights[rows]).sum().backward()
    results["head"] = [out.detach(), a.grad, head.norm.running_mean, head.norm.running_var]
    return results


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    z1, z2 = global_batch()
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    torch.save(losses_and_grads(z1[rows], z2[rows], rows), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_gathered_losses_and_head_statistics_equal_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    z1, z2 = global_batch()
    whole = losses_and_grads(z1, z2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for method in ("simclr", "vicreg"):
        loss, g1, g2 = whole[method]
        for rank, parts in enumerate(ranks):
            rows = slice(rank * ROWS, (rank + 1) * ROWS)
            torch.testing.assert_close(parts[method][0], loss)
            # each process gets WORLD x its rows' gradient; DDP's mean over processes undoes it
            torch.testing.assert_close(parts[method][1] / WORLD, g1[rows])
            torch.testing.assert_close(parts[method][2] / WORLD, g2[rows])
    out, grad, running_mean, running_var = whole["head"]
    reference = nn.BatchNorm1d(z1.shape[1], affine=False)
    torch.testing.assert_close(reference(z1), out)
    for rank, parts in enumerate(ranks):
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        torch.testing.assert_close(parts["head"][0], out[rows])  # global, not per-slice, stats
        torch.testing.assert_close(parts["head"][1], grad[rows])
        torch.testing.assert_close(parts["head"][2], running_mean)
        torch.testing.assert_close(parts["head"][3], running_var)
    torch.testing.assert_close(running_mean, reference.running_mean)
    torch.testing.assert_close(running_var, reference.running_var)


def test_losses_are_unchanged_in_one_process():
    z1, z2 = global_batch()
    results = losses_and_grads(z1, z2)
    assert results["simclr"][0] == nt_xent(z1, z2, 0.2)
    assert results["vicreg"][0] == vicreg_loss(z1, z2)


def write_tree(root: Path, n_train: int = 12, n_val: int = 4) -> Path:
    gen = torch.Generator().manual_seed(3)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                image = torch.randint(0, 128, (18, 20, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray((image + 100 * c).numpy()).save(root / split / name / f"{i}.png")
    return root


def torchrun(*flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           str(WORLD), "--master_port", str(free_port()),
                           str(REPO / "cifar_ssl.py"), *flags], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def tiny_run_flags(tree: Path) -> list[str]:
    """24 training images, batch 8 (4 per process): 3 steps per epoch, a checkpoint every step."""
    return ["--dataset", "folder", "--data-dir", str(tree), "--image-size", "16",
            "--batch-size", "8", "--hidden", "32", "--dim", "4", "--probe-steps", "20",
            "--subsample", "16", "--quiet", "--device", "cpu", "--warmup-epochs", "0",
            "--sigma", "0.2", "--method", "vicreg", "--ckpt-every", "0.34"]


def test_two_processes_train_on_an_image_folder_and_write_one_run(tmp_path):
    flags = tiny_run_flags(write_tree(tmp_path / "tree"))
    # the ImageNet path: above 64 px (ImageNet stem, blur, solarization, ImageNet mean and std),
    # images decoded from disk by a DataLoader worker per process
    proc = torchrun(*flags, "--steps", "2", "--workers", "1", "--image-size", "72", "--out",
                    str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(tmp_path.glob("**/metrics.json")) == [tmp_path / "run" / "metrics.json"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and len(metrics["train_history"]) == 2
    assert metrics["data"]["n_train"] == 24 and metrics["data"]["n_test"] == 8
    assert metrics["batch_size"] == 8 and metrics["settings"]["recipe"] == "imagenet"
    assert metrics["data"]["mean"] == list(cifar_ssl.IMAGENET_MEAN)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and len(ckpt["process_rng"]) == WORLD
    assert not torch.equal(ckpt["process_rng"][0][0], ckpt["process_rng"][1][0])
    assert proc.stdout.count("linear probe") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_the_group_resumes_from_rank_0s_checkpoint(tmp_path):
    """A 1-step 2-process run, turned into an unfinished 2-step run, continued with --resume."""
    flags = tiny_run_flags(write_tree(tmp_path / "tree"))
    proc = torchrun(*flags, "--steps", "2", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    proc = torchrun(*flags, "--steps", "1", "--out", str(tmp_path / "resumed"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "resumed" / "metrics.json").unlink()
    args = json.loads((tmp_path / "resumed" / "args.json").read_text())
    (tmp_path / "resumed" / "args.json").write_text(json.dumps({**args, "steps": 2}))
    proc = torchrun("--out", str(tmp_path / "resumed"), "--resume", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed["train_history"][0] == metrics["train_history"][0]
    assert len(resumed["train_history"]) == 2 and resumed["steps"] == 2
    assert "resuming" in proc.stdout

"""Table 1: SimCLR and VICReg with noise injection on CIFAR-10/100 (Section 5, Appendix C).

A ResNet-18 (CIFAR stem) is trained on two augmented views of each image. The projector output
goes through the noise head before the loss (common.GaussianNoise): BatchNorm1d(affine=False),
the zero-mean unit-variance constraint of Theorem 3.4, then + Z ~ N(0, sigma^2 I) in training, on
both views (the loss is symmetric: no clean branch). The 512-d backbone features the linear probe
reads are untouched. `--sigma 0`: normalization without noise; `--head none`: the original method.
The run ends with a linear probe (top-1 / top-5) and Section 5's normality tests on the
normalized projector outputs of the test images.

    python cifar_ssl.py --method simclr --dataset cifar10 --sigma 0.3   # one Table 1 cell
    python cifar_ssl.py --method simclr --head none                     # the original method
    python cifar_ssl.py --out RUN_DIR --resume                          # continue a killed run
    python cifar_ssl.py --out RUN_DIR --eval-only                       # re-evaluate a saved run
    python cifar_ssl.py --bench 20                                      # ms/step on this device
    torchrun --nproc_per_node 8 cifar_ssl.py ...                        # one model, 8 processes

Data lives in one uint8 tensor on the device and is augmented there, whole batches with
per-sample parameters; `--workers N` decodes large ImageFolder trees (ImageNet) from disk instead.
Above 64 px the ImageNet recipe applies (--recipe). Under torchrun --batch-size is the global
batch; projections are gathered with gradients, so the losses and the head's normalization see
the global batch; rank 0 alone writes files and evaluates.

Exit codes: 0 done, 2 bad flag or damaged/mismatched file (one line on stderr), 3 diverged
(non-finite loss; the last good checkpoint is kept, no metrics are written).
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import (
    REPO,
    RUNTIME_FLAGS,
    DataError,
    GaussianNoise,
    atomic_path,
    atomic_save,
    autocast,
    bounded,
    device_flag,
    epoch_order,
    fail,
    gaussian_capacity,
    load_data,
    nonnegative_float,
    normality_report,
    nt_xent,
    pick_device,
    positive_float,
    positive_int,
    progress_interval,
    read_json,
    recompute_bn_stats,
    resolve_out,
    save_figure,
    scatter_embeddings,
    seed_int,
    seeded_split,
    vicreg_loss,
    write_json,
)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)  # Appendix C
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # VICReg's recipe
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", torchvision.datasets.CIFAR10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels",
                 torchvision.datasets.CIFAR100),
}
"""Dataset -> (folder, train files, test files, label key, torchvision class that downloads it)."""
PROJECTOR = {"simclr": (1, 256), "vicreg": (2, 2048)}
"""Method -> (hidden layers of width --hidden, output dim): [2048, 256] and [2048, 2048, 2048]."""
CIFAR10_TRAIN = 50_000
IMAGENET_TRAIN = {"ImageNet-100": 126_689, "ImageNet-1k": 1_281_167}
"""Training images of poster Table 2's data sets (ImageNet-100: the 100-class subset of CMC)."""
NOT_SAVED = (*RUNTIME_FLAGS, "eval_only")
"""Flags taken from the command line on --resume / --eval-only; the rest come from args.json."""
RUN_KEYS = ("method", "sigma", "dataset", "arch", "batch_size", "temperature", "vicreg_weights")
"""Keys that every cifar_ssl.py args.json holds: a run directory without them is another's."""


# ---- Flags ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--method", choices=sorted(PROJECTOR), default="simclr",
        help="SSL objective: NT-Xent (SimCLR) or VICReg, losses in common.py")
    add("--sigma", type=nonnegative_float, default=0.0,
        help="std of the noise Z ~ N(0, sigma^2 I) after BatchNorm on the projector output "
             "(Table 1: 0, 0.1, 0.3, 0.5); 0: BatchNorm without noise")
    add("--head", choices=["bn", "none"], default="bn",
        help="bn: BatchNorm1d(affine=False) + noise on the projector output (the noise head); "
             "none: no head at all, the original SimCLR / VICReg (needs --sigma 0)")
    add("--dataset", choices=["cifar10", "cifar100", "folder", "fashion-mnist", "mnist"],
        default="cifar10", help="folder: an ImageFolder tree in --data-dir with train/ and val/ "
        "(or test/); mnist / fashion-mnist: grey 28x28 zero-padded to 3x32x32, mnist falling "
        "back to the shipped test split")
    add("--data-dir", default=None, help="CIFAR: folder holding cifar-10-batches-py/ or "
        "cifar-100-python/ (default data/); folder: the ImageFolder root; MNIST: the IDX files")
    add("--download", action=argparse.BooleanOptionalAction, default=True,
        help="download CIFAR through torchvision when the files are missing")
    add("--workers", type=bounded(int, 0, 256), default=0,
        help="folder only: decode the training images from disk in this many DataLoader worker "
             "processes per training process instead of holding them in memory (large trees "
             "such as ImageNet); the probe's images are decoded into memory once")
    add("--image-size", type=bounded(int, 8, 4096), default=32,
        help="side of the stored and augmented images (CIFAR: 32, Appendix C)")
    add("--arch", choices=["resnet18", "resnet50"], default="resnet18",
        help="torchvision backbone (Appendix C: resnet18; features 512 / 2048)")
    add("--stem", choices=["auto", "cifar", "imagenet"], default="auto",
        help="cifar: 3x3 conv stride 1, no max-pool; imagenet: torchvision's 7x7 stride 2 + "
             "max-pool; auto: cifar up to 64 px")
    add("--recipe", choices=["auto", "cifar", "imagenet"], default="auto",
        help="augmentations: cifar: Appendix C; imagenet: Appendix C + Gaussian blur (p 1.0 / "
             "0.1 per view) + solarization (p 0 / 0.2) and ImageNet mean/std (VICReg, BYOL); "
             "auto: imagenet above 64 px (Table 2 at 224 px)")
    add("--jitter-p", type=bounded(float, 0, 1), default=0.8,
        help="probability of ColorJitter(0.4, 0.4, 0.2, 0.1): 0.8 is SimCLR's value; the "
             "paper's printed Appendix C lists the jitter without a probability")
    add("--hidden", type=positive_int, default=2048, help="projector hidden width (Appendix C)")
    add("--dim", type=bounded(int, 2, 65536), default=None,
        help="projector output dim (Appendix C: simclr 256, vicreg 2048; 2 for a 2-D scatter)")
    add("--temperature", type=bounded(float, 1e-3, 100), default=0.2,
        help="NT-Xent temperature (Appendix C: 0.2)")
    add("--vicreg-weights", type=bounded(float, 0, 1e4), nargs=3, default=[25.0, 25.0, 1.0],
        metavar=("SIM", "VAR", "COV"), help="VICReg weights (Appendix C: 25 25 1)")
    add("--batch-size", type=bounded(int, 2, 1 << 20), default=256,
        help="global batch (Appendix C: 256); BatchNorm and the contrastive loss need >= 2")
    add("--epochs", type=nonnegative_float, default=800.0,
        help="passes over the training images (Appendix C: 800); fractions allowed")
    add("--steps", type=bounded(int, 0, 1 << 40), default=None,
        help="optimizer steps instead of --epochs; 0: the random-init encoder (baseline)")
    add("--lr", type=positive_float, default=0.3,
        help="LARS base lr, scaled by batch/256 (Appendix C: 0.3)")
    add("--momentum", type=nonnegative_float, default=0.9, help="Appendix C: 0.9")
    add("--weight-decay", type=nonnegative_float, default=1e-4,
        help="Appendix C: 1e-4; not on biases and norm parameters")
    add("--trust", type=nonnegative_float, default=0.02,
        help="LARS trust coefficient (Appendix C: 0.02), rate clipped at the lr")
    add("--warmup-epochs", type=nonnegative_float, default=10.0,
        help="linear warm-up before the cosine decay (solo-learn's default: 10)")
    add("--online-lr", type=positive_float, default=0.1,
        help="lr of the online linear probe, same schedule, no LARS scaling")
    add("--probe-steps", type=positive_int, default=500, help="L-BFGS iterations of the probe")
    add("--probe-wd", type=nonnegative_float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1],
        help="L2 weights of the final linear probe (on standardized features); several: the "
             "best on a held-out fifth of the probe-training images")
    add("--probe-train", type=bounded(int, 10, 1 << 40), default=None,
        help="seeded subset of training images for the final probe (default: all)")
    add("--probe-test", type=positive_int, default=None,
        help="seeded subset of test images for every evaluation (default: all)")
    add("--subsample", type=bounded(int, 8, 1 << 20), default=128,
        help="subsample size of the bootstrapped normality tests (sets their power; "
             "D'Agostino needs 8); Henze-Zirkler needs dim < subsample")
    add("--normality-points", type=bounded(int, 8, 1 << 30), default=2000,
        help="test embeddings the normality tests draw from")
    add("--seed", type=seed_int, default=0,
        help="fixes init, data order and augmentation")
    add("--device", type=device_flag, default="auto",
        help="auto (CUDA when present), cpu, cuda, cuda:N, mps")
    add("--amp", action=argparse.BooleanOptionalAction, default=True,
        help="bf16 autocast (fp16 + GradScaler on GPUs without bf16); --no-amp: fp32")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="channels-last memory format for the backbone")
    add("--compile", action="store_true", help="torch.compile the network (CUDA)")
    add("--out", default=None, help="run directory (default: a new one under runs/cifar_ssl/)")
    add("--resume", action="store_true", help="continue the run in --out (settings from its "
        "args.json)")
    add("--eval-only", action="store_true", help="re-evaluate the run in --out from its model.pt "
        "(or checkpoint.pt) into metrics.json, without training (settings from its args.json)")
    add("--ckpt-every", type=nonnegative_float, default=10.0,
        help="checkpoint every N epochs and at the end (0: only at the end)")
    add("--log-every", type=bounded(int, 0, 1 << 40), default=0,
        help="log the loss every N steps (0: about 100 points per run)")
    add("--bench", type=positive_int, default=0, metavar="N",
        help="time N training steps on synthetic data, print ms/step and the time of an "
             "800-epoch CIFAR-10 run, and exit")
    add("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    out = Path(args.out) if args.out else None
    if args.eval_only:
        args.resume = True  # the settings come from --out/args.json, as for --resume
    saved = read_json(out / "args.json") if args.resume and out and (out / "args.json").is_file() \
        else None
    if saved is not None and not (isinstance(saved, dict) and all(k in saved for k in RUN_KEYS)):
        p.error(f"--out {args.out} is not a cifar_ssl.py run (its args.json lacks "
                f"{', '.join(RUN_KEYS)}); choose a cifar_ssl.py run directory")
    resolve_out(p, args, f"runs/cifar_ssl/{args.method}_{args.dataset}_sigma{args.sigma:g}"
                         f"{'_nohead' if args.head == 'none' else ''}_seed{args.seed}")
    if saved is not None and "head" not in saved:  # written before --head: sigma 0 had no head
        args.head = "none" if args.sigma == 0 else "bn"
    args.dim = args.dim or PROJECTOR[args.method][1]
    if args.recipe == "auto":
        args.recipe = "imagenet" if args.image_size > 64 else "cifar"
    if args.head == "none" and args.sigma > 0:
        p.error("--head none has no normalization to add noise to: use --sigma 0 with it")
    if args.method == "vicreg" and not any(args.vicreg_weights):
        p.error("--vicreg-weights: at least one of the three must be > 0")
    if args.dataset == "folder" and not args.data_dir:
        p.error("--dataset folder needs --data-dir pointing at the ImageFolder root")
    if args.workers and args.dataset != "folder":
        p.error("--workers is for --dataset folder only")
    return args


# ---- Data: every split is one uint8 tensor (N, 3, S, S) and int64 labels -------------------------

def read_cifar_batch(file: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels of one CIFAR pickled batch (b'data': N x 3072).
    Raises DataError naming the file when it is not such a batch."""
    try:
        with open(file, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, ImportError, UnicodeDecodeError, OverflowError, MemoryError) as err:
        raise DataError(f"{file} is not a CIFAR python pickle (truncated or damaged: "
                        f"{type(err).__name__}); download it again") from err
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataError(f"{file} lacks b'data' or {label_key!r}: not a CIFAR python batch")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data) \
            or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise DataError(f"{file}: b'data' {data.shape} and {label_key!r} {labels.shape} are not "
                        "N x 3072 pixels and N non-negative integer labels")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar(dataset: str, root: Path, download: bool) -> tuple[torch.Tensor, ...]:
    """CIFAR-10/100 from the pickled batches in root/<folder>/, downloaded there when missing.
    The pickles are read directly (no checksum), so any data in this format works."""
    folder, train_files, test_files, label_key, tv_class = CIFAR_FILES[dataset]
    names = train_files + test_files
    if not all((root / folder / name).is_file() for name in names) and download:
        try:
            tv_class(str(root), train=True, download=True)
        except Exception as err:  # network errors come in many types
            raise DataError(f"{dataset} is not in {root / folder} and could not be downloaded "
                            f"({str(err).splitlines()[0][:80]})") from err
    missing = [name for name in names if not (root / folder / name).is_file()]
    if missing:
        raise DataError(f"{root / folder} lacks {', '.join(missing)} (CIFAR's python pickles); "
                        f"point --data-dir at the folder that holds {folder}/ or allow --download")
    splits = []
    for files in (train_files, test_files):
        parts = [read_cifar_batch(root / folder / name, label_key) for name in files]
        splits += [torch.from_numpy(np.concatenate([x for x, _ in parts])),
                   torch.from_numpy(np.concatenate([y for _, y in parts]))]
    return tuple(splits)


def read_rgb(path: str) -> Any:
    """ImageFolder's loader (PIL, RGB), with a DataError naming a file PIL cannot decode."""
    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for damaged files
        raise DataError(f"{path} is not a readable image ({err})") from err


class StoredImage:
    """PIL image (RGB) -> shorter side resized to `size` (bicubic), centre-cropped, uint8
    (3, size, size): the form in which every image enters the batched augmentations."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Any) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF
        image = TF.resize(image, self.size, interpolation=TF.InterpolationMode.BICUBIC)
        return TF.pil_to_tensor(TF.center_crop(image, [self.size, self.size]))


def open_trees(root: Path, size: int) -> tuple[Any, Any]:
    """The ImageFolder trees root/train and root/val (or root/test), images as StoredImage."""
    test_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"{root} needs train/<class>/<image> and val/<class>/<image> (or test/) "
                        "folders; point --data-dir at such a tree")
    try:
        trees = [torchvision.datasets.ImageFolder(str(d), StoredImage(size), loader=read_rgb)
                 for d in (root / "train", test_dir)]
    except (FileNotFoundError, OSError) as err:  # a class folder without images, unreadable
        raise DataError(f"{root}: {str(err).splitlines()[0]}") from err
    if trees[0].classes != trees[1].classes:
        raise DataError(f"{root}: train/ and {test_dir.name}/ hold different class folders")
    return trees[0], trees[1]


def decode(tree: Any, indices: list[int], workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images `indices` of a tree decoded by `workers` DataLoader processes (0: this one)
    into one uint8 tensor, and their labels (the global RNG untouched)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(tree, indices), batch_size=256,
                                         num_workers=workers, generator=torch.Generator())
    parts = list(loader)
    if not parts:
        side = tree[0][0].shape[-1]
        return torch.empty(0, 3, side, side, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def load_images(args: argparse.Namespace) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """(x_train, y_train, x_test, y_test) on the CPU, uint8 at --image-size, and the record of
    the data (source, sizes, classes, normalization) that metrics.json keeps.

    With --workers the training tree stays on disk (info["tree"]) and x_train is the probe's
    seeded subset of --probe-train images; ranks > 0 decode no probe images (only rank 0
    evaluates) unless the Appendix C recipe needs their mean and std.
    """
    info: dict[str, Any] = {"dataset": args.dataset}
    if args.dataset == "folder":
        tree, test = open_trees(Path(args.data_dir), args.image_size)
        info.update(source=args.data_dir)
        if args.workers:
            def chosen(n: int, k: int | None) -> list[int]:
                if rank_and_world()[0] > 0 and args.recipe == "imagenet":
                    return []
                return list(range(n)) if k is None or k >= n else \
                    seeded_split(n, k, args.seed)[0].tolist()
            x_tr, y_tr = decode(tree, chosen(len(tree), args.probe_train), args.workers)
            x_te, y_te = decode(test, chosen(len(test), args.probe_test), args.workers)
            info.update(tree=tree)
        else:
            (x_tr, y_tr), (x_te, y_te) = (decode(t, list(range(len(t))), 0) for t in (tree, test))
        info.update(n_classes=len(tree.classes), n_train=len(tree))
    elif args.dataset in CIFAR_FILES:
        root = Path(args.data_dir) if args.data_dir else REPO / "data"
        x_tr, y_tr, x_te, y_te = load_cifar(args.dataset, root, args.download)
        info.update(source=str(root), mean=CIFAR_MEAN, std=CIFAR_STD)
    else:
        x_tr, y_tr, x_te, y_te, record = load_data(args.dataset, args.data_dir, args.download,
                                                   crop=None)
        # grey (N, 1, 28, 28) in [0, 1] -> (N, 3, 32, 32) uint8, zero-padded, channel repeated
        x_tr, x_te = ((F.pad(x, (2, 2, 2, 2)) * 255).round().to(torch.uint8)
                      .expand(-1, 3, -1, -1).contiguous() for x in (x_tr, x_te))
        info.update(record)
        if "note" in record:
            print(record["note"])
    if x_tr.shape[-1] != args.image_size:
        x_tr, x_te = (F.interpolate(x.float(), size=args.image_size, mode="bilinear",
                                    antialias=True).round().clamp(0, 255).to(torch.uint8)
                      for x in (x_tr, x_te))
    if args.recipe == "imagenet":
        info.update(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if "mean" not in info:
        pixels = x_tr.float().div(255).transpose(0, 1).reshape(3, -1)
        info.update(mean=pixels.mean(1).tolist(), std=pixels.std(1).tolist())
    info.setdefault("n_train", len(x_tr))  # a tree on disk counted its own (x_tr: the probe's)
    if "n_classes" not in info:
        info["n_classes"] = int(y_tr.max()) + 1
    info.update(n_test=len(x_te), image_size=args.image_size)
    return (x_tr, y_tr, x_te, y_te), info


# ---- Augmentations of Appendix C on whole batches, each sample with its own parameters -----------

CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
GREY_P, FLIP_P = 0.2, 0.5
"""RandomResizedCrop(scale, ratio), RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=--jitter-p),
RandomGrayscale(0.2), RandomHorizontalFlip(0.5): the PretrainTransform of Appendix C. The
jitter's probability, 0.8, is SimCLR's: the paper's printed Appendix C does not give one."""


def jitter_ranges(strengths: dict[str, float]) -> dict[str, tuple[float, float]]:
    """ColorJitter's factor ranges: [max(0, 1 - s), 1 + s], hue [-s, s] (torchvision)."""
    return {name: (-s, s) if name == "hue" else (max(0.0, 1 - s), 1 + s)
            for name, s in strengths.items()}


def sample_crops(n: int, height: int, width: int, device: torch.device,
                 scale: tuple[float, float] = CROP_SCALE,
                 ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """(n, 4) crop boxes (top, left, h, w), each drawn as RandomResizedCrop.get_params draws it:
    ten tries of area ~ U(scale) H W and log aspect ~ U(log ratio), h and w rounded, the first
    try that fits kept, else torchvision's central fallback crop."""
    uniform = torch.rand(n, 10, 2, device=device)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * uniform[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * uniform[..., 1])
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = round(height * max(ratio)), height
    else:
        fallback_w, fallback_h = width, height
    found = fits.any(dim=1)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    position = torch.rand(n, 2, device=device)
    top = torch.where(found, torch.floor(position[:, 0] * (height - h + 1)),
                      (height - fallback_h) // 2)
    left = torch.where(found, torch.floor(position[:, 1] * (width - w + 1)),
                       (width - fallback_w) // 2)
    return torch.stack([top, left, h, w], dim=1).long()


def sample_augment_params(n: int, height: int, width: int, device: torch.device,
                          jitter_p: float = 0.8) -> dict[str, torch.Tensor]:
    """Per-sample parameters of the Appendix C pipeline for a batch of n images: crop (n, 4);
    jitter (n,) bool (p = jitter_p); factors (n, 4) brightness, contrast, saturation, hue, each
    uniform on ColorJitter's range; order (n, 4) a random permutation of the four operations per
    sample, as ColorJitter draws one per image; grey (n,) bool (p 0.2); flip (n,) bool (p 0.5)."""
    ranges = torch.tensor(list(jitter_ranges(JITTER).values()), device=device)
    uniform = torch.rand  # the draws in this order: crop, jitter, factors, order, grey, flip
    return {"crop": sample_crops(n, height, width, device),
            "jitter": uniform(n, device=device) < jitter_p,
            "factors": ranges[:, 0] + (ranges[:, 1] - ranges[:, 0]) * uniform(n, 4, device=device),
            "order": uniform(n, 4, device=device).argsort(dim=1),
            "grey": uniform(n, device=device) < GREY_P,
            "flip": uniform(n, device=device) < FLIP_P}


def bicubic_weights(start: torch.Tensor, length: torch.Tensor, in_size: int,
                    out_size: int) -> torch.Tensor:
    """(n, out_size, in_size) matrices resampling the window [start, start + length) of each row:
    antialiased bicubic as in PIL and torchvision's resize(antialias=True), the cubic kernel with
    a = -0.5 stretched by the scale when shrinking, restricted to the window, renormalized."""
    scale = (length.float() / out_size)[:, None, None]
    centre = start[:, None, None] + (torch.arange(out_size, device=start.device)[None, :, None]
                                     + 0.5) * scale
    pixel = torch.arange(in_size, device=start.device)[None, None, :] + 0.5
    t = ((pixel - centre) / scale.clamp(min=1)).abs()
    a = -0.5
    weight = torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                         torch.where(t < 2, a * (((t - 5) * t + 8) * t - 4), 0.0))
    weight = weight * ((pixel >= start[:, None, None]) & (pixel < (start + length)[:, None, None]))
    return weight / weight.sum(dim=2, keepdim=True)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int,
                 flip: torch.Tensor) -> torch.Tensor:
    """Crop each image to its box (top, left, h, w), resize to size x size (bicubic) and mirror
    the flagged ones: out = W_rows @ x @ W_cols^T, mirroring reverses the rows of W_cols. Done
    here rather than last, as in Appendix C, because every later operation commutes with it."""
    rows = bicubic_weights(boxes[:, 0], boxes[:, 2], x.shape[-2], size)
    cols = bicubic_weights(boxes[:, 1], boxes[:, 3], x.shape[-1], size)
    cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    out = rows[:, None] @ x @ cols[:, None].transpose(-1, -2)
    return out.clamp(0.0, 1.0)  # bicubic overshoots; PIL's uint8 output is clipped likewise


def grey(x: torch.Tensor) -> torch.Tensor:
    """Luma (N, 1, H, W) with torchvision's rgb_to_grayscale weights."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clipped to [0, 1] (torchvision's _blend), per sample."""
    factor = factor[:, None, None, None]
    return (factor * x + (1 - factor) * other).clamp(0.0, 1.0)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by shift[i] turns: RGB -> HSV, h + shift mod 1, -> RGB."""
    value, _ = x.max(dim=1)
    chroma = value - x.min(dim=1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.unbind(dim=1)
    hue = torch.where(value == r, (g - b) / safe,
                      torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = torch.remainder(hue + shift[:, None, None], 1.0)
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6 * hue, 6.0)
        channels.append(value - value * saturation * torch.minimum(k, 4 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


JITTER_OPS: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = [
    lambda x, f: blend(x, torch.zeros_like(x), f),                                # brightness
    lambda x, f: blend(x, grey(x).mean(dim=(1, 2, 3), keepdim=True), f),          # contrast
    lambda x, f: blend(x, grey(x), f),                                            # saturation
    shift_hue,                                                                    # hue
]
"""ColorJitter's four operations, each with a per-sample factor, as torchvision defines them."""

BLUR_P, SOLARIZE_P, BLUR_SIGMA = (1.0, 0.1), (0.0, 0.2), (0.1, 2.0)
"""The ImageNet recipe's extra steps per view (VICReg, Bardes et al. 2022, Appendix C; BYOL,
Grill et al. 2020, Table 6): Gaussian blur with sigma ~ U(0.1, 2) and a kernel of a tenth of the
image side (23 px at 224), solarization of the pixels >= 0.5."""


def sample_imagenet_params(n: int, view: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-sample blur flag and sigma, and solarization flag, of view 0 or 1."""
    return {"blur": torch.rand(n, device=device) < BLUR_P[view],
            "blur_sigma": BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0])
            * torch.rand(n, device=device),
            "solarize": torch.rand(n, device=device) < SOLARIZE_P[view]}


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """torchvision's gaussian_blur (reflect padding, separable kernel of odd size) with a sigma
    per image: one grouped convolution per axis, every (image, channel) its own group."""
    n, c, height, width = x.shape
    offsets = torch.arange(kernel, device=x.device) - (kernel - 1) / 2
    weights = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, dim=0)
    half = kernel // 2
    y = F.pad(x.reshape(1, n * c, height, width), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, weights[:, None, None, :], groups=n * c)
    y = F.conv2d(y, weights[:, None, :, None], groups=n * c)
    return y.reshape(n, c, height, width)


def augment(x: torch.Tensor, params: dict[str, torch.Tensor], size: int,
            mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The Appendix C pipeline on a uint8 batch: crop + resize (+ flip), colour jitter (applied
    with p = --jitter-p, SimCLR's 0.8, which the printed Appendix C omits) in each sample's own
    order, greyscale, then with the ImageNet recipe's params Gaussian blur and solarization;
    normalize. Returns float32 (N, 3, size, size). Each jitter position runs every operation on
    the whole batch and keeps it where the sample has it: no data-dependent shapes, hence no
    host-device synchronization on a GPU."""
    x = resized_crop(x.float() / 255, params["crop"], size, params["flip"])
    for position in range(4):
        for op, fn in enumerate(JITTER_OPS):
            chosen = params["jitter"] & (params["order"][:, position] == op)
            x = torch.where(chosen[:, None, None, None], fn(x, params["factors"][:, op]), x)
    x = torch.where(params["grey"][:, None, None, None], grey(x).expand_as(x), x)
    if "blur" in params:
        blurred = gaussian_blur(x, params["blur_sigma"], 2 * round(0.1 * size / 2) + 1)
        x = torch.where(params["blur"][:, None, None, None], blurred, x)
        x = torch.where(params["solarize"][:, None, None, None] & (x >= 0.5), 1 - x, x)
    return (x - mean[:, None, None]) / std[:, None, None]


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The TestTransform of Appendix C: uint8 -> [0, 1] -> (x - mean) / std."""
    return (x.float() / 255 - mean[:, None, None]) / std[:, None, None]


# ---- Several processes (torchrun): rank, gather with gradients -----------------------------------

def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (every process the same number of rows), differentiable. The
    backward is the adjoint, a reduce-scatter: each process's loss on the gathered batch is the
    same L, so each gets N dL/dx for its rows, and DDP's mean over N processes gives dL/dtheta."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        ctx.rows = slice(rank * len(x), (rank + 1) * len(x))
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def gather(x: torch.Tensor) -> torch.Tensor:
    """The rows of every process in rank order (x itself in a single process)."""
    return GatherWithGrad.apply(x) if rank_and_world()[1] > 1 else x


# ---- Model: ResNet backbone, projector, noise head, online probe ---------------------------------

def resnet_backbone(arch: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    """torchvision ResNet without its classifier; the CIFAR stem is a 3x3 stride-1 conv and no
    max-pool (He et al. 2016, Sec. 4.2), as used for Table 1. Returns (network, feature dim)."""
    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    features = net.fc.in_features
    net.fc = nn.Identity()
    return net, features


def make_projector(method: str, in_dim: int, hidden: int, dim: int) -> nn.Sequential:
    """SimCLR: Linear-ReLU-Linear, [2048, 256]; VICReg: two Linear-BN-ReLU blocks then Linear,
    [2048, 2048, 2048] (Appendix C; layer types as in solo-learn and the VICReg paper)."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(PROJECTOR[method][0]):
        layers += [nn.Linear(width, hidden)]
        layers += [nn.BatchNorm1d(hidden)] if method == "vicreg" else []
        layers += [nn.ReLU(inplace=True)]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, dim))


class SSLNet(nn.Module):
    """backbone -> features h; projector -> noise head -> the z the SSL loss sees; probe on h.
    head "bn": common.GaussianNoise (BatchNorm1d(affine=False), + N(0, sigma^2 I) in training);
    head "none": no head, the standard method's network exactly."""

    def __init__(self, method: str, sigma: float, arch: str, cifar_stem: bool, hidden: int,
                 dim: int, n_classes: int, head: str = "bn"):
        super().__init__()
        self.backbone, features = resnet_backbone(arch, cifar_stem)
        self.projector = make_projector(method, features, hidden, dim)
        self.head = GaussianNoise(dim, sigma) if head == "bn" else None
        self.probe = nn.Linear(features, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        p = self.projector(h)
        if self.head is not None:
            p = self.head(p.float())  # the normalization in float32 under AMP
        return h, p


def build_model(args: argparse.Namespace, n_classes: int, device: torch.device) -> SSLNet:
    cifar_stem = args.stem == "cifar" or (args.stem == "auto" and args.image_size <= 64)
    model = SSLNet(args.method, args.sigma, args.arch, cifar_stem, args.hidden, args.dim,
                   n_classes, args.head).to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


# ---- Losses and optimizer: NT-Xent / VICReg over the global batch, LARS, warm-up + cosine --------

def ssl_loss(args: argparse.Namespace) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The Table 1 objective (common.py) on the two views' head outputs, over the rows of every
    process: NT-Xent's negatives and VICReg's variance and covariance are the global batch's."""
    if args.method == "simclr":
        return lambda z1, z2: nt_xent(gather(z1.float()), gather(z2.float()), args.temperature)
    sim, var, cov = args.vicreg_weights
    return lambda z1, z2: vicreg_loss(gather(z1.float()), gather(z2.float()), sim, var, cov)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise rate (You et al. 2017, eq. 6), clipped as in LARC.

    For a parameter w with gradient g in a group with `adapt` (weights, not biases or norms):
        d = (g + wd w) rate,  rate = trust ||w|| / (||g|| + wd ||w|| + eps),
        rate <- min(rate / lr, 1) (`clip`);  d = g (no decay, no rate) when ||w|| or ||g|| = 0
        v <- momentum v + d,  w <- w - lr v
    Groups without `adapt` take plain SGD steps, d = g (their weight decay is 0). This is
    solo-learn's LARS (from PyTorch Lightning Bolts; lightly's is the same), which the paper's
    settings come from: a parameter whose gradient is exactly zero gets no decay and no new
    step, only the momentum it has; the first step sets v = d as there.
    """

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust: float = 0.02, eps: float = 1e-8, clip: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust=trust, eps=eps, clip=clip, adapt=True))

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]  # no closure: one gradient per step
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                d = w.grad
                if group["adapt"]:
                    w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)
                    rate = group["trust"] * w_norm / (g_norm + group["weight_decay"] * w_norm
                                                      + group["eps"])
                    if group["clip"]:
                        rate = (rate / group["lr"]).clamp(max=1.0)
                    # torch.where, not `if`: no host-device synchronization per parameter
                    d = torch.where((w_norm > 0) & (g_norm > 0),
                                    (d + group["weight_decay"] * w) * rate, d)
                state = self.state[w]
                if "velocity" not in state:
                    state["velocity"] = d.clone()
                else:
                    state["velocity"].mul_(group["momentum"]).add_(d)
                w.add_(state["velocity"], alpha=-group["lr"])


def make_optimizer(model: SSLNet, args: argparse.Namespace) -> LARS:
    """LARS on backbone + projector (lr 0.3 x batch/256, Appendix C), biases and norm parameters
    (every 1-D tensor) without weight decay or adaptation; the online probe as plain SGD."""
    scaled = args.lr * args.batch_size / 256
    ssl = [p for name, p in model.named_parameters() if not name.startswith("probe.")]
    groups = [
        {"params": [p for p in ssl if p.ndim > 1], "base_lr": scaled},
        {"params": [p for p in ssl if p.ndim <= 1], "base_lr": scaled, "weight_decay": 0.0,
         "adapt": False},
        {"params": list(model.probe.parameters()), "base_lr": args.online_lr,
         "weight_decay": 0.0, "adapt": False},
    ]
    return LARS(groups, lr=scaled, momentum=args.momentum, weight_decay=args.weight_decay,
                trust=args.trust)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (SimCLR)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---- Training: one step, checkpoints, batches, the loop ------------------------------------------

class Trainer:
    """The network (DDP-wrapped under torchrun, compiled with --compile), LARS, the AMP scaler,
    and one training step: two augmented views, SSL loss + online-probe loss, LARS step."""

    def __init__(self, model: SSLNet, args: argparse.Namespace, mean: torch.Tensor,
                 std: torch.Tensor, device: torch.device):
        self.model, self.args, self.mean, self.std, self.device = model, args, mean, std, device
        net: nn.Module = model
        if rank_and_world()[1] > 1:
            if device.type == "cuda":  # PyTorch's SyncBatchNorm has no CPU kernel (gloo)
                model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
                model.projector = nn.SyncBatchNorm.convert_sync_batchnorm(model.projector)
            if model.head is not None:  # the head normalizes over the global batch the loss sees
                model.head.gather = gather
            net = DistributedDataParallel(model, device_ids=[device.index]
                                          if device.type == "cuda" else None)
        self.net = torch.compile(net) if args.compile else net
        self.opt = make_optimizer(model, args)
        self.loss_fn = ssl_loss(args)
        fp16 = args.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independently augmented views of a uint8 batch (channels-last with the flag)."""
        n, _, height, width = x.shape
        pair = []
        for view in range(2):
            params = sample_augment_params(n, height, width, self.device, self.args.jitter_p)
            if self.args.recipe == "imagenet":
                params.update(sample_imagenet_params(n, view, self.device))
            pair.append(augment(x, params, self.args.image_size, self.mean, self.std))
        if self.args.channels_last:
            pair = [v.contiguous(memory_format=torch.channels_last) for v in pair]
        return pair[0], pair[1]

    def step(self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor,
             lr_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(SSL loss, online-probe accuracy) of one step, as tensors (no synchronization)."""
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
        self.model.train()
        with autocast(self.device, self.args.amp):
            h1, z1 = self.net(v1)
            h2, z2 = self.net(v2)
            loss = self.loss_fn(z1, z2)
            labels = torch.cat([y, y])
            logits = self.model.probe(torch.cat([h1, h2]).detach())
            probe_loss = F.cross_entropy(logits.float(), labels)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss + probe_loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss.detach(), (logits.argmax(1) == labels).float().mean()


def write_checkpoint(out: Path, trainer: Trainer, step: int, history: list) -> None:
    """Everything --resume needs: weights, optimizer, scaler, RNG states, log (atomic). Called
    by every process: each one's RNG states (augmentations and noise differ between processes)
    are gathered into "process_rng", and rank 0 writes the file."""
    rank, world = rank_and_world()
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available()
           else [])
    state = {"step": step, "model": trainer.model.state_dict(),
             "optimizer": trainer.opt.state_dict(), "scaler": trainer.scaler.state_dict(),
             "rng": rng[0], "cuda_rng": rng[1], "history": history}
    if world > 1:
        state["process_rng"] = [None] * world
        dist.all_gather_object(state["process_rng"], rng)
    if rank == 0:
        atomic_save(state, out / "checkpoint.pt")


def read_torch_file(path: Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint.pt / model.pt of this script; DataError when it is damaged."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise DataError(f"{path} is damaged ({str(err).splitlines()[0][:100]}); delete it "
                        "or choose another --out") from err
    if not isinstance(state, dict) or "model" not in state:
        raise DataError(f"{path} is not a cifar_ssl.py checkpoint (no model weights)")
    return state


def load_weights(model: nn.Module, weights: dict[str, Any], path: Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise DataError(f"{path} holds a model with other settings than its args.json "
                        f"({str(err).splitlines()[0][:100]})") from err


def read_checkpoint(out: Path, trainer: Trainer, device: torch.device) -> tuple[int, list]:
    """Every process loads rank 0's file and takes its own RNG states back."""
    rank, world = rank_and_world()
    ckpt = read_torch_file(out / "checkpoint.pt", device)
    if world > 1 and len(ckpt.get("process_rng", [])) != world:
        raise DataError(f"{out / 'checkpoint.pt'} was not written by {world} processes; resume "
                        "it with as many processes as it was started with")
    load_weights(trainer.model, ckpt["model"], out / "checkpoint.pt")
    trainer.opt.load_state_dict(ckpt["optimizer"])
    trainer.scaler.load_state_dict(ckpt["scaler"])
    cpu_rng, cuda_rng = ckpt["process_rng"][rank] if world > 1 else (ckpt["rng"],
                                                                        ckpt["cuda_rng"])
    torch.set_rng_state(cpu_rng.cpu())
    if cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in cuda_rng])
    return ckpt["step"], ckpt["history"]


Batches = Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
"""(epoch, first step of it) -> this process's (uint8 images, labels) of every later step."""


def global_batches(n: int, args: argparse.Namespace, epoch: int, first: int) -> list[torch.Tensor]:
    """This process's slice of each global batch of epoch `epoch` from step `first` on: the
    seeded permutation of (seed, epoch) cut into --batch-size pieces (the last partial one
    dropped), each cut into one piece per process (a resumable DistributedSampler)."""
    rank, world = rank_and_world()
    order = epoch_order(n, args.seed, epoch, torch.device("cpu"))
    return [order[k * args.batch_size:(k + 1) * args.batch_size].chunk(world)[rank]
            for k in range(first, n // args.batch_size)]


def memory_batches(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> Batches:
    """Batches indexed from the in-memory images."""
    def batches(epoch: int, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in global_batches(len(x), args, epoch, first):
            index = index.to(x.device)
            yield x[index], y[index]
    return batches


def disk_batches(tree: Any, args: argparse.Namespace, device: torch.device) -> Batches:
    """Batches decoded from disk by --workers DataLoader processes, in the in-memory path's
    order; the loader's own generator leaves the global RNG (augmentations, noise) untouched."""
    def batches(epoch: int, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = [index.tolist() for index in global_batches(len(tree), args, epoch, first)]
        loader = torch.utils.data.DataLoader(tree, batch_sampler=sampler,
                                             num_workers=args.workers,
                                             pin_memory=device.type == "cuda",
                                             generator=torch.Generator().manual_seed(epoch))
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return batches


def schedule_plan(args: argparse.Namespace, n_train: int) -> dict[str, int]:
    """Steps per epoch (last partial batch dropped), total steps, warm-up, log and checkpoint
    intervals, in steps."""
    per_epoch = n_train // args.batch_size
    steps = args.steps if args.steps is not None else round(args.epochs * per_epoch)
    return {"per_epoch": per_epoch, "steps": steps,
            "warmup": round(args.warmup_epochs * per_epoch),
            "log_every": args.log_every or max(1, steps // 100),
            "ckpt_every": max(1, round(args.ckpt_every * per_epoch) if args.ckpt_every
                              else steps)}


def train(trainer: Trainer, batches: Batches, plan: dict[str, int], out: Path, start: int,
          history: list) -> None:
    """Steps `start` .. plan["steps"]; epoch permutations fixed by (seed, epoch), so --resume
    needs no data-loader state. Logs [step, loss, online-probe accuracy, lr] to `history`,
    checkpoints every plan["ckpt_every"] steps and at the end, and stops with exit code 3 on a
    non-finite loss, keeping the last good checkpoint."""
    args, per_epoch = trainer.args, plan["per_epoch"]
    rank, world = rank_and_world()
    bar = tqdm(range(start, plan["steps"]), initial=start, total=plan["steps"],
               disable=args.quiet or rank > 0, desc=f"{args.method} sigma={args.sigma:g}",
               dynamic_ncols=True, mininterval=progress_interval())
    losses, accuracies = [], []
    for step in bar:
        epoch, k = divmod(step, per_epoch)
        if k == 0 or step == start:
            stream = batches(epoch, k)
        x, y = next(stream)
        scale = lr_factor(step, plan["warmup"], plan["steps"])
        loss, accuracy = trainer.step(*trainer.views(x), y, scale)
        losses.append(loss)
        accuracies.append(accuracy)
        done = step + 1
        if done % plan["log_every"] == 0 or done % plan["ckpt_every"] == 0 or done == plan["steps"]:
            mean_loss = torch.stack(losses).mean().item()
            mean_acc = torch.stack(accuracies).mean()
            if world > 1:  # the loss is the global batch's already; the probe's is per process
                dist.all_reduce(mean_acc)
                mean_acc /= world
            mean_acc = mean_acc.item()
            losses, accuracies = [], []
            if not math.isfinite(mean_loss):
                kept = (f"the last good checkpoint is kept in {out / 'checkpoint.pt'}"
                        if (out / "checkpoint.pt").is_file() else "no checkpoint was written yet")
                fail(f"the loss became {mean_loss} by step {done}; {kept}; no metrics written. "
                     "Try a smaller --lr", code=3)
            history.append([done, mean_loss, mean_acc, args.lr * args.batch_size / 256 * scale])
            bar.set_postfix(epoch=epoch, loss=f"{mean_loss:.3f}", online=f"{mean_acc:.3f}",
                            refresh=False)
        if done % plan["ckpt_every"] == 0 or done == plan["steps"]:
            write_checkpoint(out, trainer, done, history)


# ---- Evaluation: linear probe on frozen features, normality of the normalized projector outputs --

@torch.no_grad()
def embed(model: SSLNet, x: torch.Tensor, args: argparse.Namespace, mean: torch.Tensor,
          std: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode backbone features h and projector outputs (before the noise head), float32."""
    model.eval()
    features, projections = [], []
    for i in range(0, len(x), 512):
        batch = normalize(x[i:i + 512], mean, std)
        if args.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device, args.amp):
            h = model.backbone(batch)
            p = model.projector(h)
        features.append(h.float())
        projections.append(p.float())
    return torch.cat(features), torch.cat(projections)


def fit_logistic(a: torch.Tensor, y: torch.Tensor, n_classes: int, steps: int,
                 weight_decay: float) -> nn.Linear:
    """Multinomial logistic regression, cross-entropy + weight_decay / 2 ||W||^2, full-batch
    L-BFGS (strong Wolfe) from zero weights."""
    linear = nn.Linear(a.shape[1], n_classes).to(a.device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6,
                            tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(a), y) + 0.5 * weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return linear


@torch.no_grad()
def linear_probe(f_tr: torch.Tensor, y_tr: torch.Tensor, f_te: torch.Tensor, y_te: torch.Tensor,
                 n_classes: int, steps: int = 500,
                 weight_decays: Sequence[float] = (1e-4,)) -> dict[str, float]:
    """Logistic regression on frozen features standardized with the training statistics. With
    several weight decays, each is fitted on a seeded 80 % of the training features and the best
    top-1 on the other 20 % is refitted on all (a random encoder overfits a weak penalty).
    Returns train top-1, test top-1 / top-5 (Table 1's columns) and the weight decay used."""
    mu, sd = f_tr.mean(0), f_tr.std(0).clamp(min=1e-6)
    a_tr, a_te = (f_tr - mu) / sd, (f_te - mu) / sd
    chosen = weight_decays[0]
    if len(weight_decays) > 1:
        order = torch.randperm(len(a_tr), generator=torch.Generator().manual_seed(0))
        fit, held = order[len(a_tr) // 5:].to(a_tr.device), order[:len(a_tr) // 5].to(a_tr.device)

        def held_out_top1(wd: float) -> float:
            linear = fit_logistic(a_tr[fit], y_tr[fit], n_classes, steps, wd)
            return (linear(a_tr[held]).argmax(1) == y_tr[held]).float().mean().item()
        chosen = max(weight_decays, key=held_out_top1)
    linear = fit_logistic(a_tr, y_tr, n_classes, steps, chosen)
    top5 = linear(a_te).topk(min(5, n_classes), dim=1).indices
    return {"top1": (top5[:, 0] == y_te).float().mean().item(),
            "top5": (top5 == y_te[:, None]).any(1).float().mean().item(),
            "train_top1": (linear(a_tr).argmax(1) == y_tr).float().mean().item(),
            "weight_decay": chosen}


def normality(z: np.ndarray, seed: int, subsample: int, points: int) -> dict[str, Any]:
    """Section 5 normality tests (common.normality_report) on up to `points` test embeddings;
    Henze-Zirkler is None when d >= subsample (its whitening needs d < subsample)."""
    z = z[np.random.default_rng(seed).permutation(len(z))[:points]]
    return {**normality_report(z, seed=seed, subsample=subsample), "points": len(z)}


def evaluate(model: SSLNet, data: tuple[torch.Tensor, ...], args: argparse.Namespace,
             mean: torch.Tensor, std: torch.Tensor, n_classes: int,
             device: torch.device) -> dict[str, Any]:
    """Linear probe (top-1/top-5), online probe on the test features, and the normalized
    projector outputs of the test images with their normality tests ("embeddings": (z, y)).

    Every BatchNorm's statistics are first recomputed on the clean probe-training images, for
    every run alike: the momentum averages of training mix augmented views, and the random-init
    baseline (--steps 0) has none. The projector outputs are then standardized with their mean
    and variance over the same images: with --head bn this is the noise head's BatchNorm, with
    --head none the same standardization, for comparison.
    """
    x_tr, y_tr, x_te, y_te = data

    def forward(x: torch.Tensor) -> None:
        batch = normalize(x, mean, std)
        if args.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device, args.amp):
            model(batch)

    # a last batch of one image would break BatchNorm1d in training mode
    recompute_bn_stats(model, forward, x_tr, 512 if len(x_tr) % 512 != 1 else 511)
    f_tr, p_tr = embed(model, x_tr, args, mean, std, device)
    f_te, p_te = embed(model, x_te, args, mean, std, device)
    if not all(torch.isfinite(t).all() for t in (f_tr, p_tr, f_te, p_te)):
        fail("the embeddings are not finite (the training diverged); no metrics written. "
             "Try a smaller --lr", code=3)
    probe = linear_probe(f_tr, y_tr, f_te, y_te, n_classes, args.probe_steps, args.probe_wd)
    online = (model.probe(f_te).argmax(1) == y_te).float().mean().item()
    z_te = ((p_te - p_tr.mean(0)) / p_tr.std(0).clamp(min=1e-6)).cpu().numpy()
    return {"probe": probe, "online_probe": {"test_top1": online},
            "normality": normality(z_te, args.seed, args.subsample, args.normality_points),
            "embeddings": (z_te, y_te.cpu().numpy())}


def label(method: str, sigma: float, head: str) -> str:
    """A run's row name: the original method (no head), or the head with its noise level."""
    return f"{method} without noise head (original)" if head == "none" else \
        f"{method} BatchNorm head, sigma = {sigma:g}"


def report(m: dict[str, Any]) -> str:
    """The run's metrics.json as the few lines printed at its end."""
    n, probe = m["normality"], m["probe"]
    hz = "n/a (dim >= subsample)" if n["henze_zirkler_p"] is None else f"{n['henze_zirkler_p']:.3f}"
    head = m.get("head", "none" if m["sigma"] == 0 else "bn")  # runs from before --head
    return (f"{label(m['method'], m['sigma'], head)} on {m['data']['dataset']}, {m['steps']} "
            f"steps ({m['epochs']:.2f} epochs), final loss {m['final_loss']:.4f}\n"
            f"linear probe: top-1 {100 * probe['top1']:.2f} %   top-5 {100 * probe['top5']:.2f} %"
            f"   (weight decay {probe['weight_decay']:g}; online probe top-1 "
            f"{100 * m['online_probe']['test_top1']:.2f} %)\n"
            f"normality p of the normalized projector outputs (d = {m['dim']}, subsample "
            f"{n['subsample']}): D'Agostino {n['dagostino_p']:.3f}   Shapiro-Wilk "
            f"{n['shapiro_p']:.3f}   Henze-Zirkler {hz}\n"
            f"wall time {m['wall_time_s']:.0f} s on {m['device']}")


# ---- --bench, the run, main() --------------------------------------------------------------------

def bench(args: argparse.Namespace, device: torch.device) -> None:
    """Time args.bench steps on synthetic images (augmentation and forward/backward/update
    apart) and project an 800-epoch CIFAR-10 run, or 100-epoch ImageNet runs (poster Table 2)."""
    torch.manual_seed(args.seed)
    rank, world = rank_and_world()
    trainer = Trainer(build_model(args, 10, device), args, torch.tensor(CIFAR_MEAN, device=device),
                      torch.tensor(CIFAR_STD, device=device), device)
    n = args.batch_size // world  # each process times its slice of the global batch
    x = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8,
                      device=device)
    y = torch.randint(0, 10, (n,), device=device)
    clock = [0.0, 0.0]  # augmentation, forward/backward/update
    for i in range(2 + args.bench):  # two warm-up steps (allocator, autotuning, compilation)
        t0 = time.perf_counter()
        views = trainer.views(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        trainer.step(*views, y, 1.0)[0].item()
        if i >= 2:
            clock = [clock[0] + (t1 - t0) / args.bench, clock[1] + (time.perf_counter() - t1)
                     / args.bench]
    total = sum(clock)
    projection = (" and ".join(f"{k // args.batch_size * 100 * total / 3600:.1f} h for 100 "
                               f"{name} epochs" for name, k in IMAGENET_TRAIN.items())
                  if args.recipe == "imagenet" else
                  f"{total * 800 * (CIFAR10_TRAIN // args.batch_size) / 3600:.1f} h for 800 "
                  "CIFAR-10 epochs")
    precision = ("fp32" if not args.amp else "fp16 autocast" if trainer.scaler.is_enabled()
                 else "bf16 autocast") + (", channels-last" if args.channels_last else "")
    if rank == 0:
        print(f"{device.type} ({precision}{', compiled' if args.compile else ''}), {world} "
              f"process{'es' if world > 1 else ''}, {args.method} {args.arch}, batch "
              f"{args.batch_size} x 2 views, {args.image_size}x{args.image_size}: augmentation "
              f"{1e3 * clock[0]:.1f} ms + forward/backward/update {1e3 * clock[1]:.1f} ms = "
              f"{1e3 * total:.1f} ms/step, {args.batch_size / total:.0f} images/s; at this batch "
              f"size it would take {projection} (data loading not included)")


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None,
           seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of n images (all of them when n is None or too large)."""
    if n is None or n >= len(x):
        return x, y
    index = seeded_split(len(x), n, seed)[0]
    return x[index], y[index]


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any] | None:
    """Data, model, training (or the saved weights with --eval-only), evaluation, saving."""
    rank, world = rank_and_world()
    out = Path(args.out)
    if args.resume and not args.eval_only and (out / "metrics.json").is_file():
        metrics = read_json(out / "metrics.json")
        print(f"{out} is finished:\n{report(metrics)}")
        return metrics
    if args.eval_only and not ((out / "model.pt").is_file() or (out / "checkpoint.pt").is_file()):
        raise DataError(f"{out} holds no model.pt or checkpoint.pt to evaluate")
    started = time.time()
    torch.manual_seed(args.seed)
    (x_tr, y_tr, x_te, y_te), info = load_images(args)
    if args.batch_size > info["n_train"]:
        fail(f"--batch-size {args.batch_size} exceeds the {info['n_train']} training images")
    if args.batch_size % world or args.batch_size // world < 2:
        fail(f"--batch-size {args.batch_size} (the global batch) must be divisible by the "
             f"{world} processes, at least 2 images each")
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))
    mean, std = torch.tensor(info["mean"], device=device), torch.tensor(info["std"], device=device)
    plan = schedule_plan(args, info["n_train"])
    batches = (disk_batches(info.pop("tree"), args, device) if args.workers
               else memory_batches(x_tr, y_tr, args))
    model = build_model(args, info["n_classes"], device)
    history: list = []
    if args.eval_only:  # the final weights, else the last checkpoint's (an unfinished run)
        saved = out / ("model.pt" if (out / "model.pt").is_file() else "checkpoint.pt")
        load_weights(model, read_torch_file(saved, device)["model"], saved)
        if (out / "checkpoint.pt").is_file():
            ckpt = read_torch_file(out / "checkpoint.pt", torch.device("cpu"))
            plan["steps"], history = ckpt["step"], ckpt["history"]
        print(f"evaluating {saved}")
    else:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_json({k: v for k, v in vars(args).items() if k not in NOT_SAVED},
                       out / "args.json")
        if world > 1:  # same initial weights (DDP broadcasts rank 0's), own augmentations, noise
            torch.manual_seed(args.seed * 1_000_003 + rank)
        trainer = Trainer(model, args, mean, std, device)
        start = 0
        if args.resume and (out / "checkpoint.pt").is_file():
            start, history = read_checkpoint(out, trainer, device)
            if rank == 0:
                print(f"resuming {out} at step {start}")
        train(trainer, batches, plan, out, start, history)
        if world > 1:  # rank 0 evaluates alone, on a copy with plain (unsynchronized) BatchNorm
            dist.destroy_process_group()
            if rank > 0:
                return None
            model = build_model(args, info["n_classes"], device)
            model.load_state_dict(trainer.model.state_dict())

    probe_data = (*subset(x_tr, y_tr, args.probe_train, args.seed),
                  *subset(x_te, y_te, args.probe_test, args.seed))
    metrics = evaluate(model, probe_data, args, mean, std, info["n_classes"], device)
    z_te, y_te_np = metrics.pop("embeddings")
    with atomic_path(out / "embeddings.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, z_test=z_te, y_test=y_te_np)
    if not args.eval_only:
        atomic_save({"model": model.state_dict(), "args": vars(args)}, out / "model.pt")
    metrics = {
        "method": args.method, "sigma": args.sigma, "head": args.head,
        "label": label(args.method, args.sigma, args.head), "dataset": args.dataset,
        "arch": args.arch, "dim": args.dim,
        "capacity": gaussian_capacity(args.dim, args.sigma),
        "class_information": math.log(info["n_classes"]), "steps": plan["steps"],
        "epochs": plan["steps"] / plan["per_epoch"], "batch_size": args.batch_size,
        "seed": args.seed, "final_loss": history[-1][1] if history else math.nan,
        "train_history": history, **metrics,
        "probe_images": {"train": len(probe_data[0]), "test": len(probe_data[2])},
        "settings": {k: v for k, v in vars(args).items() if k not in NOT_SAVED},
        "data": info, "device": str(device), "wall_time_s": time.time() - started}
    if info["n_classes"] <= 10:
        title = f"{label(args.method, args.sigma, args.head)}, {args.dataset} test"
        save_figure(scatter_embeddings(z_te, y_te_np, title), out / "scatter.png")
    write_json(metrics, out / "metrics.json")
    print(report(metrics) + f"\nsaved to {out}")
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """One run; under torchrun every process calls it, and rank 0 returns the metrics."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():  # torchrun: join the group (NCCL / gloo)
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    args = parse_args(argv)
    device = pick_device(args.device)
    if world > 1:
        if args.eval_only:
            fail("--eval-only runs in one process: use python, not torchrun")
        shared = [args.out]  # a default --out is time-stamped: take rank 0's
        dist.broadcast_object_list(shared, src=0)
        args.out = shared[0]
        dist.barrier()  # every process has checked --out before rank 0 writes into it
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    if args.bench:
        bench(args, device)
        return None
    try:
        return run(args, device)
    except DataError as err:  # from a DataLoader worker the message ends with the original one
        fail(str(err).strip().splitlines()[-1].split("DataError: ")[-1])


if __name__ == "__main__":
    main()

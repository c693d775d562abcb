"""Table 1: SimCLR and VICReg with noise injection on CIFAR-10/100 (Section 5, Appendix C).

A ResNet-18 (CIFAR stem) learns from two augmented views of each image; the projector output of
both views is normalized (common.GaussianHead: BatchNorm1d without affine, Theorem 3.4's
constraint) and, in training, Z ~ N(0, sigma^2 I) is added before the loss (Trainer.step). A
linear probe on the backbone features gives top-1 / top-5; Section 5's normality tests read the
normalized projector outputs.

    python cifar_ssl.py --method simclr --dataset cifar10 --sigma 0.3   # one Table 1 cell
    python cifar_ssl.py --method simclr --head none                     # the original method
    python cifar_ssl.py --out RUN_DIR --resume                          # continue a killed run
    python cifar_ssl.py --out RUN_DIR --eval-only                       # re-evaluate a saved run
    python cifar_ssl.py --bench 20                                      # ms/step on this device
    torchrun --nproc_per_node 8 cifar_ssl.py ...                        # one model, 8 processes

Images are augmented on the device in whole batches. Under torchrun --batch-size is the global
batch, losses and head see the gathered projections, and rank 0 alone evaluates and writes files.
Exit codes: 0 done, 2 bad flag or damaged file (one line on stderr), 3 diverged (no metrics).
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
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

import common

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)  # Appendix C
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # VICReg's recipe
CIFAR_FILES = {  # dataset -> (folder, train files, test files, label key, torchvision class)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", torchvision.datasets.CIFAR10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels",
                 torchvision.datasets.CIFAR100),
}
PROJECTOR = {"simclr": (1, 256), "vicreg": (2, 2048)}  # (hidden layers, output dim), Appendix C
CIFAR10_TRAIN = 50_000
IMAGENET_TRAIN = {"ImageNet-100": 126_689, "ImageNet-1k": 1_281_167}  # poster Table 2's sets
# the keys of every cifar_ssl.py args.json: a run directory without them is another script's
RUN_KEYS = ("method", "sigma", "dataset", "arch", "batch_size", "temperature", "vicreg_weights")
Batches = Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # see make_batches


# ---- Flags ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, bounded, positive, on_off = (p.add_argument, common.bounded, common.positive_int,
                                       argparse.BooleanOptionalAction)
    nonnegative, positive_float = common.nonnegative_float, common.positive_float
    add("--method", choices=sorted(PROJECTOR), default="simclr", help="NT-Xent or VICReg loss")
    add("--sigma", type=nonnegative, default=0.0, help="std of the noise Z after BatchNorm on the "
        "projector output (Table 1: 0, 0.1, 0.3, 0.5); 0: BatchNorm without noise")
    add("--head", choices=["bn", "none"], default="bn", help="bn: the noise head (BatchNorm1d + "
        "noise); none: no head, the original SimCLR / VICReg (needs --sigma 0)")
    add("--dataset", choices=["cifar10", "cifar100", "folder", "fashion-mnist", "mnist"],
        default="cifar10", help="folder: an ImageFolder tree in --data-dir with train/ and val/ "
        "(or test/); mnist / fashion-mnist: grey 28x28 zero-padded to 3x32x32")
    add("--data-dir", help="CIFAR: the folder holding cifar-10-batches-py/ or cifar-100-python/ "
        "(default data/); folder: the ImageFolder root; MNIST: the IDX files")
    add("--download", action=on_off, default=True, help="download missing CIFAR (torchvision)")
    add("--workers", type=bounded(int, 0, 256), default=0, help="folder only: DataLoader "
        "processes per training process decoding the training images from disk (ImageNet)")
    add("--image-size", type=bounded(int, 8, 4096), default=32, help="image side (Appendix C)")
    add("--arch", choices=["resnet18", "resnet50"], default="resnet18", help="Appendix C")
    add("--stem", choices=["auto", "cifar", "imagenet"], default="auto", help="cifar: 3x3 conv "
        "stride 1, no max-pool; imagenet: 7x7 stride 2 + max-pool; auto: cifar up to 64 px")
    add("--recipe", choices=["auto", "cifar", "imagenet"], default="auto", help="augmentations: "
        "cifar: Appendix C; imagenet: + blur and solarization, ImageNet mean/std (VICReg, "
        "BYOL); auto: imagenet above 64 px (Table 2: 224 px)")
    add("--jitter-p", type=bounded(float, 0, 1), default=0.8,
        help="probability of ColorJitter(0.4, 0.4, 0.2, 0.1); Appendix C gives none: SimCLR's")
    add("--hidden", type=positive, default=2048, help="projector hidden width (Appendix C)")
    add("--dim", type=bounded(int, 2, 65536), default=None,
        help="projector output dim (Appendix C: simclr 256, vicreg 2048)")
    add("--temperature", type=bounded(float, 1e-3, 100), default=0.2, help="NT-Xent (Appendix C)")
    add("--vicreg-weights", type=bounded(float, 0, 1e4), nargs=3, default=[25.0, 25.0, 1.0],
        metavar=("SIM", "VAR", "COV"), help="VICReg loss weights (Appendix C)")
    add("--batch-size", type=bounded(int, 2, 1 << 20), default=256, help="global (Appendix C)")
    add("--epochs", type=nonnegative, default=800.0, help="fractions allowed (Appendix C)")
    add("--steps", type=bounded(int, 0, 1 << 40), default=None,
        help="optimizer steps instead of --epochs; 0: the random-init encoder (baseline)")
    add("--lr", type=positive_float, default=0.3, help="LARS lr x batch/256 (Appendix C)")
    add("--momentum", type=nonnegative, default=0.9, help="LARS momentum (Appendix C)")
    add("--weight-decay", type=nonnegative, default=1e-4, help="not on biases, norms (Appendix C)")
    add("--trust", type=nonnegative, default=0.02, help="LARS trust coefficient (Appendix C)")
    add("--warmup-epochs", type=nonnegative, default=10.0, help="before cosine decay (solo-learn)")
    add("--online-lr", type=positive_float, default=0.1, help="online linear probe's lr, no LARS")
    add("--probe-steps", type=positive, default=500, help="L-BFGS iterations of the probe")
    add("--probe-wd", type=nonnegative, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1],
        help="L2 weights of the final linear probe; several: the best on a held-out fifth")
    add("--probe-train", type=bounded(int, 10, 1 << 40), default=None,
        help="seeded subset of training images for the final probe (default: all)")
    add("--probe-test", type=bounded(int, 8, 1 << 40), default=None,
        help="seeded subset of test images for every evaluation (default: all)")
    add("--subsample", type=bounded(int, 8, 1 << 20), default=128, help="subsample size of "
        "the bootstrapped normality tests; Henze-Zirkler needs dim < subsample")
    add("--normality-points", type=bounded(int, 8, 1 << 30), default=2000,
        help="test embeddings the normality tests draw from")
    add("--seed", type=common.seed_int, default=0, help="fixes init, data order and augmentation")
    add("--device", type=common.device_flag, default="auto", help="auto, cpu, cuda, cuda:N, mps")
    add("--amp", action=on_off, default=None, help="autocast: default auto, bf16 on CUDA (fp16 + "
        "GradScaler without bf16) and on CPUs with native bf16 (AMX, AVX-512 BF16), else float32")
    add("--channels-last", action=on_off, default=True, help="channels-last backbone")
    add("--compile", action="store_true", help="torch.compile the network (CUDA)")
    add("--out", help="run directory (default: a new one under runs/cifar_ssl/)")
    add("--resume", action="store_true", help="continue the run in --out (its args.json)")
    add("--eval-only", action="store_true", help="evaluate --out's model.pt (or checkpoint.pt)")
    add("--ckpt-every", type=nonnegative, default=10.0, help="epochs (0: only at the end)")
    add("--log-every", type=bounded(int, 0, 1 << 40), default=0, help="steps (0: ~100 per run)")
    add("--bench", type=positive, default=0, metavar="N", help="time N training steps on "
        "synthetic images, print ms/step and the time of a whole run, and exit")
    add("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    if args.steps is not None and args.epochs != p.get_default("epochs"):
        p.error("--steps and --epochs exclude each other")
    if args.resume or args.eval_only:
        common.check_resume(p, args, RUN_KEYS, model_files=("model.pt", "checkpoint.pt"))
    else:
        nohead = "_nohead" if args.head == "none" else ""
        common.resolve_out(p, args, f"runs/cifar_ssl/{args.method}_{args.dataset}_sigma"
                           f"{args.sigma:g}{nohead}_seed{args.seed}")
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
    """Images (N, 3, 32, 32) uint8 and labels of one CIFAR pickled batch; DataError if damaged."""
    try:
        with open(file, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, ImportError, UnicodeDecodeError, OverflowError, MemoryError) as err:
        raise common.DataError(f"{file} is not a CIFAR python pickle (truncated or damaged: "
                               f"{type(err).__name__}); download it again") from err
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise common.DataError(f"{file} lacks b'data' or {label_key!r}: not a CIFAR python batch")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data) \
            or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise common.DataError(f"{file}: b'data' {data.shape} and {label_key!r} {labels.shape} "
                               "are not N x 3072 pixels and N non-negative integer labels")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar(dataset: str, root: Path, download: bool) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) from root/<folder>/, downloaded there if missing."""
    folder, train_files, test_files, label_key, tv_class = CIFAR_FILES[dataset]
    names = train_files + test_files
    if not all((root / folder / name).is_file() for name in names) and download:
        try:
            tv_class(str(root), train=True, download=True)
        except Exception as err:  # network errors come in many types
            raise common.DataError(f"{dataset} is not in {root / folder} and could not be "
                                   f"downloaded ({str(err).splitlines()[0][:80]})") from err
    missing = [name for name in names if not (root / folder / name).is_file()]
    if missing:
        raise common.DataError(f"{root / folder} lacks {', '.join(missing)} (CIFAR's python "
                               f"pickles); point --data-dir at the folder that holds {folder}/ or "
                               "allow --download")
    splits = []
    for files in (train_files, test_files):
        parts = [read_cifar_batch(root / folder / name, label_key) for name in files]
        splits += [torch.from_numpy(np.concatenate([x for x, _ in parts])),
                   torch.from_numpy(np.concatenate([y for _, y in parts]))]
    return tuple(splits)


def read_image(path: str, size: int) -> torch.Tensor:
    """ImageFolder's loader: RGB, resized (bicubic) and centre-cropped to uint8 (3, size, size)."""
    from torchvision.transforms.v2 import functional as TF
    try:
        with open(path, "rb") as fh:
            image = Image.open(fh).convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for damaged files
        raise common.DataError(f"{path} is not a readable image ({err})") from err
    image = TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC)
    return TF.pil_to_tensor(TF.center_crop(image, [size, size]))


def open_trees(root: Path, size: int) -> tuple[Any, Any]:
    """The ImageFolder trees root/train and root/val (or root/test)."""
    test_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise common.DataError(f"{root} needs train/<class>/<image> and val/<class>/<image> (or "
                               "test/) folders; point --data-dir at such a tree")
    try:
        trees = [torchvision.datasets.ImageFolder(str(d), loader=partial(read_image, size=size))
                 for d in (root / "train", test_dir)]
    except (FileNotFoundError, OSError) as err:  # a class folder without images, unreadable
        raise common.DataError(f"{root}: {str(err).splitlines()[0]}") from err
    if trees[0].classes != trees[1].classes:
        raise common.DataError(f"{root}: train/ and {test_dir.name}/ hold different class folders")
    return trees[0], trees[1]


def subset(n: int, k: int | None, seed: int) -> slice | torch.Tensor:
    """Indices of a seeded random subset of k of n items; all (a slice) when k is None or >= n."""
    return slice(None) if k is None or k >= n else common.seeded_split(n, k, seed)[0]


def decode(tree: Any, k: int | None, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """A tree's images in memory: all, or with --workers (as many decoding processes) the
    probe's seeded subset of k, none on ranks > 0 unless the cifar recipe needs their mean."""
    index = torch.arange(len(tree))[subset(len(tree), k if args.workers else None, args.seed)]
    if args.workers and rank_and_world()[0] > 0 and args.recipe == "imagenet":
        index = index[:0]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(tree, index.tolist()),
                                         batch_size=256, num_workers=args.workers,
                                         generator=torch.Generator())  # global RNG untouched
    parts = list(loader) or [(torch.empty(0, 3, args.image_size, args.image_size,
                                          dtype=torch.uint8), torch.empty(0, dtype=torch.int64))]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def load_images(args: argparse.Namespace) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """(x_train, y_train, x_test, y_test) on the CPU, uint8 at --image-size, and the record of
    the data that metrics.json keeps; with --workers the training tree stays on disk
    (info["tree"]) and x_train holds the probe's images."""
    info: dict[str, Any] = {"dataset": args.dataset}
    if args.dataset == "folder":
        tree, test = open_trees(Path(args.data_dir), args.image_size)
        info.update(source=args.data_dir, n_classes=len(tree.classes), n_train=len(tree))
        if args.workers:
            info["tree"] = tree
        x_tr, y_tr = decode(tree, args.probe_train, args)
        x_te, y_te = decode(test, args.probe_test, args)
    elif args.dataset in CIFAR_FILES:
        root = Path(args.data_dir) if args.data_dir else common.REPO / "data"
        x_tr, y_tr, x_te, y_te = load_cifar(args.dataset, root, args.download)
        info.update(source=str(root), mean=CIFAR_MEAN, std=CIFAR_STD)
    else:
        x_tr, y_tr, x_te, y_te, record = common.load_data(args.dataset, args.data_dir,
                                                          args.download, crop=None)
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
    info.setdefault("n_train", len(x_tr))  # a folder counts its tree (x_tr: maybe the probe's)
    if "n_classes" not in info:
        info["n_classes"] = int(y_tr.max()) + 1
    info.update(n_test=len(x_te), image_size=args.image_size)
    return (x_tr, y_tr, x_te, y_te), info


# ---- Augmentation: Appendix C on whole batches, each sample with its own parameters --------------

# RandomResizedCrop(scale, ratio), RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=--jitter-p),
# RandomGrayscale(0.2), RandomHorizontalFlip(0.5): the PretrainTransform of Appendix C
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
GREY_P, FLIP_P = 0.2, 0.5
# the ImageNet recipe's extra steps per view (VICReg; BYOL, Table 6): Gaussian blur with sigma
# ~ U(0.1, 2) and a kernel of a tenth of the side, solarization of the pixels >= 0.5
BLUR_P, SOLARIZE_P, BLUR_SIGMA = (1.0, 0.1), (0.0, 0.2), (0.1, 2.0)


def jitter_ranges(strengths: dict[str, float]) -> dict[str, tuple[float, float]]:
    """ColorJitter's factor ranges: [max(0, 1 - s), 1 + s], hue [-s, s] (torchvision)."""
    return {name: (-s, s) if name == "hue" else (max(0.0, 1 - s), 1 + s)
            for name, s in strengths.items()}


def sample_crops(n: int, height: int, width: int, device: torch.device,
                 scale: tuple[float, float] = CROP_SCALE,
                 ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """(n, 4) boxes (top, left, h, w) as RandomResizedCrop.get_params draws them: the first of
    ten tries (area ~ U(scale) H W, log aspect ~ U(log ratio)) that fits, else the central crop."""
    uniform = torch.rand(n, 10, 2, device=device)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * uniform[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * uniform[..., 1])
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first, found = fits.int().argmax(dim=1, keepdim=True), fits.any(dim=1)
    fallback_w = round(height * max(ratio)) if width / height > max(ratio) else width
    fallback_h = round(width / min(ratio)) if width / height < min(ratio) else height
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)
    position = torch.rand(n, 2, device=device)
    top = torch.where(found, torch.floor(position[:, 0] * (height - h + 1)),
                      (height - fallback_h) // 2)
    left = torch.where(found, torch.floor(position[:, 1] * (width - w + 1)),
                       (width - fallback_w) // 2)
    return torch.stack([top, left, h, w], dim=1).long()


def sample_augment_params(n: int, height: int, width: int, device: torch.device,
                          jitter_p: float = 0.8) -> dict[str, torch.Tensor]:
    """Per-sample parameters of Appendix C's pipeline: crop boxes, jitter flags, factors (n, 4)
    of brightness, contrast, saturation, hue, the order of the four per sample, grey and flip."""
    ranges = torch.tensor(list(jitter_ranges(JITTER).values()), device=device)
    uniform = torch.rand  # the draws in this order: crop, jitter, factors, order, grey, flip
    return {"crop": sample_crops(n, height, width, device),
            "jitter": uniform(n, device=device) < jitter_p,
            "factors": ranges[:, 0] + (ranges[:, 1] - ranges[:, 0]) * uniform(n, 4, device=device),
            "order": uniform(n, 4, device=device).argsort(dim=1),
            "grey": uniform(n, device=device) < GREY_P,
            "flip": uniform(n, device=device) < FLIP_P}


def sample_imagenet_params(n: int, view: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-sample blur flag and sigma, and solarization flag, of view 0 or 1."""
    return {"blur": torch.rand(n, device=device) < BLUR_P[view],
            "blur_sigma": BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0])
            * torch.rand(n, device=device),
            "solarize": torch.rand(n, device=device) < SOLARIZE_P[view]}


def bicubic_weights(start: torch.Tensor, length: torch.Tensor, in_size: int,
                    out_size: int) -> torch.Tensor:
    """(n, out_size, in_size) matrices resampling the window [start, start + length): PIL's
    antialiased bicubic (a = -0.5, stretched when shrinking), cut to the window, renormalized."""
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
    """Crop to the boxes (top, left, h, w), resize to size x size and mirror the flagged images:
    W_rows @ x @ W_cols^T. Done first: every later operation commutes with it."""
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


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """torchvision's gaussian_blur (reflect padding, odd separable kernel), a sigma per image:
    one grouped convolution per axis, every (image, channel) its own group."""
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
    """Appendix C's pipeline on a uint8 batch, float32 (N, 3, size, size) out: crop + resize
    (+ flip), colour jitter in each sample's own order, greyscale, with the ImageNet recipe's
    params blur and solarization, normalization. Every operation runs on the whole batch and is
    kept where a sample has it: no data-dependent shapes, no host-device synchronization."""
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


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              channels_last: bool) -> torch.Tensor:
    """The TestTransform of Appendix C: uint8 -> [0, 1] -> (x - mean) / std."""
    x = (x.float() / 255 - mean[:, None, None]) / std[:, None, None]
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ---- Model: ResNet backbone, projector, noise head, online probe ---------------------------------

def resnet_backbone(arch: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    """A ResNet without classifier, its feature dim; CIFAR stem: He et al. 2016, Sec. 4.2."""
    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    features, net.fc = net.fc.in_features, nn.Identity()
    return net, features


def make_projector(method: str, in_dim: int, hidden: int, dim: int) -> nn.Sequential:
    """SimCLR: Linear-ReLU-Linear; VICReg: two Linear-BN-ReLU blocks, then Linear (Appendix C)."""
    layers: list[nn.Module] = []
    for i in range(PROJECTOR[method][0]):
        norm = [nn.BatchNorm1d(hidden)] if method == "vicreg" else []
        layers += [nn.Linear(hidden if i else in_dim, hidden), *norm, nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(hidden, dim))


class SSLNet(nn.Module):
    """backbone -> features h (read by the probe); projector -> head -> the normalized z that
    Trainer.step adds the noise to. head "bn": common.GaussianHead; "none": the standard
    method's network exactly."""

    def __init__(self, method: str, arch: str, cifar_stem: bool, hidden: int, dim: int,
                 n_classes: int, head: str = "bn"):
        super().__init__()
        self.backbone, features = resnet_backbone(arch, cifar_stem)
        self.projector = make_projector(method, features, hidden, dim)
        self.head = common.GaussianHead(dim) if head == "bn" else None
        self.probe = nn.Linear(features, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        p = self.projector(h)
        return h, p if self.head is None else self.head(p.float())  # the head in float32


def build_model(args: argparse.Namespace, n_classes: int, device: torch.device) -> SSLNet:
    cifar_stem = args.stem == "cifar" or (args.stem == "auto" and args.image_size <= 64)
    model = SSLNet(args.method, args.arch, cifar_stem, args.hidden, args.dim, n_classes,
                   args.head).to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


# ---- Losses over the global batch (several processes under torchrun) -----------------------------

def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GatherWithGrad(torch.autograd.Function):
    """Differentiable all-gather along dim 0. The backward, a reduce-scatter, gives each process
    N dL/dx for its rows (every process computes the same L); DDP's mean over N gives dL/dtheta."""

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


def ssl_loss(args: argparse.Namespace) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """NT-Xent (Chen et al. 2020, eq. 1) or VICReg (common.py) on the two views' head outputs of
    the global batch: its rows are every process's negatives, variance and covariance."""
    if args.method == "simclr":
        return lambda z1, z2: common.nt_xent(gather(z1.float()), gather(z2.float()),
                                             args.temperature)
    sim, var, cov = args.vicreg_weights
    return lambda z1, z2: common.vicreg_loss(gather(z1.float()), gather(z2.float()), sim, var, cov)


# ---- LARS with warm-up and cosine decay ----------------------------------------------------------

class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise rate (You et al. 2017, eq. 6), clipped as in LARC:
    d = (g + wd w) min(trust ||w|| / (||g|| + wd ||w|| + eps) / lr, 1), or d = g when ||w|| or
    ||g|| is 0 and in groups without `adapt`; v <- momentum v + d (v = d at first), w <- w - lr v.
    solo-learn's LARS, the paper's: a zero gradient adds no decay, only the old momentum."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust: float = 0.02, eps: float = 1e-8, clip: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust=trust, eps=eps, clip=clip, adapt=True))

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]  # no closure: one gradient per step
        for group in self.param_groups:
            for w in (w for w in group["params"] if w.grad is not None):
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
    """LARS (Appendix C), biases and norms without decay or adaptation; the probe: plain SGD."""
    scaled = args.lr * args.batch_size / 256
    ssl = [p for name, p in model.named_parameters() if not name.startswith("probe.")]
    plain = {"weight_decay": 0.0, "adapt": False}
    groups = [{"params": [p for p in ssl if p.ndim > 1], "base_lr": scaled},
              {"params": [p for p in ssl if p.ndim <= 1], "base_lr": scaled, **plain},
              {"params": list(model.probe.parameters()), "base_lr": args.online_lr, **plain}]
    return LARS(groups, lr=scaled, momentum=args.momentum, weight_decay=args.weight_decay,
                trust=args.trust)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (SimCLR)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---- Training: DDP, AMP and channels-last, checkpoints, batches, the loop ------------------------

class Trainer:
    """The network (DDP under torchrun), LARS, AMP, one training step and the checkpoints."""

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
        self.scaler = common.grad_scaler(device, args.amp)  # float16 only

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independently augmented views of a uint8 batch."""
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
        with common.autocast(self.device, self.args.amp):
            h1, z1 = self.net(v1)
            h2, z2 = self.net(v2)
            if self.args.sigma > 0:  # z + Z, Z ~ N(0, sigma^2 I), on both views (Theorem 3.4)
                z1 = z1 + self.args.sigma * torch.randn_like(z1)
                z2 = z2 + self.args.sigma * torch.randn_like(z2)
            loss = self.loss_fn(z1, z2)
            labels = torch.cat([y, y])
            logits = self.model.probe(torch.cat([h1, h2]).detach())
            probe_loss = F.cross_entropy(logits.float(), labels)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss + probe_loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss.detach(), (logits.argmax(1) == labels).float().mean()

    def save(self, out: Path, step: int, history: list) -> None:
        """checkpoint.pt (by rank 0): everything --resume needs, each process's RNG states."""
        rank, world = rank_and_world()
        rng = (torch.get_rng_state(),
               torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
        state = {"step": step, "models": self.model.state_dict(),
                 "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng": rng[0], "cuda_rng": rng[1], "history": history}
        if world > 1:
            state["process_rng"] = [None] * world
            dist.all_gather_object(state["process_rng"], rng)
        if rank == 0:
            common.atomic_save(state, out / "checkpoint.pt")

    def load(self, out: Path) -> tuple[int, list]:
        """Rank 0's checkpoint.pt, with this process's own RNG states; (step, history)."""
        rank, world = rank_and_world()
        ckpt = common.load_run_file(out / "checkpoint.pt", self.device, (
            "step", "models", "optimizer", "scaler", "rng", "cuda_rng", "history"))
        if world > 1 and len(ckpt.get("process_rng", [])) != world:
            raise common.DataError(f"{out / 'checkpoint.pt'} was not written by {world} processes; "
                                   "resume it with as many processes as it was started with")
        common.load_models(self.model, ckpt["models"], out / "checkpoint.pt")
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        cpu_rng, cuda_rng = ckpt["process_rng"][rank] if world > 1 else (ckpt["rng"],
                                                                            ckpt["cuda_rng"])
        torch.set_rng_state(cpu_rng.cpu())
        if cuda_rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([state.cpu() for state in cuda_rng])
        return ckpt["step"], ckpt["history"]


def make_batches(x: torch.Tensor, y: torch.Tensor, tree: Any, args: argparse.Namespace,
                 device: torch.device) -> Batches:
    """(epoch, first step) -> this process's (uint8 images, labels) of each later step: the
    permutation of (seed, epoch) cut into global batches (the last partial one dropped), each
    cut into one slice per process (a resumable DistributedSampler). The images are indexed in
    memory or, given a tree, decoded by --workers DataLoader processes (own generator)."""
    rank, world = rank_and_world()
    n, size = len(x) if tree is None else len(tree), args.batch_size

    def batches(epoch: int, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = common.epoch_order(n, args.seed, epoch, torch.device("cpu"))
        slices = [order[k * size:(k + 1) * size].chunk(world)[rank]
                  for k in range(first, n // size)]
        if tree is None:
            for index in slices:
                yield x[index.to(x.device)], y[index.to(x.device)]
            return
        loader = torch.utils.data.DataLoader(
            tree, batch_sampler=[index.tolist() for index in slices], num_workers=args.workers,
            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(epoch))
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    return batches


def schedule_plan(args: argparse.Namespace, n_train: int) -> dict[str, int]:
    """Steps per epoch (last partial batch dropped), total, warm-up, log and checkpoint steps."""
    per_epoch = n_train // args.batch_size
    steps = args.steps if args.steps is not None else round(args.epochs * per_epoch)
    return {"per_epoch": per_epoch, "steps": steps,
            "warmup": round(args.warmup_epochs * per_epoch),
            "log_every": args.log_every or max(1, steps // 100),
            "ckpt_every": max(1, round(args.ckpt_every * per_epoch) if args.ckpt_every
                              else steps)}


def train(trainer: Trainer, batches: Batches, plan: dict[str, int], out: Path, start: int,
          history: list) -> None:
    """Steps `start` .. plan["steps"]; logs [step, loss, online-probe accuracy, lr] to history."""
    args, per_epoch = trainer.args, plan["per_epoch"]
    rank, world = rank_and_world()
    bar = tqdm(range(start, plan["steps"]), initial=start, total=plan["steps"],
               disable=args.quiet or rank > 0, desc=f"{args.method} sigma={args.sigma:g}",
               dynamic_ncols=True, mininterval=common.progress_interval())
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
        checkpoint = done % plan["ckpt_every"] == 0 or done == plan["steps"]
        if done % plan["log_every"] == 0 or checkpoint:
            mean_loss, mean_acc = torch.stack(losses).mean().item(), torch.stack(accuracies).mean()
            if world > 1:  # the loss is the global batch's already; the probe's is per process
                dist.all_reduce(mean_acc)
                mean_acc /= world
            mean_acc, losses, accuracies = mean_acc.item(), [], []
            if not math.isfinite(mean_loss):
                kept = (f"the last good checkpoint is kept in {out / 'checkpoint.pt'}"
                        if (out / "checkpoint.pt").is_file() else "no checkpoint was written yet")
                common.fail(f"the loss became {mean_loss} by step {done}; {kept}; no metrics "
                            "written. Try a smaller --lr", code=3)
            history.append([done, mean_loss, mean_acc, args.lr * args.batch_size / 256 * scale])
            bar.set_postfix(epoch=epoch, loss=f"{mean_loss:.3f}", online=f"{mean_acc:.3f}",
                            refresh=False)
        if checkpoint:
            trainer.save(out, done, history)


# ---- Evaluation: linear probe on frozen features, normality of the normalized projector outputs --

@torch.no_grad()
def embed(model: SSLNet, x: torch.Tensor, args: argparse.Namespace, mean: torch.Tensor,
          std: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode backbone features h and projector outputs (before the noise head), float32."""
    model.eval()
    features, projections = [], []
    for i in range(0, len(x), 512):
        batch = normalize(x[i:i + 512], mean, std, args.channels_last)
        with common.autocast(device, args.amp):
            h = model.backbone(batch)
            p = model.projector(h)
        features.append(h.float())
        projections.append(p.float())
    return torch.cat(features), torch.cat(projections)


def fit_logistic(a: torch.Tensor, y: torch.Tensor, n_classes: int, steps: int,
                 weight_decay: float) -> nn.Linear:
    """Cross-entropy + weight_decay / 2 ||W||^2 by full-batch L-BFGS from zero weights."""
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
    """Logistic regression on features standardized with the training statistics; of several
    weight decays the best top-1 on a seeded held-out fifth of the training features (fitted on
    the rest) is refitted on all. Train top-1, test top-1 / top-5 (Table 1) and the decay."""
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


def evaluate(model: SSLNet, data: tuple[torch.Tensor, ...], args: argparse.Namespace,
             mean: torch.Tensor, std: torch.Tensor, n_classes: int,
             device: torch.device) -> dict[str, Any]:
    """Linear probe, online probe and the normality of the test images' projector outputs
    standardized over the probe-training images (the head's BatchNorm; the same for --head
    none), returned as "embeddings". Every BatchNorm's statistics are first recomputed on the
    clean probe-training images: training's mix augmented views, --steps 0 has none."""
    x_tr, y_tr, x_te, y_te = data

    def forward(x: torch.Tensor) -> None:
        batch = normalize(x, mean, std, args.channels_last)
        with common.autocast(device, args.amp):
            model(batch)

    # a last batch of one image would break BatchNorm1d in training mode
    common.recompute_bn_stats(model, forward, x_tr, 512 if len(x_tr) % 512 != 1 else 511)
    f_tr, p_tr = embed(model, x_tr, args, mean, std, device)
    f_te, p_te = embed(model, x_te, args, mean, std, device)
    if not all(torch.isfinite(t).all() for t in (f_tr, p_tr, f_te, p_te)):
        common.fail("the embeddings are not finite (the training diverged); no metrics written. "
                    "Try a smaller --lr", code=3)
    probe = linear_probe(f_tr, y_tr, f_te, y_te, n_classes, args.probe_steps, args.probe_wd)
    online = (model.probe(f_te).argmax(1) == y_te).float().mean().item()
    z_te = ((p_te - p_tr.mean(0)) / p_tr.std(0).clamp(min=1e-6)).cpu().numpy()
    return {"probe": probe, "online_probe": {"test_top1": online},
            "normality": common.normality_report(z_te, seed=args.seed, subsample=args.subsample,
                                                 points=args.normality_points),
            "embeddings": (z_te, y_te.cpu().numpy())}


def label(method: str, sigma: float, head: str) -> str:
    """A run's row name: the original method (no head), or the head with its noise level."""
    return f"{method} without noise head (original)" if head == "none" else \
        f"{method} BatchNorm head, sigma = {sigma:g}"


def report(m: dict[str, Any]) -> str:
    """The run's metrics.json as the few lines printed at its end."""
    n, probe = m["normality"], m["probe"]
    hz = "n/a (dim >= subsample)" if n["henze_zirkler_p"] is None else f"{n['henze_zirkler_p']:.3f}"
    return (f"{label(m['method'], m['sigma'], m['head'])} on {m['data']['dataset']}, {m['steps']} "
            f"steps ({m['epochs']:.2f} epochs), final loss {m['final_loss']:.4f}\n"
            f"linear probe: top-1 {100 * probe['top1']:.2f} %   top-5 {100 * probe['top5']:.2f} %"
            f"   (weight decay {probe['weight_decay']:g}; online probe top-1 "
            f"{100 * m['online_probe']['test_top1']:.2f} %)\n"
            f"normality p of the normalized projector outputs (d = {m['dim']}, subsample "
            f"{n['subsample']}): D'Agostino {n['dagostino_p']:.3f}   Shapiro-Wilk "
            f"{n['shapiro_p']:.3f}   Henze-Zirkler {hz}\n"
            f"wall time {m['wall_time_s']:.0f} s on {m['device']}")


# ---- --bench, the run and its files, main() ------------------------------------------------------

def bench(args: argparse.Namespace, device: torch.device) -> None:
    """Time a step on synthetic images; project a CIFAR-10 run or ImageNet runs (poster Table 2)."""
    torch.manual_seed(args.seed)
    rank, world = rank_and_world()
    trainer = Trainer(build_model(args, 10, device), args, torch.tensor(CIFAR_MEAN, device=device),
                      torch.tensor(CIFAR_STD, device=device), device)
    n = args.batch_size // world  # each process times its slice of the global batch
    x = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8,
                      device=device)
    y = torch.randint(0, 10, (n,), device=device)
    views = trainer.views(x)
    dtype, why = common.precision(device, args.amp)
    trainer.args = argparse.Namespace(**{**vars(args), "amp": dtype == torch.float32})
    other = common.time_per_step(lambda: trainer.step(*views, y, 1.0), args.bench, device)
    trainer.args = args
    clock = [common.time_per_step(lambda: trainer.views(x), args.bench, device),
             common.time_per_step(lambda: trainer.step(*views, y, 1.0), args.bench, device)]
    total = sum(clock)
    projection = (" and ".join(f"{k // args.batch_size * 100 * total / 3600:.1f} h for 100 "
                               f"{name} epochs" for name, k in IMAGENET_TRAIN.items())
                  if args.recipe == "imagenet" else
                  f"{total * 800 * (CIFAR10_TRAIN // args.batch_size) / 3600:.1f} h for 800 "
                  "CIFAR-10 epochs")
    precision = common.precision_name(dtype) + (", channels-last" if args.channels_last else "")
    if rank == 0:
        print(f"{device.type} ({precision}{', compiled' if args.compile else ''}), {world} "
              f"process{'es' if world > 1 else ''}, {args.method} {args.arch}, batch "
              f"{args.batch_size} x 2 views, {args.image_size}x{args.image_size}: augmentation "
              f"{1e3 * clock[0]:.1f} ms + forward/backward/update {1e3 * clock[1]:.1f} ms = "
              f"{1e3 * total:.1f} ms/step, {args.batch_size / total:.0f} images/s; at this batch "
              f"size it would take {projection} (data loading not included)\n"
              f"  {common.precision_name(common.precision(device, dtype == torch.float32)[0])}: "
              f"forward/backward/update {1e3 * other:.1f} ms; the default (auto) picks "
              f"{common.precision_name(common.precision(device)[0])}; this run: {why}")


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any] | None:
    """Data, model, training (or the saved weights with --eval-only), evaluation, saving."""
    rank, world = rank_and_world()
    out = Path(args.out)
    if args.resume and not args.eval_only and (out / "metrics.json").is_file():
        metrics = common.read_json(out / "metrics.json")
        print(f"{out} is finished:\n{report(metrics)}")
        return metrics
    started = time.time()
    dtype, why = common.precision(device, args.amp)
    if rank == 0:
        print(f"{common.precision_name(dtype)}: {why}")
    torch.manual_seed(args.seed)
    (x_tr, y_tr, x_te, y_te), info = load_images(args)
    if args.batch_size > info["n_train"]:
        common.fail(f"--batch-size {args.batch_size} exceeds the {info['n_train']} training images")
    if args.batch_size % world or args.batch_size // world < 2:
        common.fail(f"--batch-size {args.batch_size} (the global batch) must be divisible by the "
                    f"{world} processes, at least 2 images each")
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))
    mean, std = torch.tensor(info["mean"], device=device), torch.tensor(info["std"], device=device)
    plan = schedule_plan(args, info["n_train"])
    batches = make_batches(x_tr, y_tr, info.pop("tree", None), args, device)
    model = build_model(args, info["n_classes"], device)
    history: list = []
    if args.eval_only:  # the final weights, else the last checkpoint's (an unfinished run)
        saved = out / ("model.pt" if (out / "model.pt").is_file() else "checkpoint.pt")
        common.load_models(model, common.load_run_file(saved, device)["models"], saved)
        if (out / "checkpoint.pt").is_file():
            ckpt = common.load_run_file(out / "checkpoint.pt", torch.device("cpu"))
            plan["steps"], history = ckpt["step"], ckpt["history"]
        print(f"evaluating {saved}")
    else:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            common.write_json({k: v for k, v in vars(args).items()
                               if k not in common.RUNTIME_FLAGS}, out / "args.json")
        if world > 1:  # same initial weights (DDP broadcasts rank 0's), own augmentations, noise
            torch.manual_seed(args.seed * 1_000_003 + rank)
        trainer = Trainer(model, args, mean, std, device)
        start = 0
        if args.resume and (out / "checkpoint.pt").is_file():
            start, history = trainer.load(out)
            if rank == 0:
                print(f"resuming {out} at step {start}")
        train(trainer, batches, plan, out, start, history)
        if world > 1:  # rank 0 evaluates alone, on a copy with plain (unsynchronized) BatchNorm
            dist.destroy_process_group()
            if rank > 0:
                return None
            model = build_model(args, info["n_classes"], device)
            model.load_state_dict(trainer.model.state_dict())

    train_index = subset(len(x_tr), args.probe_train, args.seed)
    test_index = subset(len(x_te), args.probe_test, args.seed)
    probe_data = (x_tr[train_index], y_tr[train_index], x_te[test_index], y_te[test_index])
    metrics = evaluate(model, probe_data, args, mean, std, info["n_classes"], device)
    z_te, y_te_np = metrics.pop("embeddings")
    metrics = {
        "method": args.method, "sigma": args.sigma, "head": args.head,
        "label": label(args.method, args.sigma, args.head), "dataset": args.dataset,
        "arch": args.arch, "dim": args.dim,
        "capacity": common.gaussian_capacity(args.dim, args.sigma),
        "class_information": math.log(info["n_classes"]), "steps": plan["steps"],
        "epochs": plan["steps"] / plan["per_epoch"], "batch_size": args.batch_size,
        "seed": args.seed, "final_loss": history[-1][1] if history else math.nan,
        "train_history": history, **metrics,
        "probe_images": {"train": len(probe_data[0]), "test": len(probe_data[2])},
        "settings": {k: v for k, v in vars(args).items() if k not in common.RUNTIME_FLAGS},
        "data": info, "device": str(device), "wall_time_s": time.time() - started,
        "precision": {"dtype": common.precision_name(dtype), "why": why}}
    if args.eval_only:  # the run's own files stay as they are
        common.write_json(metrics, out / "metrics_recomputed.json")
        print(report(metrics) + f"\nsaved to {out / 'metrics_recomputed.json'}")
        return metrics
    with common.atomic_path(out / "embeddings.npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, z_test=z_te, y_test=y_te_np)
    common.atomic_save({"models": model.state_dict(), "args": vars(args)}, out / "model.pt")
    if info["n_classes"] <= 10:
        title = f"{label(args.method, args.sigma, args.head)}, {args.dataset} test"
        common.save_figure(common.scatter_embeddings(z_te, y_te_np, title), out / "scatter.png")
    common.write_json(metrics, out / "metrics.json")
    print(report(metrics) + f"\nsaved to {out}")
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """One run; under torchrun every process calls it, and rank 0 returns the metrics."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():  # torchrun: join the group (NCCL / gloo)
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    args = parse_args(argv)
    device = common.pick_device(args.device)
    if world > 1:
        if args.eval_only:
            common.fail("--eval-only runs in one process: use python, not torchrun")
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
    except common.DataError as err:  # from a DataLoader worker it ends with the original line
        common.fail(str(err).strip().splitlines()[-1].split("DataError: ")[-1])


if __name__ == "__main__":
    main()

"""Table 1: SimCLR and VICReg with noise injection on CIFAR-10/100 (Section 5, Appendix C).

A ResNet-18 (CIFAR stem) learns from two augmented views of each image; the projector output of
both views is normalized (BatchNorm1d without affine, Theorem 3.4's constraint) and, in training,
Z ~ N(0, sigma^2 I) is added before the loss (Trainer.step). A linear probe on the backbone
features gives top-1 / top-5; Section 5's normality tests read the normalized projector outputs.

    python cifar_ssl.py --method simclr --dataset cifar10 --sigma 0.3   # one Table 1 cell
    python cifar_ssl.py --method simclr --head none                     # the original method
    python cifar_ssl.py --out RUN_DIR --resume                          # continue a killed run
    torchrun --nproc_per_node 8 cifar_ssl.py ...                        # one model, 8 processes

Under torchrun --batch-size is the global batch, losses and head see every process's rows, and
rank 0 alone evaluates and writes files. Exit codes: 0 done, 2 bad flag or file, 3 diverged.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import time
import timeit
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
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import common

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)  # Appendix C
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # VICReg's recipe
CIFAR_FILES = {  # dataset -> (folder, train files, test files, label key), as torchvision's
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels")}
PROJECTOR = {"simclr": (1, 256), "vicreg": (2, 2048)}  # (hidden layers, output dim), Appendix C
# the keys of every cifar_ssl.py args.json: a run directory without them is another script's
RUN_KEYS = ("method", "sigma", "dataset", "arch", "batch_size", "temperature", "vicreg_weights")
RUNTIME = ("out", "resume", "eval_only", "device", "quiet", "bench", "compile")  # not in args.json
MANY = 10 ** 8  # the upper bound of step counts, intervals and image counts


# ---- Flags, precision ----------------------------------------------------------------------------
def number(kind: type, low: float, high: float, strict: bool = False) -> Callable[[str], Any]:
    """argparse type: a `kind` in [low, high], or in (low, high) if `strict` (NaN never is)."""
    def parse(text: str) -> Any:
        value = kind(text)  # a ValueError: argparse's "invalid int value" naming the flag
        if not (low < value < high if strict else low <= value <= high):
            raise argparse.ArgumentTypeError(f"must lie in {'(' if strict else '['}{low}, "
                                             f"{high}{')' if strict else ']'}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def precision(device: torch.device, amp: bool | None) -> tuple[torch.dtype, str]:
    """(autocast dtype, why), chosen once per run: --amp / --no-amp force it; auto (None) takes
    bfloat16 on CUDA (float16 with a gradient scaler on a GPU without it) and on a CPU that runs
    bfloat16 natively, float32 elsewhere (emulated bfloat16 is slower than float32)."""
    half = (torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported()
            else torch.bfloat16)
    if amp is not None:
        return (half, "--amp") if amp else (torch.float32, "--no-amp")
    if device.type == "cuda":
        return half, "CUDA" if half == torch.bfloat16 else "a GPU without bfloat16: float16"
    if device.type != "cpu":
        return torch.float32, f"autocast on {device.type} only with --amp"
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.float32, "this CPU has no native bfloat16 (no AVX-512 BF16, no AMX)"
    kernels = torch.backends.cpu.get_cpu_capability()  # lowered by ATEN_CPU_CAPABILITY
    if kernels not in ("AVX512", "AVX512_BF16", "AMX"):
        return torch.float32, f"this CPU has native bfloat16, but torch runs {kernels} kernels"
    return half, "this CPU has native bfloat16 (AVX-512 BF16 or AMX)"


def name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16 autocast' or 'float16 autocast', as metrics.json records it."""
    return "float32" if dtype == torch.float32 else f"{str(dtype)[6:]} autocast"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, on_off = p.add_argument, argparse.BooleanOptionalAction
    add("--method", choices=sorted(PROJECTOR), default="simclr", help="NT-Xent or VICReg loss")
    add("--sigma", type=number(float, 0, 10), default=0.0, help="std of the noise Z after the "
        "projector's BatchNorm (Table 1: 0, 0.1, 0.3, 0.5); 0: BatchNorm without noise")
    add("--head", choices=["bn", "none"], default="bn", help="bn: BatchNorm1d + noise; none: no "
        "head, the original SimCLR / VICReg (needs --sigma 0)")
    add("--dataset", choices=["cifar10", "cifar100", "folder", "fashion-mnist", "mnist"],
        default="cifar10", help="folder: an ImageFolder tree in --data-dir with train/ and val/ "
        "(or test/); mnist / fashion-mnist: grey 28x28 zero-padded to 3x32x32")
    add("--data-dir", help="CIFAR: the folder holding cifar-10-batches-py/ or cifar-100-python/ "
        "(default data/); folder: the tree; MNIST: the IDX files (default: common.load_data's)")
    add("--download", action=on_off, default=True, help="download missing CIFAR (torchvision)")
    add("--workers", type=number(int, 0, 256), default=0, help="folder only: DataLoader "
        "processes per training process decoding the training images from disk (ImageNet)")
    add("--image-size", type=number(int, 8, 1024), default=32, help="image side (Appendix C)")
    add("--arch", choices=["resnet18", "resnet50"], default="resnet18", help="Appendix C")
    add("--stem", choices=["auto", "cifar", "imagenet"], default="auto", help="cifar: 3x3 conv "
        "stride 1, no max-pool; imagenet: 7x7 stride 2 + max-pool; auto: cifar up to 64 px")
    add("--recipe", choices=["auto", "cifar", "imagenet"], default="auto", help="augmentations: "
        "cifar: Appendix C; imagenet: + blur and solarization, ImageNet mean/std (VICReg, "
        "BYOL); auto: imagenet above 64 px (Table 2: 224 px)")
    add("--jitter-p", type=number(float, 0, 1), default=0.8, help="p of ColorJitter (SimCLR's)")
    add("--hidden", type=number(int, 1, 16384), default=2048, help="projector width (App. C)")
    add("--dim", type=number(int, 2, 16384), help="output width (App. C: simclr 256, vicreg 2048)")
    add("--temperature", type=number(float, 1e-3, 100), default=0.2, help="NT-Xent (App. C)")
    add("--vicreg-weights", type=number(float, 0, 1e4), nargs=3, default=[25.0, 25.0, 1.0],
        metavar=("SIM", "VAR", "COV"), help="VICReg loss weights (Appendix C)")
    add("--batch-size", type=number(int, 2, 65536), default=256, help="global (Appendix C)")
    add("--epochs", type=number(float, 0, 1e5), default=800.0, help="fractions allowed (App. C)")
    add("--steps", type=number(int, 0, MANY), help="replaces --epochs; 0: the random-init encoder")
    add("--lr", type=number(float, 0, 10, True), default=0.3, help="LARS lr x batch/256 (App. C)")
    add("--momentum", type=number(float, 0, 1), default=0.9, help="LARS momentum (Appendix C)")
    add("--weight-decay", type=number(float, 0, 1), default=1e-4, help="LARS, not on biases and "
        "norms (Appendix C)")
    add("--trust", type=number(float, 0, 1), default=0.02, help="LARS trust coefficient (App. C)")
    add("--warmup-epochs", type=number(float, 0, 1e5), default=10.0, help="linear warm-up before "
        "the cosine decay (solo-learn)")
    add("--online-lr", type=number(float, 0, 10, True), default=0.1, help="online probe's lr")
    add("--probe-steps", type=number(int, 1, 10 ** 5), default=500, help="L-BFGS iterations")
    add("--probe-wd", type=number(float, 0, 100), nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1],
        help="L2 weights of the final linear probe; several: the best on a held-out fifth")
    add("--probe-train", type=number(int, 10, MANY), metavar="N", help="fit the final probe on a "
        "seeded subset of N training images (default: all)")
    add("--probe-test", type=number(int, 8, MANY), metavar="N", help="evaluate on a seeded "
        "subset of N test images (default: all)")
    add("--subsample", type=number(int, 8, 10 ** 6), default=128, help="subsample size of the "
        "bootstrapped normality tests (Henze-Zirkler needs dim below it)")
    add("--normality-points", type=number(int, 8, MANY), default=2000, help="test embeddings the "
        "normality tests draw from")
    add("--seed", type=number(int, 0, 2 ** 32 - 2), default=0, help="fixes init, data order, "
        "augmentations and noise")
    add("--device", default="auto", help="auto: CUDA when present, else the CPU", choices=["auto",
        "cpu", *["cuda"] * torch.cuda.is_available(), *["mps"] * torch.backends.mps.is_available()])
    add("--amp", action=on_off, help="autocast; auto: bf16 on CUDA (or fp16) and native-bf16 CPUs")
    add("--channels-last", action=on_off, default=True, help="channels-last backbone")
    add("--compile", action="store_true", help="torch.compile the network (CUDA)")
    add("--out", help="run directory (new or empty; default: a new one under runs/cifar_ssl/)")
    add("--resume", action="store_true", help="continue the run in --out (or start it)")
    add("--eval-only", action="store_true", help="evaluate --out's model.pt (or checkpoint.pt)")
    add("--ckpt-every", type=number(float, 0, 1e5), default=10.0, help="epochs (0: at the end)")
    add("--log-every", type=number(int, 0, MANY), default=0, help="steps (0: ~100 per run)")
    add("--bench", type=number(int, 0, 10 ** 4), default=0, metavar="N", help="time N steps on "
        "synthetic images, print ms/step and the time of a whole run, and exit")
    add("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    out = Path(args.out or f"runs/cifar_ssl/{args.method}_{args.dataset}_sigma{args.sigma:g}"
               f"{'_nohead' * (args.head == 'none')}_seed{args.seed}"
               f"_{time.strftime('%Y%m%d-%H%M%S')}")
    if (args.resume or args.eval_only) and (path := out / "args.json").is_file():
        # the run's settings, checked by the parser as if typed; other typed values are refused
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise common.DataError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(saved, dict) or not set(RUN_KEYS) <= saved.keys():
            raise common.DataError(f"{out} is not a run of cifar_ssl.py (its args.json lacks "
                                   "this script's settings)")
        flags = []  # the saved settings as a command line
        for key, value in saved.items():
            flag = "--" + key.replace("_", "-")
            if value is not None and value != p.get_default(key):
                flags += ([flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else
                          [flag, *map(str, value)] if isinstance(value, list) else
                          [f"{flag}={value}"])
        p.exit_on_error = False
        try:
            parsed, unknown = p.parse_known_args(flags)
            if unknown:
                raise argparse.ArgumentError(None, f"unknown settings {' '.join(unknown)}")
        except argparse.ArgumentError as err:
            raise common.DataError(f"{path} is damaged: {err}") from None
        parsed = vars(parsed)
        keys = saved.keys() & parsed.keys() - set(RUNTIME)
        if differ := [k for k in keys if getattr(args, k) not in (p.get_default(k), parsed[k])]:
            raise common.DataError(f"--{differ[0].replace('_', '-')} differs from the run's "
                                   f"setting in {path}; drop it or choose another --out")
        vars(args).update({key: parsed[key] for key in keys})
    elif args.eval_only:
        p.error(f"--eval-only: {out / 'args.json'} does not exist")
    elif not args.bench and (any(q.is_file() for q in (out, *out.parents))
                             or out.is_dir() and any(out.iterdir())):  # a new run
        p.error(f"--out {out}: a file, or a folder with files but no run; choose another")
    args.out, args.dim = str(out), args.dim or PROJECTOR[args.method][1]
    if args.recipe == "auto":
        args.recipe = "imagenet" if args.image_size > 64 else "cifar"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for wrong, message in [
            (args.steps is not None and args.epochs != p.get_default("epochs"),
             "--steps and --epochs exclude each other"),
            (args.head == "none" and args.sigma > 0, "--head none adds no noise: use --sigma 0"),
            (args.method == "vicreg" and not any(args.vicreg_weights), "--vicreg-weights: all 0"),
            (args.dataset == "folder" and not args.data_dir, "--dataset folder needs --data-dir"),
            (args.workers and args.dataset != "folder", "--workers is for --dataset folder only"),
            (args.eval_only and world > 1, "--eval-only runs in one process, not under torchrun"),
            (args.batch_size % world or args.batch_size < 2 * world, f"--batch-size "
             f"{args.batch_size} (global) must give each of {world} processes as many images, 2+")]:
        if wrong:
            p.error(message)
    return args


# ---- Data: every split is one uint8 tensor (N, 3, S, S) and int64 labels -------------------------
def load_cifar(dataset: str, root: Path, download: bool) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) from CIFAR's pickles, downloaded into root if missing."""
    folder, train_files, test_files, label_key = CIFAR_FILES[dataset]
    if download and not all((root / folder / n).is_file() for n in train_files + test_files):
        try:
            getattr(torchvision.datasets, dataset.upper())(str(root), download=True)
        except Exception as err:  # network errors come in many types
            raise common.DataError(f"{dataset} is not in {root / folder} and could not be "
                                   f"downloaded ({str(err).splitlines()[0][:80]})") from err
    if missing := [n for n in train_files + test_files if not (root / folder / n).is_file()]:
        raise common.DataError(f"{root / folder} lacks {', '.join(missing)}; point --data-dir at "
                               f"the folder holding {folder}/ or allow --download")
    splits = []
    for files in (train_files, test_files):
        parts = []
        for file in (root / folder / name for name in files):
            try:
                batch = pickle.loads(file.read_bytes(), encoding="bytes")
                data, y = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
            except Exception as err:  # unpickling damaged bytes raises a dozen types
                raise common.DataError(f"{file} is not a CIFAR python batch (truncated or "
                                       f"damaged: {type(err).__name__})") from None
            if data.ndim != 2 or data.shape[1] != 3072 or y.ndim != 1 or len(y) != len(data) \
                    or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
                raise common.DataError(f"{file}: b'data' {data.shape} and {label_key!r} "
                                       f"{y.shape} are not N x 3072 pixels and N labels >= 0")
            parts.append((data.astype(np.uint8).reshape(-1, 3, 32, 32), y.astype(np.int64)))
        splits += [torch.from_numpy(np.concatenate(arrays)) for arrays in zip(*parts)]
    return tuple(splits)


def read_image(path: str, size: int) -> torch.Tensor:
    """ImageFolder's loader: RGB, resized (bicubic) and centre-cropped to uint8 (3, size, size)."""
    try:
        image = Image.open(path).convert("RGB")  # read whole, the file closed
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for damaged files
        raise common.DataError(f"{path} is not a readable image ({err})") from err
    image = TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC)
    return TF.pil_to_tensor(TF.center_crop(image, [size, size]))


def subset(n: int, k: int | None, seed: int) -> slice | torch.Tensor:
    """Indices of a seeded random subset of k of n items; all (a slice) when k is None or >= n."""
    return slice(None) if k is None or k >= n else common.seeded_split(n, k, seed)[0]


def load_images(args: argparse.Namespace) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """(x_train, y_train, x_test, y_test), uint8 at --image-size, and metrics.json's record of
    the data; with --workers the training tree stays on disk (info["tree"])."""
    info: dict[str, Any] = {"dataset": args.dataset}

    def decode(tree: Any, k: int | None) -> tuple[torch.Tensor, ...]:
        """A tree's images: all, or with --workers the probe's subset of k (on rank 0 alone)."""
        if args.workers and rank_and_world()[0] > 0 and args.recipe == "imagenet":
            return torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0).long()
        index = torch.arange(len(tree))[subset(len(tree), k if args.workers else None, args.seed)]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(tree, index.tolist()),
                                             batch_size=256, num_workers=args.workers,
                                             generator=torch.Generator())  # global RNG untouched
        return tuple(torch.cat(images_or_labels) for images_or_labels in zip(*loader))

    if args.dataset == "folder":
        root = Path(args.data_dir)
        test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
        if not (root / "train").is_dir() or test_dir is None:
            raise common.DataError(f"{root} needs train/<class>/<image> and val/<class>/<image> "
                                   "(or test/) folders; point --data-dir at such a tree")
        try:
            tree, test = (torchvision.datasets.ImageFolder(str(d), loader=partial(
                read_image, size=args.image_size)) for d in (root / "train", test_dir))
        except OSError as err:  # a class folder without images, an unreadable folder
            raise common.DataError(f"{root}: {str(err).splitlines()[0]}") from err
        if tree.classes != test.classes:
            raise common.DataError(f"{root}: train/ and {test_dir.name}/ hold other classes")
        info.update(source=args.data_dir, n_classes=len(tree.classes), n_train=len(tree),
                    tree=tree if args.workers else None)
        (x_tr, y_tr), (x_te, y_te) = decode(tree, args.probe_train), decode(test, args.probe_test)
    elif args.dataset in CIFAR_FILES:
        root = Path(args.data_dir) if args.data_dir else common.REPO / "data"
        x_tr, y_tr, x_te, y_te = load_cifar(args.dataset, root, args.download)
        info.update(source=str(root), mean=CIFAR_MEAN, std=CIFAR_STD)
    else:
        x_tr, y_tr, x_te, y_te, record = common.load_data(args.dataset, args.data_dir, crop=None)
        x_tr, x_te = ((F.pad(x, (2, 2, 2, 2)) * 255).round().to(torch.uint8)
                      .expand(-1, 3, -1, -1).contiguous() for x in (x_tr, x_te))
        info.update(record)
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
# Appendix C's PretrainTransform: RandomResizedCrop, ColorJitter (p: --jitter-p), grey, flip
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
JITTER_RANGES = {k: (-s, s) if k == "hue" else (max(0.0, 1 - s), 1 + s) for k, s in JITTER.items()}
GREY_P, FLIP_P = 0.2, 0.5
# the ImageNet recipe's extra steps per view (VICReg; BYOL, Table 6): Gaussian blur with sigma
# ~ U(0.1, 2) and a kernel of a tenth of the side, solarization of the pixels >= 0.5
BLUR_P, SOLARIZE_P, BLUR_SIGMA = (1.0, 0.1), (0.0, 0.2), (0.1, 2.0)


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
                          jitter_p: float = 0.8, view: int | None = None) -> dict[str, Any]:
    """Per-sample parameters of Appendix C's pipeline: crop boxes, jitter flags, factors (n, 4)
    in JITTER's order and the order applied, grey, flip; with an ImageNet `view`, blur, solarize."""
    lo, hi = torch.tensor(list(JITTER_RANGES.values()), device=device).T
    uniform = partial(torch.rand, device=device)  # drawn in this order, the ImageNet ones last
    params = {"crop": sample_crops(n, height, width, device), "jitter": uniform(n) < jitter_p,
              "factors": lo + (hi - lo) * uniform(n, 4), "order": uniform(n, 4).argsort(dim=1),
              "grey": uniform(n) < GREY_P, "flip": uniform(n) < FLIP_P}
    if view is not None:
        params["blur"] = uniform(n) < BLUR_P[view]
        params["blur_sigma"] = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * uniform(n)
        params["solarize"] = uniform(n) < SOLARIZE_P[view]
    return params


def bicubic_weights(start: torch.Tensor, length: torch.Tensor, in_size: int,
                    out_size: int) -> torch.Tensor:
    """(n, out_size, in_size) matrices resampling the window [start, start + length): PIL's
    antialiased bicubic (a = -0.5, stretched when shrinking), cut to the window, renormalized."""
    scale = (length.float() / out_size)[:, None, None]
    centre = start[:, None, None] + (torch.arange(out_size, device=start.device)[None, :, None]
                                     + 0.5) * scale
    pixel = torch.arange(in_size, device=start.device)[None, None, :] + 0.5
    t, a = ((pixel - centre) / scale.clamp(min=1)).abs(), -0.5
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
    ks = (torch.remainder(n + 6 * hue, 6.0) for n in (5.0, 3.0, 1.0))  # R, G, B
    return torch.stack([value - value * saturation * torch.minimum(k, 4 - k).clamp(0.0, 1.0)
                        for k in ks], dim=1)


JITTER_OPS: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = [
    lambda x, f: blend(x, torch.zeros_like(x), f),                                # brightness
    lambda x, f: blend(x, grey(x).mean(dim=(1, 2, 3), keepdim=True), f),          # contrast
    lambda x, f: blend(x, grey(x), f),                                            # saturation
    shift_hue]                                                                    # hue


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """torchvision's gaussian_blur (reflect padding, odd separable kernel), a sigma per image:
    one grouped convolution per axis, every (image, channel) its own group."""
    n, c, height, width = x.shape
    offsets = torch.arange(kernel, device=x.device) - (kernel - 1) / 2
    weights = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, dim=0)
    y = F.pad(x.reshape(1, n * c, height, width), (kernel // 2,) * 4, mode="reflect")
    y = F.conv2d(y, weights[:, None, None, :], groups=n * c)
    y = F.conv2d(y, weights[:, None, :, None], groups=n * c)
    return y.reshape(n, c, height, width)


def augment(x: torch.Tensor, params: dict[str, torch.Tensor], size: int,
            mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Appendix C's pipeline on a uint8 batch, each operation on the whole batch and kept where
    a sample has it: no data-dependent shapes, no host-device synchronization."""
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


# ---- The global batch under torchrun: gathered rows, the noise head, the losses ----------------
def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    grouped = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)


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


class GlobalHead(common.GaussianHead):
    """common.GaussianHead (Theorem 3.4) normalizing, in training under torchrun, with the
    statistics of the global batch the loss sees; running statistics as BatchNorm1d's."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if not (self.training and rank_and_world()[1] > 1):
            return super().forward(f)
        every, norm = gather(f), self.norm
        mean, var = every.mean(0), every.var(0, unbiased=False)
        with torch.no_grad():
            norm.running_mean.lerp_(mean, norm.momentum)
            norm.running_var.lerp_(every.var(0), norm.momentum)
            norm.num_batches_tracked += 1
        return (f - mean) / torch.sqrt(var + norm.eps)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent, the SimCLR loss (Chen et al. 2020, eq. 1), over all 2N anchors; z1[k], z2[k]
    are two views of image k. InfoNCE (Section 4) with 2N - 1 candidates; t = 0.2 (App. C)."""
    u = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = len(z1)
    logits = (u @ u.T / temperature).fill_diagonal_(-math.inf)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(u.device)
    return F.cross_entropy(logits, positives)


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_weight: float = 25.0,
                var_weight: float = 25.0, cov_weight: float = 1.0,
                eps: float = 1e-4) -> torch.Tensor:
    """VICReg (Bardes et al. 2022, eq. 6): sim s(Z, Z') + var [v(Z) + v(Z')] + cov [c(Z) + c(Z')];
    s: MSE, v: eq. 1, c: eq. 3 (covariance divisor N - 1); weights 25 / 25 / 1 (Appendix C)."""
    z1, z2 = z1.float(), z2.float()

    def variance(z: torch.Tensor) -> torch.Tensor:
        return F.relu(1.0 - torch.sqrt(z.var(dim=0) + eps)).mean()

    def covariance(z: torch.Tensor) -> torch.Tensor:
        n, d = z.shape
        centred = z - z.mean(dim=0)
        cov = centred.T @ centred / (n - 1)
        return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / d

    return (sim_weight * F.mse_loss(z1, z2)
            + var_weight * (variance(z1) + variance(z2))
            + cov_weight * (covariance(z1) + covariance(z2)))


def ssl_loss(args: argparse.Namespace) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """NT-Xent or VICReg on the two views' head outputs of the global batch (every process's)."""
    sim, var, cov = args.vicreg_weights
    loss = (partial(nt_xent, temperature=args.temperature) if args.method == "simclr"
            else partial(vicreg_loss, sim_weight=sim, var_weight=var, cov_weight=cov))
    return lambda z1, z2: loss(gather(z1.float()), gather(z2.float()))


# ---- Model: ResNet backbone, projector, noise head, online probe ---------------------------------
class SSLNet(nn.Module):
    """ResNet backbone -> features h (read by the probe); projector (Appendix C) -> head -> the
    normalized z that Trainer.step adds noise to; head "none": the original network exactly."""

    def __init__(self, args: argparse.Namespace, n_classes: int):
        super().__init__()
        self.backbone = getattr(torchvision.models, args.arch)(weights=None)
        if args.stem == "cifar" or args.stem == "auto" and args.image_size <= 64:  # He et al. 2016
            self.backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.backbone.maxpool = nn.Identity()
        features, self.backbone.fc = self.backbone.fc.in_features, nn.Identity()
        layers: list[nn.Module] = []  # SimCLR: Linear-ReLU-Linear; VICReg: Linear-BN-ReLU x 2
        for i in range(PROJECTOR[args.method][0]):
            norm = [nn.BatchNorm1d(args.hidden)] if args.method == "vicreg" else []
            layers += [nn.Linear(args.hidden if i else features, args.hidden), *norm,
                       nn.ReLU(inplace=True)]
        self.projector = nn.Sequential(*layers, nn.Linear(args.hidden, args.dim))
        self.head = GlobalHead(args.dim) if args.head == "bn" else None
        self.probe = nn.Linear(features, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        p = self.projector(h)
        return h, p if self.head is None else self.head(p.float())  # the head in float32


def build_model(args: argparse.Namespace, n_classes: int, device: torch.device) -> SSLNet:
    layout = torch.channels_last if args.channels_last else torch.preserve_format
    return SSLNet(args, n_classes).to(device, memory_format=layout)


# ---- LARS with warm-up and cosine decay ----------------------------------------------------------
class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise rate (You et al. 2017, eq. 6), clipped as in LARC:
    d = (g + wd w) min(trust ||w|| / (||g|| + wd ||w|| + eps) / lr, 1), or d = g when ||w|| or
    ||g|| is 0 and in groups without `adapt`; v <- momentum v + d (v = d at first), w <- w - lr v
    (solo-learn's, the paper's: a zero gradient adds no decay, only the old momentum)."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust: float = 0.02, eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust=trust, eps=eps, adapt=True))

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]  # no closure: one gradient per step
        for group in self.param_groups:
            for w in (w for w in group["params"] if w.grad is not None):
                d = w.grad
                if group["adapt"]:
                    w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)
                    rate = group["trust"] * w_norm / (g_norm + group["weight_decay"] * w_norm
                                                      + group["eps"])
                    rate = (rate / group["lr"]).clamp(max=1.0)
                    # torch.where, not `if`: no host-device synchronization per parameter
                    d = torch.where((w_norm > 0) & (g_norm > 0),
                                    (d + group["weight_decay"] * w) * rate, d)
                state = self.state[w]
                state["velocity"] = (state["velocity"].mul_(group["momentum"]).add_(d)
                                     if "velocity" in state else d.clone())
                w.add_(state["velocity"], alpha=-group["lr"])


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (SimCLR)."""
    return ((step + 1) / warmup if step < warmup else
            0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


# ---- Training: files, DDP, AMP and channels-last, checkpoints, batches, the loop -----------------
def save(path: Path, write: Callable[[Path], Any]) -> None:
    """write(temporary name) beside `path`, then rename: a killed run leaves no half file."""
    write(path.with_name(f".{path.name}"))  # the same suffix: numpy and matplotlib keep it
    os.replace(path.with_name(f".{path.name}"), path)


def save_json(obj: Any, path: Path) -> None:
    """Indented JSON, saved as above (Python writes nan and inf as NaN and Infinity)."""
    save(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def read_state(path: Path, device: torch.device, use: Callable[[dict], Any]) -> Any:
    """use(the state in a checkpoint.pt / model.pt); any failure: one DataError naming it."""
    try:
        return use(torch.load(path, map_location=device, weights_only=True))
    except Exception as err:  # torch.load alone raises a dozen types; a wrong key or shape more
        raise common.DataError(f"{path} cannot be used ({type(err).__name__}: "
                               f"{(str(err).splitlines() or [''])[0][:120]})") from None


class Trainer:
    """The network (DDP under torchrun), LARS, AMP, one training step and the checkpoints."""

    def __init__(self, model: SSLNet, args: argparse.Namespace, mean: torch.Tensor,
                 std: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.model, self.args, self.mean, self.std = model, args, mean, std
        self.device, self.dtype = device, dtype
        net: nn.Module = model
        if rank_and_world()[1] > 1:
            if device.type == "cuda":  # PyTorch's SyncBatchNorm has no CPU kernel (gloo)
                model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
                model.projector = nn.SyncBatchNorm.convert_sync_batchnorm(model.projector)
            net = DistributedDataParallel(model, device_ids=[device.index]
                                          if device.type == "cuda" else None)
        self.net = torch.compile(net) if args.compile else net
        # LARS (Appendix C), biases and norms without decay or adaptation; the probe: plain SGD
        scaled = args.lr * args.batch_size / 256
        ssl = [p for key, p in model.named_parameters() if not key.startswith("probe.")]
        plain = {"weight_decay": 0.0, "adapt": False}
        self.opt = LARS([{"params": [p for p in ssl if p.ndim > 1], "base_lr": scaled},
                         {"params": [p for p in ssl if p.ndim <= 1], "base_lr": scaled, **plain},
                         {"params": list(model.probe.parameters()), "base_lr": args.online_lr,
                          **plain}], lr=scaled, momentum=args.momentum,
                        weight_decay=args.weight_decay, trust=args.trust)
        self.loss_fn = ssl_loss(args)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independently augmented views of a uint8 batch."""
        (n, _, height, width), imagenet = x.shape, self.args.recipe == "imagenet"
        layout = torch.channels_last if self.args.channels_last else torch.contiguous_format
        pair = [augment(x, sample_augment_params(n, height, width, self.device, self.args.jitter_p,
                                                 view if imagenet else None), self.args.image_size,
                        self.mean, self.std).contiguous(memory_format=layout) for view in range(2)]
        return pair[0], pair[1]

    def step(self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor,
             lr_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(SSL loss, online-probe accuracy) of one step, as tensors (no synchronization)."""
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
        self.model.train()
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            (h1, z1), (h2, z2) = self.net(v1), self.net(v2)
            if self.args.sigma > 0:  # z + Z, Z ~ N(0, sigma^2 I), on both views (Theorem 3.4)
                z1, z2 = (z + self.args.sigma * torch.randn_like(z) for z in (z1, z2))
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
        rng = [(torch.get_rng_state(),
                torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])] * world
        if world > 1:
            dist.all_gather_object(rng, rng[0])
        state = {"step": step, "models": self.model.state_dict(), "process_rng": rng,
                 "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                 "history": history}
        if rank == 0:
            save(out / "checkpoint.pt", partial(torch.save, state))

    def load(self, out: Path) -> tuple[int, list]:
        """Rank 0's checkpoint.pt, with this process's own RNG states; (step, history)."""
        rank, world = rank_and_world()

        def restore(ckpt: dict) -> tuple[int, list]:
            if len(ckpt["process_rng"]) != world:
                raise ValueError(f"not written by {world} processes; resume it with as many "
                                 "processes as it was started with")
            self.model.load_state_dict(ckpt["models"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            cpu_rng, cuda_rng = ckpt["process_rng"][rank]
            torch.set_rng_state(cpu_rng.cpu())
            if cuda_rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([state.cpu() for state in cuda_rng])
            return ckpt["step"], ckpt["history"]
        return read_state(out / "checkpoint.pt", self.device, restore)


def make_batches(x: torch.Tensor, y: torch.Tensor, tree: Any, args: argparse.Namespace,
                 device: torch.device) -> Callable[[int, int], Iterator]:
    """(epoch, first step) -> this process's slices of the global batches of each later step
    (a resumable DistributedSampler), from memory or decoded from the tree by --workers."""
    rank, world = rank_and_world()
    n, size = len(x) if tree is None else len(tree), args.batch_size

    def batches(epoch: int, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = common.epoch_order(n, args.seed, epoch, torch.device("cpu"))
        slices = [order[k * size:(k + 1) * size].chunk(world)[rank]
                  for k in range(first, n // size)]
        if tree is None:
            yield from ((x[index.to(x.device)], y[index.to(x.device)]) for index in slices)
            return
        loader = torch.utils.data.DataLoader(
            tree, batch_sampler=[index.tolist() for index in slices], num_workers=args.workers,
            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(epoch))
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    return batches


def train(trainer: Trainer, batches: Callable[[int, int], Iterator], plan: dict[str, int],
          out: Path, start: int, history: list) -> None:
    """Steps `start` .. plan["steps"]; logs [step, loss, online-probe accuracy, lr] to history."""
    args, (rank, world) = trainer.args, rank_and_world()
    bar = tqdm(range(start, plan["steps"]), initial=start, total=plan["steps"],
               disable=args.quiet or rank > 0, desc=f"{args.method} sigma={args.sigma:g}",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 60)
    logged: list = []  # (loss, online-probe accuracy) tensors since the last log
    for step in bar:
        epoch, k = divmod(step, plan["per_epoch"])
        if k == 0 or step == start:
            stream = batches(epoch, k)
        x, y = next(stream)
        scale = lr_factor(step, plan["warmup"], plan["steps"])
        logged.append(trainer.step(*trainer.views(x), y, scale))
        done = step + 1
        checkpoint = done % plan["ckpt_every"] == 0 or done == plan["steps"]
        if done % plan["log_every"] == 0 or checkpoint:
            mean_loss, mean_acc = (torch.stack(values).mean() for values in zip(*logged))
            if world > 1:  # the loss is the global batch's already; the probe's is per process
                dist.all_reduce(mean_acc)
                mean_acc /= world
            mean_loss, mean_acc, logged = mean_loss.item(), mean_acc.item(), []
            if not math.isfinite(mean_loss):
                kept = (f"the last good checkpoint is kept in {out / 'checkpoint.pt'}"
                        if (out / "checkpoint.pt").is_file() else "no checkpoint was written yet")
                raise FloatingPointError(f"the loss became {mean_loss} by step {done}; {kept}; "
                                         "no metrics written. Try a smaller --lr")
            history.append([done, mean_loss, mean_acc, args.lr * args.batch_size / 256 * scale])
            bar.set_postfix(epoch=epoch, loss=f"{mean_loss:.3f}", online=f"{mean_acc:.3f}",
                            refresh=False)
        if checkpoint:
            trainer.save(out, done, history)


# ---- Evaluation: linear probe on frozen features, normality of the normalized projector outputs --
@torch.no_grad()
def linear_probe(f_tr: torch.Tensor, y_tr: torch.Tensor, f_te: torch.Tensor, y_te: torch.Tensor,
                 n_classes: int, steps: int = 500,
                 weight_decays: Sequence[float] = (1e-4,)) -> dict[str, float]:
    """Logistic regression on standardized features; of several weight decays, the best top-1 on
    a seeded held-out fifth (fitted on the rest) is refitted on all; test top-1, top-5 (Table 1)."""
    def fit_logistic(a: torch.Tensor, y: torch.Tensor, weight_decay: float) -> nn.Linear:
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

    mu, sd = f_tr.mean(0), f_tr.std(0).clamp(min=1e-6)
    a_tr, a_te = (f_tr - mu) / sd, (f_te - mu) / sd
    chosen = weight_decays[0]
    if len(weight_decays) > 1:
        order = torch.randperm(len(a_tr), generator=torch.Generator().manual_seed(0))
        fit, held = order[len(a_tr) // 5:].to(a_tr.device), order[:len(a_tr) // 5].to(a_tr.device)

        def held_out_top1(wd: float) -> float:
            linear = fit_logistic(a_tr[fit], y_tr[fit], wd)
            return (linear(a_tr[held]).argmax(1) == y_tr[held]).float().mean().item()
        chosen = max(weight_decays, key=held_out_top1)
    linear = fit_logistic(a_tr, y_tr, chosen)
    top5 = linear(a_te).topk(min(5, n_classes), dim=1).indices
    return {"top1": (top5[:, 0] == y_te).float().mean().item(),
            "top5": (top5 == y_te[:, None]).any(1).float().mean().item(),
            "train_top1": (linear(a_tr).argmax(1) == y_tr).float().mean().item(),
            "weight_decay": chosen}


def evaluate(model: SSLNet, data: tuple[torch.Tensor, ...], args: argparse.Namespace,
             mean: torch.Tensor, std: torch.Tensor, n_classes: int,
             dtype: torch.dtype) -> dict[str, Any]:
    """Linear and online probes; normality of the test projector outputs standardized over the
    probe's training images, on which every BatchNorm's statistics are first recomputed."""
    x_tr, y_tr, x_te, y_te = data

    def normalize(x: torch.Tensor) -> torch.Tensor:
        """The TestTransform of Appendix C: uint8 -> [0, 1] -> (x - mean) / std."""
        x = (x.float() / 255 - mean[:, None, None]) / std[:, None, None]
        return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x

    def forward(x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, dtype, enabled=dtype != torch.float32):
            model(normalize(x))

    @torch.no_grad()
    def embed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode backbone features h and projector outputs (before the head), float32."""
        model.eval()
        parts = []
        for i in range(0, len(x), 512):
            with torch.autocast(x.device.type, dtype, enabled=dtype != torch.float32):
                h = model.backbone(normalize(x[i:i + 512]))
                parts.append((h.float(), model.projector(h).float()))
        return torch.cat([h for h, _ in parts]), torch.cat([p for _, p in parts])

    # a last batch of one image would break BatchNorm1d in training mode
    common.recompute_bn_stats(model, forward, x_tr, 512 if len(x_tr) % 512 != 1 else 511)
    (f_tr, p_tr), (f_te, p_te) = embed(x_tr), embed(x_te)
    if not all(torch.isfinite(t).all() for t in (f_tr, p_tr, f_te, p_te)):
        raise FloatingPointError("the embeddings are not finite (the training diverged); no "
                                 "metrics written. Try a smaller --lr")
    probe = linear_probe(f_tr, y_tr, f_te, y_te, n_classes, args.probe_steps, args.probe_wd)
    online = (model.probe(f_te).argmax(1) == y_te).float().mean().item()
    z_te = ((p_te - p_tr.mean(0)) / p_tr.std(0).clamp(min=1e-6)).cpu().numpy()
    return {"probe": probe, "online_probe": {"test_top1": online},
            "normality": common.normality_report(z_te, seed=args.seed, subsample=args.subsample,
                                                 points=args.normality_points),
            "embeddings": (z_te, y_te.cpu().numpy())}


def summary(m: dict[str, Any]) -> str:
    """The run's metrics.json as the lines printed at its end."""
    probe, online = m["probe"], m["online_probe"]["test_top1"]
    return "\n".join([
        f"{m['label']} on {m['dataset']}, {m['steps']} steps ({m['epochs']:.2f} epochs), final "
        f"loss {m['final_loss']:.4f}", f"linear probe: top-1 {100 * probe['top1']:.2f} %   top-5 "
        f"{100 * probe['top5']:.2f} %   (weight decay {probe['weight_decay']:g}; online probe "
        f"top-1 {100 * online:.2f} %)", *common.normality_lines(m["normality"]),
        f"wall time {m['wall_time_s']:.0f} s on {m['device']}"])


# ---- --bench, the run and its files, main() ------------------------------------------------------
def bench(args: argparse.Namespace, device: torch.device) -> None:
    """Time a step on synthetic images; project a CIFAR-10 run or ImageNet runs (poster Table 2)."""
    torch.manual_seed(args.seed)
    (rank, world), (dtype, why) = rank_and_world(), precision(device, args.amp)
    trainer = Trainer(build_model(args, 10, device), args, torch.tensor(CIFAR_MEAN, device=device),
                      torch.tensor(CIFAR_STD, device=device), device, dtype)
    n, side = args.batch_size // world, args.image_size  # each process: its slice of the batch
    x = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, device=device)
    views, y = trainer.views(x), torch.randint(0, 10, (n,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def ms(call: Callable[[], Any], compute: torch.dtype = dtype) -> float:
        """Milliseconds per call (and GPU sync) in `compute` precision, after two untimed calls."""
        trainer.dtype = compute
        seconds = [timeit.timeit(lambda: (call(), sync()), number=k) for k in (2, args.bench)]
        return 1e3 * seconds[1] / args.bench

    other = precision(device, dtype == torch.float32)[0]
    other_ms = ms(lambda: trainer.step(*views, y, 1.0), other)
    augment_ms, step_ms = ms(lambda: trainer.views(x)), ms(lambda: trainer.step(*views, y, 1.0))
    hours = (augment_ms + step_ms) / 3.6e6  # per step; training images and epochs of a run:
    runs = ({"CIFAR-10": (50_000, 800)} if args.recipe == "cifar" else  # poster Table 2's sets
            {"ImageNet-100": (126_689, 100), "ImageNet-1k": (1_281_167, 100)})
    if rank == 0:
        print(f"{device.type} ({name(dtype)}{', channels-last' * args.channels_last}"
              f"{', compiled' * args.compile}), {world} process{'es' * (world > 1)}, "
              f"{args.method} {args.arch}, batch {args.batch_size} x 2 views, {side}x{side}: "
              f"augmentation {augment_ms:.1f} ms + forward/backward/update {step_ms:.1f} ms = "
              f"{augment_ms + step_ms:.1f} ms/step, {args.batch_size / (hours * 3600):.0f} "
              "images/s; at this batch size it would take " + " and ".join(
                  f"{size // args.batch_size * e * hours:.1f} h for {e} {k} epochs"
                  for k, (size, e) in runs.items()) + " (data loading not included)\n"
              f"  {name(other)}: forward/backward/update {other_ms:.1f} ms; the default (auto) "
              f"picks {name(precision(device, None)[0])}; this run: {why}")


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any] | None:
    """Data, model, training (or the saved weights with --eval-only), evaluation, saving."""
    (rank, world), out = rank_and_world(), Path(args.out)
    if args.resume and not args.eval_only and (out / "metrics.json").is_file():
        print(f"{out} is finished: its results are in {out / 'metrics.json'}")
        return None
    saved = out / ("model.pt" if (out / "model.pt").is_file() else "checkpoint.pt")
    started, (dtype, why) = time.time(), precision(device, args.amp)
    if rank == 0:
        print(f"{name(dtype)}: {why}")
    torch.manual_seed(args.seed)
    (x_tr, y_tr, x_te, y_te), info = load_images(args)
    if args.batch_size > info["n_train"]:
        raise common.DataError(f"--batch-size {args.batch_size} exceeds the {info['n_train']} "
                               "training images")
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))
    mean, std = torch.tensor(info["mean"], device=device), torch.tensor(info["std"], device=device)
    per_epoch = info["n_train"] // args.batch_size  # the last partial batch dropped
    steps = args.steps if args.steps is not None else round(args.epochs * per_epoch)
    plan = {"per_epoch": per_epoch, "steps": steps, "warmup": round(args.warmup_epochs * per_epoch),
            "log_every": args.log_every or max(1, steps // 100),
            "ckpt_every": max(1, round(args.ckpt_every * per_epoch) if args.ckpt_every else steps)}
    batches = make_batches(x_tr, y_tr, info.pop("tree", None), args, device)
    model = build_model(args, info["n_classes"], device)
    settings = {k: v for k, v in vars(args).items() if k not in RUNTIME}
    history: list = []
    if args.eval_only:  # the final weights, else the last checkpoint's (an unfinished run)
        read_state(saved, device, lambda state: model.load_state_dict(state["models"]))
        if (out / "checkpoint.pt").is_file():
            plan["steps"], history = read_state(out / "checkpoint.pt", torch.device("cpu"),
                                                lambda state: (state["step"], state["history"]))
        print(f"evaluating {saved}")
    else:
        if world > 1:  # same initial weights (DDP broadcasts rank 0's), own augmentations, noise
            torch.manual_seed(args.seed * 1_000_003 + rank)
        trainer, start = Trainer(model, args, mean, std, device, dtype), 0
        if args.resume and (out / "checkpoint.pt").is_file():
            start, history = trainer.load(out)
            if rank == 0:
                print(f"resuming {out} at step {start}")
        if rank == 0 and not (out / "args.json").is_file():  # a new run
            out.mkdir(parents=True, exist_ok=True)
            save_json(settings, out / "args.json")
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
    metrics = evaluate(model, probe_data, args, mean, std, info["n_classes"], dtype)
    z_te, y_test = metrics.pop("embeddings")
    metrics = {
        "method": args.method, "sigma": args.sigma, "head": args.head,
        "label": f"{args.method} without noise head (original)" if args.head == "none" else
        f"{args.method} BatchNorm head, sigma = {args.sigma:g}", "dataset": args.dataset,
        "arch": args.arch, "dim": args.dim,
        "capacity": common.gaussian_capacity(args.dim, args.sigma),
        "class_information": math.log(info["n_classes"]), "steps": plan["steps"],
        "epochs": plan["steps"] / plan["per_epoch"], "batch_size": args.batch_size,
        "seed": args.seed, "final_loss": history[-1][1] if history else math.nan,
        "train_history": history, **metrics,
        "probe_images": {"train": len(probe_data[0]), "test": len(probe_data[2])},
        "settings": settings, "data": info, "device": str(device),
        "wall_time_s": time.time() - started, "precision": {"dtype": name(dtype), "why": why}}
    if args.eval_only:  # the run's own files stay as they are
        save_json(metrics, out / "metrics_recomputed.json")
        print(summary(metrics) + f"\nsaved to {out / 'metrics_recomputed.json'}")
        return metrics
    save(out / "embeddings.npz", partial(np.savez_compressed, z_test=z_te, y_test=y_test))
    save(out / "model.pt", partial(torch.save, {"models": model.state_dict(), "args": vars(args)}))
    if info["n_classes"] <= 10:
        figure = common.scatter_embeddings(z_te, y_test, f"{metrics['label']}, {args.dataset} test")
        save(out / "scatter.png", partial(figure.savefig, dpi=150, bbox_inches="tight"))
    save_json(metrics, out / "metrics.json")
    print(summary(metrics) + f"\nsaved to {out}")
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """One run (under torchrun: every process); expected errors end in one line on stderr."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():  # torchrun: join the group (NCCL / gloo)
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        args = parse_args(argv)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") \
            if args.device == "auto" else torch.device(args.device)
        if world > 1:
            shared = [args.out]  # a default --out is time-stamped: take rank 0's
            dist.broadcast_object_list(shared, src=0)
            args.out = shared[0]
            dist.barrier()  # every process has checked --out before rank 0 writes into it
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
        return bench(args, device) if args.bench else run(args, device)
    except (common.DataError, OSError) as err:  # a DataLoader worker's ends with the original line
        message, code = str(err).strip().splitlines()[-1].split("DataError: ")[-1], 2
    except FloatingPointError as err:
        message, code = str(err), 3
    print(f"cifar_ssl.py: error: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()

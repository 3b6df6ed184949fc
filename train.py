"""
Train the ViT variants of mpvg.py with the paper's recipes (MPVG, AAAI 2025; PAPER.md section 4).

    python train.py --data synthetic --epochs 2 --cooldown-epochs 0 --warmup-epochs 0   # offline smoke test, CPU ok
    python train.py --pe mpvg                                                           # ViT-Lite-7/4, CIFAR-100, 1 GPU
    torchrun --standalone --nproc_per_node 4 train.py --pe mpvg                         # same run on 4 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --master_addr HOST --master_port 29500 \
        train.py --model deit_tiny --pe mpvg --data-path /data/imagenet                 # DeiT-Ti, 2 nodes x 8 GPUs

One script for one process and for DDP: under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment)
it runs DistributedDataParallel (nccl on CUDA, gloo on CPU); otherwise a single process.
--global-batch-size is the batch of ONE optimizer step summed over all processes; each process gets
global / world_size. The paper's numbers (ViT-Lite CIFAR-100 top-1: vit 74.90, lape 75.52, pvg 76.67,
mpvg 76.87; DeiT-Ti ImageNet: 72.14 / 72.94 / 73.17 / 73.51) were reported on 4x RTX 4090.

Determinism: the data order of an epoch, every image's augmentation and every step's randomness (MixUp/CutMix,
drop-path) are pure functions of (seed, epoch, step / sample position, rank). That is what makes --resume exact
and makes 1 process and N processes see the same samples in every step.

Sections: config/CLI, data + augmentation, schedule/optimizer, DDP helpers, train/eval loop, checkpointing, main.
Comments with `##` teach; `#` comments are functional. `# deviation:` marks every departure from the official code.
"""
import argparse
import contextlib
import gc
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import random
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as nnF
import torchvision
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

import mpvg


class UserError(Exception):
    """Bad input or an unrecoverable run state: main() prints the message as one paragraph, no traceback."""


# ----------------------------------------------------------------------------------------------------------------
# config / CLI

## The two official recipes (PAPER.md section 4). A model's defaults are its paper recipe; every value is a flag.
RECIPES = {
    ## Compact-Transformers `cifar100.yml` (timm train.py): lr not scaled with the batch, PE and cls token decayed.
    'vit_lite': dict(data='cifar100', epochs=300, cooldown_epochs=10, global_batch_size=128, lr=6e-4,
                     lr_base_batch=None, warmup_epochs=10, warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.06,
                     skip_no_weight_decay=False, rrc_scale=(0.8, 1.0), interpolation='random',
                     repeated_aug=False, eval_crop_pct=0.875),
    ## DeiT / LaPE `main.py`: lr = 5e-4 * global_batch / 512, no decay for model.no_weight_decay() names.
    ## DeiT's main.py loops over args.epochs only, so its default --cooldown-epochs 10 is never trained.
    'deit': dict(data='imagenet', epochs=300, cooldown_epochs=0, global_batch_size=1024, lr=5e-4,
                 lr_base_batch=512, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05,
                 skip_no_weight_decay=True, rrc_scale=(0.08, 1.0), interpolation='bicubic',
                 repeated_aug=True, eval_crop_pct=0.875),
}
COMMON_RECIPE = dict(smoothing=0.1, mixup=0.8, cutmix=1.0, reprob=0.25, hflip=0.5, randaug='rand-m9-mstd0.5-inc1')
RA_REPEATS = 3  # DeiT's RASampler

DATASETS = {
    'cifar100': dict(num_classes=100, mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761)),
    'imagenet': dict(num_classes=1000, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    'synthetic': dict(num_classes=10, mean=(0.25, 0.25, 0.25), std=(0.25, 0.25, 0.25)),
}
CIFAR100_URL = 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'
CIFAR100_MD5 = 'eb9058c3a382ffc7106e4002c42a8d85'

ARCH_FLAGS = dict(img_size='img_size', patch_size='patch_size', embed_dim='embed_dim', depth='depth',
                  num_heads='num_heads', mlp_ratio='mlp_ratio', drop_path='drop_path_rate',
                  attn_drop='attn_drop_rate')  # CLI dest -> create_model keyword


def recipe_name(model):
    return 'vit_lite' if model.startswith('vit_lite') else 'deit'


def int_or_none(s):
    return None if s.lower() == 'none' else int(s)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's page-long usage block
        self.exit(2, f'error: {message}. See python train.py --help.\n')


def build_parser():
    p = Parser(
        description='Train ViT-Lite / DeiT with the PE variants of mpvg.py (MPVG, AAAI 2025). '
                    'Defaults are the paper recipe of --model; every recipe value can be overridden.',
        epilog='Batch size: --global-batch-size is the batch of one optimizer step summed over ALL processes '
               '(per process = global / WORLD_SIZE; it must divide). Defaults: 128 for vit_lite_7_4 (CIFAR-100), '
               '1024 for deit_* (ImageNet). DeiT lr = 5e-4 * global_batch / 512 unless --lr is given; ViT-Lite '
               'lr 6e-4 unscaled. Offline smoke test: python train.py --data synthetic --epochs 2 '
               '--cooldown-epochs 0 --warmup-epochs 0. SIGTERM/SIGINT: the current step finishes, last.pt is '
               'written with its position in the epoch, and the run exits 0; --resume auto skips the finished '
               'steps and continues exactly.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--model', default='vit_lite_7_4', choices=sorted(mpvg.MODELS))
    g.add_argument('--pe', default='mpvg', choices=sorted(mpvg.PE_PRESETS), help='PE variant preset')
    g.add_argument('--pool', choices=['cls', 'gap'], default=None, help='override the preset: pooling')
    g.add_argument('--pe-at-input', action=argparse.BooleanOptionalAction, default=None,
                   help='override the preset: add pos_0 to the tokens before layer 0')
    g.add_argument('--layerwise-from', type=int_or_none, default=argparse.SUPPRESS, metavar='L|none',
                   help='override the preset: first layer adding LN\'_l(PE) to its MSA input (default: preset)')
    g.add_argument('--hierarchical', action=argparse.BooleanOptionalAction, default=None,
                   help='override the preset: pe_l = LN\'_l(pe_{l-1}) vs LN\'_l(pos_0)')
    g.add_argument('--last-ln-pe', type=int_or_none, default=argparse.SUPPRESS, metavar='K|none',
                   help='override the preset: PE added after the Last LN (0 = pos_0, MPVG) (default: preset)')
    for flag, typ in [('--img-size', int), ('--patch-size', int), ('--embed-dim', int), ('--depth', int),
                      ('--num-heads', int), ('--mlp-ratio', float), ('--drop-path', float), ('--attn-drop', float)]:
        g.add_argument(flag, type=typ, default=None, help='architecture override (default: the model\'s)')
    g = p.add_argument_group('data')
    g.add_argument('--data', choices=sorted(DATASETS), default=None,
                   help='default: cifar100 for vit_lite_7_4, imagenet for deit_*; synthetic = generated, offline')
    g.add_argument('--data-path', default='./data',
                   help='cifar100: folder holding cifar-100-python/ (downloaded if missing); '
                        'imagenet: folder holding train/ and val/ class folders')
    g.add_argument('--download', action=argparse.BooleanOptionalAction, default=True,
                   help='download CIFAR-100 when it is missing')
    g.add_argument('--synthetic-size', type=int, default=1024, help='train images of --data synthetic (val: 1/4)')
    g.add_argument('--workers', type=int, default=None, help='data loader processes per rank (default min(8, cpus))')
    g.add_argument('--device-data', choices=['auto', 'on', 'off'], default='auto',
                   help='keep the whole uint8 dataset on the device and augment whole batches there (the batched '
                        'path) instead of per image in CPU workers; auto = on for cifar100 on CUDA. In-memory '
                        'datasets only (cifar100, synthetic)')
    g = p.add_argument_group('recipe (default: the paper recipe of --model)')
    g.add_argument('--epochs', type=int, default=None, help='cosine epochs (300)')
    g.add_argument('--cooldown-epochs', type=int, default=None, help='epochs at min lr after the cosine (10 / 0)')
    g.add_argument('--global-batch-size', type=int, default=None,
                   help='images per optimizer step summed over all processes (128 / 1024)')
    g.add_argument('--lr', type=float, default=None, help='peak lr (6e-4 / 5e-4*global_batch/512)')
    g.add_argument('--min-lr', type=float, default=None)
    g.add_argument('--warmup-epochs', type=int, default=None)
    g.add_argument('--warmup-lr', type=float, default=None)
    g.add_argument('--weight-decay', type=float, default=None)
    g.add_argument('--smoothing', type=float, default=None, help='label smoothing (0.1)')
    g.add_argument('--mixup', type=float, default=None, help='MixUp alpha, 0 = off (0.8)')
    g.add_argument('--cutmix', type=float, default=None, help='CutMix alpha, 0 = off (1.0)')
    g.add_argument('--reprob', type=float, default=None, help='RandomErasing probability (0.25)')
    g.add_argument('--hflip', type=float, default=None, help='horizontal flip probability (0.5)')
    g.add_argument('--randaug', default=None, help="timm RandAugment string or 'none' (rand-m9-mstd0.5-inc1)")
    g.add_argument('--random-crop', action=argparse.BooleanOptionalAction, default=True,
                   help='RandomResizedCrop; off = the eval geometry')
    g.add_argument('--rrc-scale', type=float, nargs=2, default=None, help='(0.8 1) / (0.08 1)')
    g.add_argument('--repeated-aug', action=argparse.BooleanOptionalAction, default=None,
                   help='DeiT repeated augmentation, 3 repeats (default: on for deit_*)')
    g.add_argument('--eval-crop-pct', type=float, default=None,
                   help='ImageFolder eval: Resize(int(img/crop_pct)) + CenterCrop(img) (0.875; LaPE used 1.0)')
    g.add_argument('--no-aug', action='store_true',
                   help='switch off every random data augmentation (crop, flip, RandAugment, MixUp/CutMix, '
                        'erasing); label smoothing, drop-path and attention dropout stay as set')
    g = p.add_argument_group('run')
    g.add_argument('--output-dir', default=None, help='default runs/<model>_<pe>_<data>_seed<seed>')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--resume', default=None, help="checkpoint path, or 'auto' = <output-dir>/last.pt if present")
    g.add_argument('--eval-only', action='store_true', help='evaluate the --resume checkpoint and exit')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=True, help='bf16 autocast (CUDA only)')
    g.add_argument('--compile', action='store_true', help='torch.compile the model')
    g.add_argument('--log-interval', type=int, default=20,
                   help='steps between loss syncs (progress bar, non-finite check, DDP stop check)')
    g.add_argument('--no-progress', action='store_true', help='no tqdm bar (it is also off when stderr is no tty)')
    return p


def resolve_config(args, world_size):
    """Merge the recipe of --model with the flags; returns a JSON-able dict (saved as config.json)."""
    rname = recipe_name(args.model)
    recipe = {**RECIPES[rname], **COMMON_RECIPE}
    cfg = {k: v for k, v in vars(args).items()}
    for k, v in recipe.items():
        if cfg.get(k) is None:
            cfg[k] = v
    cfg['recipe'] = rname
    cfg['data'] = args.data or recipe['data']
    if args.no_aug:
        cfg.update(mixup=0.0, cutmix=0.0, reprob=0.0, hflip=0.0, randaug='none', random_crop=False)
    cfg['rrc_scale'] = list(cfg['rrc_scale'])
    B = cfg['global_batch_size']
    if B < 1 or B % world_size:
        raise UserError(f'--global-batch-size {B} is not divisible by the {world_size} processes of this run '
                        f'(WORLD_SIZE={world_size}); the per-process batch would not be an integer. Pick a '
                        f'multiple of {world_size}.')
    cfg['world_size'] = world_size
    cfg['per_process_batch_size'] = B // world_size
    if args.lr is None and recipe['lr_base_batch']:
        cfg['lr'] = recipe['lr'] * B / recipe['lr_base_batch']  # DeiT's linear scaling rule
    cfg['total_epochs'] = cfg['epochs'] + cfg['cooldown_epochs']
    # what create_model needs besides (name, pe): architecture and PE-knob overrides the user gave
    kw = {'num_classes': DATASETS[cfg['data']]['num_classes']}
    for dest, key in ARCH_FLAGS.items():
        if cfg[dest] is not None:
            kw[key] = cfg[dest]
    for knob in mpvg.PE_KNOBS:
        ## --layerwise-from / --last-ln-pe accept 'none' as a value, so "not given" is their absence (SUPPRESS)
        given = knob in cfg if knob in ('layerwise_from', 'last_ln_pe') else cfg.get(knob) is not None
        if given:
            kw[knob] = cfg[knob]
    cfg['model_kwargs'] = kw
    cfg['output_dir'] = args.output_dir or os.path.join(
        'runs', f"{args.model}_{args.pe}_{cfg['data']}_seed{args.seed}")
    parse_randaug(cfg['randaug'])  # fail early on a bad string
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# data + augmentation

def derive_seed(*keys):
    """A 63-bit seed that is a pure function of the keys (seed, epoch, position, ...)."""
    return int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), 'little') >> 1


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory as uint8 (n, 3, H, W) (CIFAR-100, synthetic)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


class FolderImages(torch.utils.data.Dataset):
    """An ImageFolder whose images come out as uint8 (3, H, W) tensors (decoded by PIL, as ImageFolder does)."""

    def __init__(self, root):
        self.folder = torchvision.datasets.ImageFolder(root, loader=lambda path: path)
        self.classes = self.folder.classes

    def __len__(self):
        return len(self.folder.samples)

    def __getitem__(self, i):
        path, label = self.folder.samples[i]
        try:
            img = F.pil_to_tensor(torchvision.datasets.folder.default_loader(path))  # PIL RGB -> uint8 (3, H, W)
        except (OSError, ValueError, SyntaxError) as e:  # PIL: unidentified, truncated or malformed file
            raise UserError(f'cannot decode image {path} ({type(e).__name__}: {e}); replace or delete that file, '
                            f'then rerun with --resume auto to continue from the last checkpoint') from None
        return img, label


class Augmented(torch.utils.data.Dataset):
    """Keys are (index, seed): the transform runs with the CPU RNG seeded by `seed`, so an image's augmentation
    depends only on its key, not on the worker, the rank or what ran before (exact resume)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key
        img, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.transform(img), label


def load_cifar100(root, download, local_rank):
    folder = os.path.join(root, 'cifar-100-python')
    files = [os.path.join(folder, s) for s in ('train', 'test')]
    how = (f'Expected the official CIFAR-100 python version at {folder}/{{train,test,meta}} (extracted from '
           f'{CIFAR100_URL}). Get it with: mkdir -p {root} && curl -L {CIFAR100_URL} | tar xz -C {root} '
           f'(or run once with network access: train.py downloads it), or point --data-path at the folder '
           f'that holds cifar-100-python/.')
    if not all(os.path.isfile(f) for f in files):
        if not download:
            raise UserError(f'CIFAR-100 not found and --no-download is set. {how}')
        if local_rank == 0:  # one download per node; the other processes wait at the barrier
            try:
                torchvision.datasets.utils.download_and_extract_archive(CIFAR100_URL, root, md5=CIFAR100_MD5)
            except Exception as e:  # offline, proxy, disk full...
                raise UserError(f'CIFAR-100 not found and the download failed ({type(e).__name__}: {e}). {how}')
        barrier()
    out = []
    for f in files:
        try:
            with open(f, 'rb') as fh:
                d = pickle.load(fh, encoding='bytes')
            images = torch.as_tensor(d[b'data'], dtype=torch.uint8).reshape(-1, 3, 32, 32)  # (n, 3072) -> (n, 3, 32, 32)
            labels = torch.as_tensor(d[b'fine_labels'], dtype=torch.long)
            if len(labels) != len(images) or len(labels) == 0 or labels.min() < 0 or labels.max() >= 100:
                raise ValueError(f'{len(images)} images, {len(labels)} labels in [{labels.min()}, {labels.max()}]')
        except Exception as e:
            raise UserError(f'{f} is not a valid CIFAR-100 python file ({type(e).__name__}: {e}): expected a '
                            f'pickled dict with b"data" (n, 3072) uint8 and b"fine_labels" (n ints in 0..99). '
                            f'Delete {folder} to download it again. {how}')
        out.append(TensorImages(images, labels))
    return out


def load_imagenet(root):
    how = (f'Expected ImageNet-1K as ImageFolders {root}/train/<class>/<image> and {root}/val/<class>/<image> '
           f'(val sorted into the same class folders, e.g. with the valprep.sh script of the PyTorch examples). '
           f'ImageNet cannot be downloaded automatically: get ILSVRC2012 from https://image-net.org and point '
           f'--data-path at the folder that holds train/ and val/.')
    out = []
    for split in ('train', 'val'):
        try:
            out.append(FolderImages(os.path.join(root, split)))
        except Exception as e:  # FileNotFoundError for a missing folder or no images
            raise UserError(f'ImageNet {split} split not usable ({type(e).__name__}: {e}). {how}')
    if out[0].classes != out[1].classes:
        raise UserError(f'{root}/train has {len(out[0].classes)} classes and {root}/val has '
                        f'{len(out[1].classes)} with different names; they must be the same folders. {how}')
    if len(out[0].classes) != DATASETS['imagenet']['num_classes']:
        print(f'note: {root} has {len(out[0].classes)} classes, the model gets {DATASETS["imagenet"]["num_classes"]} '
              f'outputs (ImageNet-1K)', file=sys.stderr)
        if len(out[0].classes) > DATASETS['imagenet']['num_classes']:
            raise UserError(f'{root}/train has {len(out[0].classes)} classes, more than ImageNet-1K\'s 1000. {how}')
    return out


def make_synthetic(n, img_size, split_seed):
    """10 classes told apart only by WHERE a bright square is (so a model without PE under GAP cannot learn it).
    The class is (row, distance of the column from the centre): 5 rows x 2 mirror pairs of columns, and the square
    sits at one of the mirror columns at random, so a horizontal flip keeps the label."""
    g = torch.Generator().manual_seed(split_seed)
    labels = torch.randint(10, (n,), generator=g)
    images = (torch.rand(n, 3, img_size, img_size, generator=g) * 64).to(torch.uint8)
    ch, cw = img_size // 5, img_size // 4
    side = torch.randint(2, (n,), generator=g)
    for i in range(n):
        row, pair = divmod(int(labels[i]), 2)
        col = pair if side[i] == 0 else 3 - pair
        images[i, :, row * ch:(row + 1) * ch, col * cw:(col + 1) * cw] = 230
    return TensorImages(images, labels)


def load_data(cfg, img_size, local_rank):
    if cfg['data'] == 'synthetic':
        n = cfg['synthetic_size']
        return make_synthetic(n, img_size, 1), make_synthetic(max(1, n // 4), img_size, 2)
    if cfg['data'] == 'cifar100':
        return load_cifar100(cfg['data_path'], cfg['download'], local_rank)
    return load_imagenet(cfg['data_path'])


## timm `rand-m9-mstd0.5-inc1`, written with torchvision ops on uint8 (3, H, W) tensors (PAPER.md section 4).
RA_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
          'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
          'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def ra_level_to_arg(name, magnitude, sign=1.0):
    """timm's level functions: magnitude in [0, 10] -> the op argument; sign (+1/-1) is timm's random negation."""
    level = magnitude / 10.0
    if name == 'Rotate':
        return sign * 30.0 * level                      # degrees
    if name in ('ShearX', 'ShearY'):
        return sign * 0.3 * level                       # shear factor
    if name in ('TranslateXRel', 'TranslateYRel'):
        return sign * 0.45 * level                      # fraction of the image size
    if name.endswith('Increasing') and name[:-10] in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
        return max(0.1, 1.0 + sign * 0.9 * level)       # enhance factor
    if name == 'PosterizeIncreasing':
        return 4 - int(4 * level)                       # bits kept
    if name == 'SolarizeIncreasing':
        return 256 - min(256, int(256 * level))         # threshold
    if name == 'SolarizeAdd':
        return min(128, int(110 * level))               # added to pixels below 128
    return None                                         # AutoContrast, Equalize, Invert take no argument


def pil_affine(img, matrix, interpolation, fill):
    """PIL's Image.transform(size, AFFINE, matrix, resample, fillcolor) on a uint8 (3, H, W) tensor: the output
    pixel centre (x + 0.5, y + 0.5) samples the input at (a x + b y + c, d x + e y + f) (continuous coordinates,
    pixel i covers [i, i + 1)); a sample point outside the input gets `fill`, neighbours at the border are clamped.
    # deviation: torchvision's tensor affine has no bicubic mode, so this is grid_sample with PIL's own matrix;
    # torch's bicubic kernel uses a = -0.75, PIL's a = -0.5 (small value differences, same geometry)."""
    C, H, W = img.shape
    a, b, c, d, e, f = matrix
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing='ij')  # (H, W) output centres
    u, v = a * xs + b * ys + c, d * xs + e * ys + f                                       # (H, W) input points
    grid = torch.stack([2 * u / W - 1, 2 * v / H - 1], dim=-1)[None]                     # (1, H, W, 2) in [-1, 1]
    mode = 'bicubic' if interpolation == InterpolationMode.BICUBIC else 'bilinear'
    out = nnF.grid_sample(img[None].float(), grid, mode=mode, padding_mode='border', align_corners=False)[0]
    inside = (u >= 0) & (u < W) & (v >= 0) & (v < H)
    out = torch.where(inside, out, torch.tensor(fill, dtype=out.dtype)[:, None, None])
    return out.round_().clamp_(0, 255).to(torch.uint8)


def pil_rotate_matrix(degrees, W, H):
    """The matrix PIL's Image.rotate(degrees) hands to transform: counter-clockwise about (W/2, H/2)."""
    t = -math.radians(degrees)
    a, b, d, e = round(math.cos(t), 15), round(math.sin(t), 15), round(-math.sin(t), 15), round(math.cos(t), 15)
    cx, cy = W / 2.0, H / 2.0
    return (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)


def ra_apply(img, name, arg, fill, interpolation=InterpolationMode.BILINEAR):
    """One op of timm's RandAugment on a uint8 (3, H, W) tensor; `arg` as returned by ra_level_to_arg and
    `fill` the dataset mean in 0-255. Colour ops are torchvision's (made to match PIL's ImageOps/ImageEnhance);
    geometric ops use the PIL matrices of timm's auto_augment.py (about the top-left corner; rotate about the
    centre)."""
    H, W = img.shape[-2:]
    if name == 'AutoContrast':
        return F.autocontrast(img)
    if name == 'Equalize':
        return F.equalize(img)
    if name == 'Invert':
        return F.invert(img)
    if name == 'PosterizeIncreasing':
        return F.posterize(img, arg) if arg < 8 else img
    if name == 'SolarizeIncreasing':
        return F.solarize(img, arg) if arg <= 255 else img  # threshold 256 inverts nothing
    if name == 'SolarizeAdd':
        return torch.where(img < 128, (img.to(torch.int16) + arg).clamp(max=255).to(torch.uint8), img)
    if name == 'ColorIncreasing':
        return F.adjust_saturation(img, arg)
    if name == 'ContrastIncreasing':
        return F.adjust_contrast(img, arg)
    if name == 'BrightnessIncreasing':
        return F.adjust_brightness(img, arg)
    if name == 'SharpnessIncreasing':
        return F.adjust_sharpness(img, arg)
    if name == 'Rotate':
        return pil_affine(img, pil_rotate_matrix(arg, W, H), interpolation, fill)
    if name == 'ShearX':
        return pil_affine(img, (1, arg, 0, 0, 1, 0), interpolation, fill)
    if name == 'ShearY':
        return pil_affine(img, (1, 0, 0, arg, 1, 0), interpolation, fill)
    if name == 'TranslateXRel':
        return pil_affine(img, (1, 0, arg * W, 0, 1, 0), interpolation, fill)
    if name == 'TranslateYRel':
        return pil_affine(img, (1, 0, 0, 0, 1, arg * H), interpolation, fill)
    raise ValueError(f'unknown RandAugment op {name!r}; valid: {RA_OPS}')


def parse_randaug(s):
    """'rand-m9-mstd0.5-inc1' -> dict(num_ops=2, magnitude=9.0, magnitude_std=0.5); 'none' -> None."""
    if s is None or s.lower() == 'none':
        return None
    parts = s.split('-')
    out = dict(num_ops=2, magnitude=10.0, magnitude_std=0.0)
    inc = False
    try:
        assert parts[0] == 'rand'
        for part in parts[1:]:
            if part.startswith('mstd'):
                out['magnitude_std'] = float(part[4:])
            elif part.startswith('inc'):
                inc = bool(int(part[3:]))
            elif part.startswith('m'):
                out['magnitude'] = float(part[1:])
            elif part.startswith('n'):
                out['num_ops'] = int(part[1:])
            else:
                raise ValueError(part)
    except Exception:
        raise UserError(f"--randaug {s!r} is not a timm RandAugment string like 'rand-m9-mstd0.5-inc1' "
                        f"(parts: m<magnitude>, n<ops>, mstd<std>, inc1) or 'none'")
    if not inc:
        raise UserError(f"--randaug {s!r}: only the 'increasing' op set (inc1, the paper's) is implemented")
    return out


class RandAugment:
    """2 ops drawn with replacement from RA_OPS, each applied with p 0.5 at magnitude ~ N(9, 0.5) clipped to
    [0, 10], random sign. All draws come from torch's CPU RNG (seeded per image by Augmented)."""

    def __init__(self, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, fill=(128, 128, 128),
                 interpolation='random'):
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob
        self.fill = [float(f) for f in fill]
        self.interpolations = ([InterpolationMode.BILINEAR, InterpolationMode.BICUBIC] if interpolation == 'random'
                               else [InterpolationMode(interpolation)])

    def __call__(self, img):
        for _ in range(self.num_ops):
            name = RA_OPS[int(torch.randint(len(RA_OPS), ()))]
            if float(torch.rand(())) > self.prob:
                continue
            m = self.magnitude + self.magnitude_std * float(torch.randn(())) if self.magnitude_std > 0 else self.magnitude
            m = min(max(m, 0.0), 10.0)
            sign = -1.0 if float(torch.rand(())) > 0.5 else 1.0
            interp = self.interpolations[int(torch.randint(len(self.interpolations), ()))]
            img = ra_apply(img, name, ra_level_to_arg(name, m, sign), self.fill, interp)
        return img


class Transform:
    """uint8 (3, H, W) -> normalized float (3, img, img). Train: RandomResizedCrop (bilinear or bicubic at random
    for ViT-Lite, bicubic for DeiT) -> h-flip -> RandAugment -> normalize -> RandomErasing (timm's order)."""

    def __init__(self, cfg, img_size, mean, std, train, folder):
        self.img_size, self.mean, self.std, self.folder = img_size, list(mean), list(std), folder
        self.crop_pct = cfg['eval_crop_pct']
        self.rrc = self.flip = self.ra = self.erase = None
        if train:
            if cfg['random_crop']:
                modes = (['bilinear', 'bicubic'] if cfg['interpolation'] == 'random' else [cfg['interpolation']])
                # deviation: crop + resize on uint8 tensors (torchvision, antialias) instead of PIL's resize
                self.rrc = [v2.RandomResizedCrop(img_size, scale=tuple(cfg['rrc_scale']), ratio=(3 / 4, 4 / 3),
                                                 interpolation=InterpolationMode(m), antialias=True) for m in modes]
            if cfg['hflip'] > 0:
                self.flip = v2.RandomHorizontalFlip(cfg['hflip'])
            ra = parse_randaug(cfg['randaug'])
            if ra:
                fill = tuple(min(255, round(255 * x)) for x in mean)  # timm's img_mean
                self.ra = RandAugment(**ra, fill=fill, interpolation=cfg['interpolation'])
            if cfg['reprob'] > 0:
                self.erase = v2.RandomErasing(cfg['reprob'], scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value='random')

    def geometry(self, img):
        """Eval geometry: ImageFolder: Resize(int(img/crop_pct)) + CenterCrop(img), bicubic (DeiT);
        in-memory sets (CIFAR): unchanged, resized only when the model's img_size differs."""
        if self.folder:
            img = F.resize(img, int(self.img_size / self.crop_pct), InterpolationMode.BICUBIC, antialias=True)
            return F.center_crop(img, [self.img_size, self.img_size])
        if tuple(img.shape[-2:]) != (self.img_size, self.img_size):
            img = F.resize(img, [self.img_size, self.img_size], InterpolationMode.BICUBIC, antialias=True)
        return img

    def __call__(self, img):
        if self.rrc:
            img = self.rrc[int(torch.randint(len(self.rrc), ()))](img)
        else:
            img = self.geometry(img)
        if self.flip:
            img = self.flip(img)
        if self.ra:
            img = self.ra(img)
        x = F.normalize(img.float() / 255.0, self.mean, self.std)
        if self.erase:
            x = self.erase(x)
        return x


class EpochSampler(torch.utils.data.Sampler):
    """Yields this rank's keys (index, augmentation seed) for one epoch, from step `start_step` on.
    Plain: a permutation seeded by (seed, epoch), cut into global batches (last partial one dropped); rank r takes
    the r-th chunk of every global batch, so 1 process with batch B and k processes with B/k each see the same
    samples in every step. Repeated augmentation: DeiT's RASampler (see ra_indices)."""

    def __init__(self, n, cfg, rank, world):
        self.n, self.seed, self.rank, self.world = n, cfg['seed'], rank, world
        self.B, self.b = cfg['global_batch_size'], cfg['per_process_batch_size']
        self.repeated = cfg['repeated_aug']
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    @property
    def steps(self):
        if self.repeated:
            return ra_num_selected(self.n, self.world) // self.b
        return self.n // self.B

    def indices(self):
        """This rank's sample indices for the epoch, steps * per-process batch of them."""
        if self.repeated:
            idx = ra_indices(self.n, self.world, self.rank, derive_seed(self.seed, self.epoch))
            return idx[:self.steps * self.b]
        return train_indices(self.n, self.B, self.world, self.rank, derive_seed(self.seed, self.epoch))

    def keys(self):
        idx = self.indices()
        if self.repeated:
            ## a copy of an image on another rank must get other augmentations: the rank enters the seed
            return [(int(i), derive_seed(self.seed, self.epoch, self.rank, p)) for p, i in enumerate(idx)]
        keys = []
        for p, i in enumerate(idx):
            s, j = divmod(p, self.b)
            gpos = s * self.B + self.rank * self.b + j  # position in the global order: same seed for any world size
            keys.append((int(i), derive_seed(self.seed, self.epoch, gpos)))
        return keys

    def __iter__(self):
        return iter(self.keys()[self.start_step * self.b:])

    def __len__(self):
        return (self.steps - self.start_step) * self.b


def train_indices(n, global_batch, world, rank, perm_seed):
    """This rank's indices for one epoch: rank r gets chunk r of each global batch of the permutation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    b = global_batch // world
    steps = n // global_batch
    perm = perm[:steps * global_batch].view(steps, world, b)  # (steps, world, b)
    return perm[:, rank].reshape(-1).tolist()


def ra_num_selected(n, world):
    return int(math.floor(n // 256 * 256 / world))


def ra_indices(n, world, rank, perm_seed, repeats=RA_REPEATS):
    """DeiT's RASampler: permutation, each index repeated `repeats` times in a row, padded to a multiple of the
    world size, rank r takes every world-th element from r (so the copies of an image land on different ranks
    when world >= repeats), and keeps the first floor(n // 256 * 256 / world).
    # deviation: DeiT seeds the permutation with the epoch only; here it is derived from (seed, epoch)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    idx = torch.repeat_interleave(perm, repeats).tolist()
    total = int(math.ceil(n * repeats / world)) * world
    idx += idx[:total - len(idx)]
    return idx[rank:total:world][:ra_num_selected(n, world)]


def eval_indices(n, world, rank):
    """Every validation sample exactly once across ranks: rank r takes r, r + world, ... (no padding).
    # deviation: DeiT's --dist-eval pads with DistributedSampler (a few images counted twice); here none are."""
    return list(range(rank, n, world))


def _worker_init(_):
    # Ctrl-C / SIGTERM go to the whole process group: workers ignore them and the main process stops cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, sampler, batch_size, workers, device):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=device.type == 'cuda', drop_last=False,
                                       persistent_workers=workers > 0, worker_init_fn=_worker_init)


def make_mix(cfg, num_classes):
    """MixUp (alpha 0.8) or CutMix (alpha 1.0), 50/50 per batch, as timm's Mixup(prob 1, switch 0.5, 'batch').
    # deviation: torchvision mixes a batch with batch.roll(1); timm mixes it with batch.flip(0)."""
    mixes = []
    if cfg['mixup'] > 0:
        mixes.append(v2.MixUp(alpha=cfg['mixup'], num_classes=num_classes))
    if cfg['cutmix'] > 0:
        mixes.append(v2.CutMix(alpha=cfg['cutmix'], num_classes=num_classes))
    return v2.RandomChoice(mixes) if len(mixes) > 1 else (mixes[0] if mixes else None)


def soft_targets(x, y, mix, num_classes, smoothing):
    """-> (x, soft targets): mixed one-hots, then label smoothing y (1 - eps) + eps / K as timm's mixup_target."""
    if mix is not None:
        x, t = mix(x, y)
    else:
        t = nnF.one_hot(y, num_classes).float()
    return x, t * (1.0 - smoothing) + smoothing / num_classes


def soft_cross_entropy(logits, target):
    """timm SoftTargetCrossEntropy: mean over the batch of -sum_k t_k log softmax(z)_k."""
    return torch.sum(-target * nnF.log_softmax(logits.float(), dim=-1), dim=-1).mean()


# ----------------------------------------------------------------------------------------------------------------
# data on the device: CIFAR as one uint8 tensor, the recipe's augmentation on whole batches

## ViT-Lite-7/4 costs ~1.5 GFLOP per training image, so one GPU trains on tens of thousands of CIFAR images per
## second, while per-image augmentation in CPU workers delivers a few thousand. Here the whole split lives on the
## device and each op of Transform runs once per batch with per-image random parameters (tensors of shape (B,)),
## in the same order: RandomResizedCrop -> h-flip -> RandAugment -> normalize -> RandomErasing (MixUp/CutMix act
## on batches in both paths). tests/test_device_data.py checks every batched op against the per-image op it
## replaces. The random draws are made on the CPU (a few hundred numbers per batch), so grouping the images by op
## never waits for the GPU; they reach the device through pinned memory, which keeps the copies asynchronous.

def to_device(t, device):
    """A small CPU tensor to `device` without stalling the GPU: a copy from pageable memory may wait for the
    stream to drain, a copy from pinned memory does not."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == 'cuda' else t.to(device)


def batched_grid_sample(x, u, v, bicubic, fill=None):
    """Sample float images x (B, C, H, W) at continuous input points (u, v) (B, Ho, Wo) (pixel i covers
    [i, i + 1)), bilinear or bicubic per image; neighbours at the border are clamped; a point outside the image
    gets `fill` (C,) when given. Rounded back to 0..255, as the per-image ops do when they return uint8.
    bicubic: (B,) bool on the CPU (deciding whether to run bicubic at all must not wait for the device)."""
    B, C, H, W = x.shape
    grid = torch.stack([2 * u / W - 1, 2 * v / H - 1], dim=-1)                           # (B, Ho, Wo, 2) in [-1, 1]
    out = nnF.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
    if bicubic.any():
        cubic = nnF.grid_sample(x, grid, mode='bicubic', padding_mode='border', align_corners=False)
        out = torch.where(to_device(bicubic, x.device).view(-1, 1, 1, 1), cubic, out)
    if fill is not None:
        inside = (u >= 0) & (u < W) & (v >= 0) & (v < H)
        out = torch.where(inside.unsqueeze(1), out, fill.view(1, -1, 1, 1))
    return out.round_().clamp_(0, 255)


def batched_pil_affine(x, M, bicubic, fill):
    """pil_affine for a batch: M (B, 6) holds each image's PIL matrix (a, b, c, d, e, f)."""
    B, C, H, W = x.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=x.device) + 0.5, torch.arange(W, device=x.device) + 0.5,
                            indexing='ij')                                                 # (H, W) output centres
    a, b, c, d, e, f = (m.view(B, 1, 1) for m in M.unbind(1))
    return batched_grid_sample(x, a * xs + b * ys + c, d * xs + e * ys + f, bicubic, fill)  # (B, H, W) input points


def batched_resized_crop(x, boxes, size, bicubic):
    """F.resized_crop(img, top, left, h, w, [size, size]) for a batch; boxes (B, 4) = (top, left, h, w).
    The output pixel centre u + 0.5 samples the input at left + (u + 0.5) w / size; clamping that point to the
    box's outer pixel centres is exactly crop-then-resize for bilinear.
    # deviation: bicubic here is grid_sample's kernel (a = -0.75), while the per-image antialiased resize uses
    # PIL's (a = -0.5), a few levels apart; and the box's two outer rows/columns see pixels beyond its edge."""
    top, left, h, w = (t.to(x.dtype).view(-1, 1, 1) for t in boxes.unbind(1))
    r = torch.arange(size, device=x.device, dtype=x.dtype) + 0.5
    u = (left + r.view(1, 1, -1) * w / size).clamp(left + 0.5, left + w - 0.5).expand(-1, size, size)
    v = (top + r.view(1, -1, 1) * h / size).clamp(top + 0.5, top + h - 0.5).expand(-1, size, size)
    return batched_grid_sample(x, u, v, bicubic)


def sample_boxes(n, height, width, scale, ratio, gen, fits):
    """torchvision's RandomResizedCrop / RandomErasing get_params for n images at once: 10 tries of an area
    fraction ~ U(scale) and a log-uniform aspect ratio, the first try that `fits` wins; (n, 4) = (top, left, h, w)
    and a (n,) bool 'a try fitted'. The position is uniform over the places where the box fits."""
    dev = gen.device
    area = height * width * torch.empty(n, 10, device=dev).uniform_(*scale, generator=gen)
    ratio_ = torch.exp(torch.empty(n, 10, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen))
    hw = (torch.round(torch.sqrt(area / ratio_)), torch.round(torch.sqrt(area * ratio_)))
    ok = fits(*hw)                                                                        # (n, 10)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)                                    # first fitting try
    h, w = (t.gather(1, first).squeeze(1) for t in hw)
    top = torch.floor(torch.rand(n, device=dev, generator=gen) * (height - h + 1))
    left = torch.floor(torch.rand(n, device=dev, generator=gen) * (width - w + 1))
    return torch.stack([top, left, h, w], 1).long(), ok.any(1)


def batched_rrc_boxes(n, height, width, scale, gen):
    """RandomResizedCrop boxes; when no try fits, torchvision's fallback: the centre crop, ratio clamped to
    (3/4, 4/3) (for a square image: the whole image)."""
    boxes, ok = sample_boxes(n, height, width, scale, (3 / 4, 4 / 3), gen,
                             lambda h, w: (w > 0) & (w <= width) & (h > 0) & (h <= height))
    side = min(height, width)  # deviation: the fallback assumes an image with aspect ratio within (3/4, 4/3)
    whole = boxes.new_tensor([(height - side) // 2, (width - side) // 2, side, side])
    return torch.where(ok.view(-1, 1), boxes, whole)


def batched_erasing_boxes(n, height, width, prob, gen):
    """RandomErasing(p, scale (0.02, 1/3), ratio (0.3, 1/0.3)) boxes; h = w = 0 where nothing is erased."""
    boxes, ok = sample_boxes(n, height, width, (0.02, 1 / 3), (0.3, 1 / 0.3), gen,
                             lambda h, w: (h < height) & (w < width))
    erase = ok & (torch.rand(n, device=gen.device, generator=gen) < prob)
    return boxes * erase.view(-1, 1)


def batched_erase(x, boxes, noise):
    """F.erase(img, top, left, h, w, noise) for a batch: box (top, left, h, w) of each image gets `noise`."""
    top, left, h, w = (t.view(-1, 1, 1) for t in boxes.unbind(1))
    rows = torch.arange(x.shape[-2], device=x.device).view(1, -1, 1)
    cols = torch.arange(x.shape[-1], device=x.device).view(1, 1, -1)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)         # (B, H, W)
    return torch.where(inside.unsqueeze(1), noise, x)


def _gray(x):
    """torchvision's rgb_to_grayscale of uint8 images, floored: (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).floor_().unsqueeze(1)


def _blend(x, other, factor):
    """torchvision's _blend for uint8 images with a per-image factor (B, 1, 1, 1); .to(uint8) truncates."""
    return (x * factor + other * (1 - factor)).clamp_(0, 255).trunc_()


def _sharpness(x, factor):
    """torchvision's adjust_sharpness: blend with a 3x3 smoothing (1s around a 5, / 13); border pixels kept."""
    C = x.shape[1]
    kernel = x.new_tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    blurred = nnF.conv2d(x, kernel.expand(C, 1, 3, 3), groups=C).round_()                 # (B, C, H-2, W-2)
    out = x.clone()
    inner = out[..., 1:-1, 1:-1]
    inner.copy_((inner * factor + blurred * (1 - factor)).clamp_(0, 255).trunc_())
    return out


def _autocontrast(x):
    """torchvision's autocontrast: stretch each channel of each image to 0..255."""
    lo, hi = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, 1.0, (hi - lo) * (1.0 / 255))
    return ((x - torch.where(flat, 0.0, lo)) / scale).clamp_(0, 255).trunc_()


## one batched function per op of ra_apply: (images (b, 3, H, W), op argument (b, 1, 1, 1)) -> images
BATCHED_COLOR_OPS = {
    'AutoContrast': lambda x, a: _autocontrast(x),
    'Equalize': lambda x, a: F.equalize(x.to(torch.uint8)).to(x.dtype),  # torchvision's already works per image
    'Invert': lambda x, a: 255 - x,
    'PosterizeIncreasing': lambda x, a: torch.floor(x / 2 ** (8 - a)) * 2 ** (8 - a),   # keep the top `a` bits
    'SolarizeIncreasing': lambda x, a: torch.where(x >= a, 255 - x, x),
    'SolarizeAdd': lambda x, a: torch.where(x < 128, (x + a).clamp(max=255), x),
    'ColorIncreasing': lambda x, a: _blend(x, _gray(x), a),
    'ContrastIncreasing': lambda x, a: _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), a),
    'BrightnessIncreasing': lambda x, a: _blend(x, torch.zeros_like(x), a),
    'SharpnessIncreasing': _sharpness,
}


def batched_level_to_arg(op, magnitude, sign):
    """ra_level_to_arg for per-image tensors (B,): op index into RA_OPS, magnitude in [0, 10], sign +-1."""
    level, k = magnitude / 10.0, {name: i for i, name in enumerate(RA_OPS)}
    cases = [(('Rotate',), sign * 30.0 * level),
             (('ShearX', 'ShearY'), sign * 0.3 * level),
             (('TranslateXRel', 'TranslateYRel'), sign * 0.45 * level),
             (('ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing'),
              (1.0 + sign * 0.9 * level).clamp(min=0.1)),
             (('PosterizeIncreasing',), 4 - torch.floor(4 * level)),
             (('SolarizeIncreasing',), 256 - torch.floor(256 * level).clamp(max=256)),
             (('SolarizeAdd',), torch.floor(110 * level).clamp(max=128))]
    arg = torch.zeros_like(level)
    for names, value in cases:
        arg = torch.where(torch.isin(op, torch.tensor([k[n] for n in names])), value, arg)
    return arg


def batched_pil_matrices(op, arg, H, W):
    """(B, 6) PIL matrices (a, b, c, d, e, f) of the geometric ops, as in ra_apply, for per-image op indices
    `op` and arguments `arg` (B,); identity for the other ops."""
    k = {name: i for i, name in enumerate(RA_OPS)}
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    t = -torch.deg2rad(arg)
    cos, sin, cx, cy = torch.cos(t), torch.sin(t), W / 2.0, H / 2.0
    cases = {'Rotate': (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy),  # pil_rotate_matrix
             'ShearX': (one, arg, zero, zero, one, zero), 'ShearY': (one, zero, zero, arg, one, zero),
             'TranslateXRel': (one, zero, arg * W, zero, one, zero),
             'TranslateYRel': (one, zero, zero, zero, one, arg * H)}
    M = torch.stack((one, zero, zero, zero, one, zero), 1)
    for name, row in cases.items():
        M = torch.where((op == k[name]).view(-1, 1), torch.stack(row, 1), M)
    return M


GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def batched_randaugment_op(x, op, arg, bicubic, fill):
    """ra_apply for a batch on any device: image i gets op RA_OPS[op[i]] (-1: none) with argument arg[i].
    op, arg, bicubic: (B,) CPU tensors (the draws), so grouping the images by op needs no device sync;
    each op runs once, on the images that drew it."""
    out = x.clone()
    geo = torch.isin(op, torch.tensor([RA_OPS.index(n) for n in GEOMETRIC_OPS])).nonzero().squeeze(1)
    if geo.numel():
        M = batched_pil_matrices(op[geo], arg[geo], *x.shape[-2:])
        i = to_device(geo, x.device)
        out[i] = batched_pil_affine(x[i], to_device(M, x.device), bicubic[geo], fill)
    for name, fn in BATCHED_COLOR_OPS.items():
        sel = (op == RA_OPS.index(name)).nonzero().squeeze(1)
        if sel.numel():
            i = to_device(sel, x.device)
            out[i] = fn(x[i], to_device(arg[sel].view(-1, 1, 1, 1), x.device))
    return out


class BatchedTransform:
    """Transform(train=True) for whole uint8 batches (B, 3, H, W) on any device: the same ops, order and
    distributions, each image with its own draws. The draws come from the CPU generator `gen` (a few hundred
    numbers per batch, and no device sync to group images by op); the erasing noise from `noise_gen`, a
    generator on the batch's device."""

    def __init__(self, transform, cfg):
        self.t = transform  # the per-image Transform: img_size, mean/std and which ops are on
        self.crop_scale = cfg['rrc_scale'] if transform.rrc else None
        self.bicubic_p = {'random': 0.5, 'bicubic': 1.0}.get(cfg['interpolation'], 0.0)  # Transform.rrc's modes
        self.hflip = cfg['hflip'] if transform.flip else 0.0
        self.reprob = cfg['reprob'] if transform.erase else 0.0
        self.mean, self.std = (torch.tensor(v).view(1, -1, 1, 1) for v in (transform.mean, transform.std))
        self.fill = torch.tensor(transform.ra.fill) if transform.ra else None
        if transform.ra:  # RandAugment's geometric ops pick one of its interpolations at random
            modes = transform.ra.interpolations
            self.ra_bicubic_p = sum(m == InterpolationMode.BICUBIC for m in modes) / len(modes)

    def draw_randaug(self, B, gen):
        """RandAugment's draws for B images, one (op, arg, bicubic) triple of (B,) tensors per op slot:
        op uniform over RA_OPS with replacement, -1 (skipped) with prob 1 - p; magnitude ~ N(m, std) clipped
        to [0, 10]; random sign; the interpolation of the geometric ops at random from RandAugment's."""
        ra, draws = self.t.ra, []
        for _ in range(ra.num_ops):
            op = torch.randint(len(RA_OPS), (B,), generator=gen)
            op = torch.where(torch.rand(B, generator=gen) <= ra.prob, op, -1)
            m = (ra.magnitude + ra.magnitude_std * torch.randn(B, generator=gen)).clamp(0, 10)
            sign = torch.where(torch.rand(B, generator=gen) > 0.5, -1.0, 1.0)
            bicubic = torch.rand(B, generator=gen) < self.ra_bicubic_p
            draws.append((op, batched_level_to_arg(op, m, sign), bicubic))
        return draws

    def __call__(self, img, gen, noise_gen):
        B, dev = img.shape[0], img.device
        rand = lambda: torch.rand(B, generator=gen)
        to_dev = lambda t: to_device(t, dev)
        x = img.float()
        if self.crop_scale is not None:
            boxes = batched_rrc_boxes(B, *x.shape[-2:], self.crop_scale, gen)
            x = batched_resized_crop(x, to_dev(boxes), self.t.img_size, rand() < self.bicubic_p)
        elif tuple(x.shape[-2:]) != (self.t.img_size,) * 2:
            x = self.t.geometry(x.to(torch.uint8)).float()
        if self.hflip > 0:
            x = torch.where(to_dev(rand() < self.hflip).view(-1, 1, 1, 1), x.flip(-1), x)
        if self.t.ra:
            fill = to_dev(self.fill)
            for op, arg, bicubic in self.draw_randaug(B, gen):
                x = batched_randaugment_op(x, op, arg, bicubic, fill)
        x = (x / 255.0 - to_dev(self.mean)) / to_dev(self.std)                          # F.normalize
        if self.reprob > 0:
            boxes = batched_erasing_boxes(B, *x.shape[-2:], self.reprob, gen)
            x = batched_erase(x, to_dev(boxes), torch.randn(x.shape, device=dev, generator=noise_gen))
        return x


class DeviceBatches:
    """This rank's batches straight from uint8 images held on the device.
    Train (sampler given): the EpochSampler's indices, i.e. the same shard of the same per-epoch permutation as
    the per-image path, augmented by BatchedTransform with generators seeded by (seed, epoch, step, rank).
    Eval (indices given): the eval geometry and normalization only."""

    def __init__(self, dataset, device, batch_size, transform, cfg, sampler=None, indices=None):
        self.images = dataset.images.to(device)                                         # (n, 3, H, W) uint8
        self.labels = dataset.labels.to(device)
        self.b, self.t, self.cfg, self.sampler = batch_size, transform, cfg, sampler
        self.batched = BatchedTransform(transform, cfg) if sampler is not None else None
        self.indices = None if indices is None else torch.tensor(indices, dtype=torch.long)
        self.gen, self.noise_gen = torch.Generator(), torch.Generator(device)

    def __iter__(self):
        dev = self.images.device
        if self.sampler is None:  # eval
            for i in self.indices.split(self.b):
                i = to_device(i, dev)
                x = self.t.geometry(self.images[i])
                yield F.normalize(x.float() / 255.0, self.t.mean, self.t.std), self.labels[i]
            return
        s = self.sampler
        idx = torch.tensor(s.indices(), dtype=torch.long).view(s.steps, s.b)               # (steps, b)
        for step in range(s.start_step, s.steps):
            seed = derive_seed(self.cfg['seed'], s.epoch, step, s.rank, 'device-aug')
            self.gen.manual_seed(seed)
            self.noise_gen.manual_seed(seed)
            i = to_device(idx[step], dev)
            yield self.batched(self.images[i], self.gen, self.noise_gen), self.labels[i]


# ----------------------------------------------------------------------------------------------------------------
# schedule / optimizer

def lr_at(epoch, cfg):
    """timm CosineLRScheduler stepped per epoch (lr constant within an epoch): linear warm-up from warmup_lr,
    then min_lr + 1/2 (lr - min_lr)(1 + cos(pi e / epochs)) with e the absolute epoch, then min_lr (cool-down).
    # deviation: DeiT's main.py calls scheduler.step(epoch) at the END of epoch e, so its epoch e >= 1 runs at
    # lr(e - 1); here epoch e runs at lr(e), as timm's train.py (CCT) does."""
    lr, min_lr, warm, epochs = cfg['lr'], cfg['min_lr'], cfg['warmup_epochs'], cfg['epochs']
    if epoch < warm:
        return cfg['warmup_lr'] + epoch * (lr - cfg['warmup_lr']) / warm
    if epoch >= epochs:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def weight_decay_split(model, skip_names):
    """(decay, no_decay) parameter names: no decay for 1-D parameters (norms), biases and `skip_names`
    (DeiT: model.no_weight_decay() = pos_embed, cls_token; ViT-Lite/CCT: none, so its PE and cls token decay)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith('.bias') or name in skip_names else decay).append(name)
    return decay, no_decay


def make_optimizer(model, cfg, device):
    skip = set(model.no_weight_decay()) if cfg['skip_no_weight_decay'] else set()
    decay, no_decay = weight_decay_split(model, skip)
    params = dict(model.named_parameters())
    groups = [dict(params=[params[n] for n in no_decay], weight_decay=0.0),
              dict(params=[params[n] for n in decay], weight_decay=cfg['weight_decay'])]
    return torch.optim.AdamW(groups, lr=cfg['lr'], betas=(0.9, 0.999), eps=1e-8,
                             fused=True if device.type == 'cuda' else None)


# ----------------------------------------------------------------------------------------------------------------
# DDP helpers

def dist_env():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for a plain `python train.py`."""
    return int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('LOCAL_RANK', 0))


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce(t, op=None):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


STOP = {'signal': None}  # set by the SIGTERM / SIGINT handler, read between steps


def _on_signal(signum, _frame):
    STOP['signal'] = signal.Signals(signum).name
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
    print(f'\n{STOP["signal"]} received: finishing the current step, then saving last.pt '
          f'(send it again to quit immediately)', file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# train / eval loop

@torch.no_grad()
def evaluate(model, loader, device, autocast):
    """top-1 / top-5 in % over the whole validation set, counts summed over ranks (each sample counted once)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.long, device=device)  # correct@1, correct@5, n
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits = model(x)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, 5)
        hit = top == y[:, None]
        counts += torch.stack([hit[:, :1].sum(), hit.sum(), torch.tensor(len(y), device=device)])
    model.train(was_training)
    c1, c5, n = all_reduce(counts).tolist()
    return 100.0 * c1 / max(n, 1), 100.0 * c5 / max(n, 1), n


def sync_status(first_bad, device, world):
    """(stop requested on any rank, first non-finite step or -1): one small all-reduce + one .item() sync."""
    t = torch.stack([torch.tensor(1 if STOP['signal'] else 0, device=device), first_bad.to(device)])
    if world > 1:
        all_reduce(t, dist.ReduceOp.MAX)
    stop, bad = t.tolist()
    return bool(stop), int(bad)


def train(cfg, raw_model, model, optimizer, loaders, sampler, state, device, rank, world, autocast):
    """The epoch loop. state: epoch, step, loss_sum, best_top1, best_epoch (restored by --resume)."""
    num_classes = cfg['model_kwargs']['num_classes']
    mix = make_mix(cfg, num_classes)
    out = cfg['output_dir']
    last_good = None if state['epoch'] == 0 and state['step'] == 0 else os.path.join(out, 'last.pt')
    steps = sampler.steps
    progress = rank == 0 and not cfg['no_progress'] and sys.stderr.isatty()
    for epoch in range(state['epoch'], cfg['total_epochs']):
        lr = lr_at(epoch, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        start = state['step'] if epoch == state['epoch'] else 0
        sampler.set_epoch(epoch, start)
        loss_sum = torch.zeros((), device=device)
        if start and rank == 0:
            loss_sum += state['loss_sum']  # the finished part of an interrupted epoch (summed over ranks)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        t0 = time.time()
        pbar = tqdm(total=steps, initial=start, desc=f'epoch {epoch}', disable=not progress, leave=False)
        stop = False
        model.train()
        for step, (x, y) in enumerate(loaders['train'], start=start):
            gstep = epoch * steps + step
            ## every step's randomness (MixUp/CutMix, drop-path, dropout) is a function of (seed, epoch, step, rank)
            torch.manual_seed(derive_seed(cfg['seed'], epoch, step, rank, 'step'))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x, target = soft_targets(x, y, mix, num_classes, cfg['smoothing'])
            with autocast:
                logits = model(x)
            loss = soft_cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss = loss.detach()
            loss_sum += loss
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), gstep, first_bad)  # no sync
            pbar.update(1)
            last = step + 1 == steps
            if (step + 1) % cfg['log_interval'] == 0 or last or (world == 1 and STOP['signal']):
                stop, bad = sync_status(first_bad, device, world)
                if bad >= 0:
                    where = (f'the last good checkpoint is {last_good}' if last_good else
                             'no checkpoint was written yet')
                    raise UserError(f'non-finite training loss at global step {bad} (epoch {epoch}); stopping. '
                                    f'{where}. Lower --lr or check the data.')
                if progress:
                    pbar.set_postfix(loss=f'{loss.item():.4f}', lr=f'{lr:.2e}',
                                     img_s=f'{(step + 1 - start) * cfg["global_batch_size"] / (time.time() - t0):.0f}')
                if stop and not last:
                    pbar.close()
                    loss_sum = all_reduce(loss_sum)
                    save_checkpoint(cfg, raw_model, optimizer, epoch, step + 1, loss_sum, state, rank, best=False)
                    barrier()
                    raise Stopped(f'stopped by {STOP["signal"] or "a signal on another rank"} at epoch {epoch}, '
                                  f'step {step + 1}/{steps}; {os.path.join(out, "last.pt")} written. Continue with '
                                  f'the same command plus --resume auto (the finished steps are skipped).')
        pbar.close()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        train_time = time.time() - t0
        train_loss = all_reduce(loss_sum).item() / (world * steps)
        top1, top5, n = evaluate(raw_eval_model(model), loaders['val'], device, autocast)
        line = dict(epoch=epoch, train_loss=round(train_loss, 6), val_top1=round(top1, 4), val_top5=round(top5, 4),
                    val_n=n, lr=lr, img_per_s=round((steps - start) * cfg['global_batch_size'] / train_time, 1),
                    epoch_time_s=round(time.time() - t0, 2))
        improved = top1 > state['best_top1']
        if improved:
            state['best_top1'], state['best_epoch'] = top1, epoch
        save_checkpoint(cfg, raw_model, optimizer, epoch + 1, 0, None, state, rank, best=improved)
        last_good = os.path.join(out, 'last.pt')
        if rank == 0:
            print(json.dumps(line), flush=True)
            with open(os.path.join(out, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(line) + '\n')
        stop, _ = sync_status(first_bad, device, world)
        if stop and epoch + 1 < cfg['total_epochs']:
            barrier()
            raise Stopped(f'stopped by {STOP["signal"] or "a signal on another rank"} after epoch {epoch}; '
                          f'{last_good} written. Continue with the same command plus --resume auto.')
    return state


class Stopped(Exception):
    """Clean stop after SIGTERM / SIGINT (checkpoint written)."""


def raw_eval_model(model):
    ## evaluate without the DDP wrapper: ranks see different numbers of batches, DDP's forward could sync
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------------------------
# checkpointing

def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a reader never sees half a file."""
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(cfg, raw_model, optimizer, epoch, step, loss_sum, state, rank, best):
    """last.pt (and best.pt on a new best top-1); (epoch, step) = where training continues."""
    if rank != 0:
        return
    ckpt = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), config=cfg, epoch=epoch, step=step,
                loss_sum=None if loss_sum is None else loss_sum.detach().cpu(),
                best_top1=state['best_top1'], best_epoch=state['best_epoch'],
                rng=dict(python=random.getstate(), torch=torch.get_rng_state(),
                         cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
    atomic_save(ckpt, os.path.join(cfg['output_dir'], 'last.pt'))
    if best:
        atomic_save(ckpt, os.path.join(cfg['output_dir'], 'best.pt'))


def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        missing = {'model', 'config', 'optimizer', 'epoch'} - set(ckpt)
        if missing:
            raise KeyError(f'missing {sorted(missing)}')
    except Exception as e:
        raise UserError(f'cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:300]}). It is '
                        f'not a complete train.py checkpoint (truncated, corrupt or another format); point --resume '
                        f'at another file (best.pt, or an older copy) or start a new run without --resume.')
    return ckpt


IDENTITY_KEYS = ('model', 'pe', 'model_kwargs', 'data')


def check_resume_compatible(saved, cfg, path):
    diffs = [f'{k}: checkpoint {saved.get(k)!r} vs this run {cfg[k]!r}' for k in IDENTITY_KEYS if saved.get(k) != cfg[k]]
    if diffs:
        raise UserError(f'refusing to resume {path}: it belongs to a different run ({"; ".join(diffs)}). Use the '
                        f'same --model/--pe/knob/architecture/--data flags as the run that wrote it, or a new '
                        f'--output-dir without --resume.')


# ----------------------------------------------------------------------------------------------------------------
# main

def run(args):
    rank, world, local_rank = dist_env()
    cfg = resolve_config(args, world)  # checks the batch before any process group exists
    if args.eval_only and not args.resume:
        raise UserError('--eval-only needs --resume PATH (or --resume auto) to know which weights to evaluate.')
    if world > 1:
        backend = 'nccl' if torch.cuda.is_available() else 'gloo'
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 parts
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device('cpu')
    # deviation: bf16 autocast on CUDA (DeiT and CCT used fp16 autocast + GradScaler); CPU runs stay fp32
    use_amp = cfg['amp'] and device.type == 'cuda'
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    out = cfg['output_dir']

    ## the model: same seed on all ranks, so every rank builds the same initial weights
    torch.manual_seed(cfg['seed'])
    random.seed(cfg['seed'])
    try:
        raw_model = mpvg.create_model(cfg['model'], pe=cfg['pe'], **cfg['model_kwargs'])
    except ValueError as e:
        raise UserError(f'cannot build the model: {e}')
    raw_model.to(device)
    img_size = raw_model.cfg.img_size
    cfg['img_size_resolved'] = img_size
    cfg['num_params'] = sum(p.numel() for p in raw_model.parameters())

    ## data
    train_set, val_set = load_data(cfg, img_size, local_rank)
    info = DATASETS[cfg['data']]
    folder = cfg['data'] == 'imagenet'
    workers = cfg['workers'] if cfg['workers'] is not None else min(8, os.cpu_count() or 1)
    sampler = EpochSampler(len(train_set), cfg, rank, world)
    if cfg['device_data'] == 'on' and not isinstance(train_set, TensorImages):
        raise UserError(f'--device-data on needs an in-memory dataset (cifar100, synthetic); --data {cfg["data"]} '
                        f'is read from image files. Use --device-data off (or auto).')
    on_device = cfg['device_data'] == 'on' or (cfg['device_data'] == 'auto' and device.type == 'cuda'
                                               and cfg['data'] == 'cifar100')
    cfg['device_data_resolved'] = on_device
    val_tf = Transform(cfg, img_size, info['mean'], info['std'], train=False, folder=folder)
    val_indices = eval_indices(len(val_set), world, rank)
    if on_device:
        val_loader = DeviceBatches(val_set, device, cfg['per_process_batch_size'], val_tf, cfg, indices=val_indices)
    else:
        val_loader = make_loader(Augmented(val_set, val_tf), [(i, 0) for i in val_indices],
                                 cfg['per_process_batch_size'], workers, device)
    loaders = dict(val=val_loader)
    cfg['steps_per_epoch'] = sampler.steps
    cfg['train_size'], cfg['val_size'] = len(train_set), len(val_set)
    if sampler.steps == 0 and not args.eval_only:
        raise UserError(f'the training set has {len(train_set)} images: not one full global batch of '
                        f'{cfg["global_batch_size"]}' + (' after repeated augmentation keeps '
                        f'floor(n // 256 * 256 / world) = {ra_num_selected(len(train_set), world)} per rank'
                        if cfg['repeated_aug'] else '') + '. Lower --global-batch-size (or --no-repeated-aug).')

    optimizer = make_optimizer(raw_model, cfg, device)
    state = dict(epoch=0, step=0, loss_sum=None, best_top1=-1.0, best_epoch=-1)
    resume = os.path.join(out, 'last.pt') if args.resume == 'auto' else args.resume
    if resume and not os.path.exists(resume):
        if args.resume != 'auto' or args.eval_only:
            raise UserError(f'--resume {args.resume}: {resume} does not exist.')
        resume = None
    if resume:
        ckpt = load_checkpoint(resume)
        check_resume_compatible(ckpt['config'], cfg, resume)
        try:
            raw_model.load_state_dict(ckpt['model'])
            if not args.eval_only:
                optimizer.load_state_dict(ckpt['optimizer'])
        except Exception as e:
            raise UserError(f'checkpoint {resume} does not fit this model/optimizer ({type(e).__name__}: '
                            f'{str(e).splitlines()[0][:300]}).')
        state.update(epoch=ckpt['epoch'], step=ckpt.get('step', 0), loss_sum=ckpt.get('loss_sum'),
                     best_top1=ckpt.get('best_top1', -1.0), best_epoch=ckpt.get('best_epoch', -1))
        rng = ckpt.get('rng') or {}
        if rng.get('python') is not None:
            random.setstate(rng['python'])
        if rng.get('torch') is not None:
            torch.set_rng_state(rng['torch'])
        if rank == 0:
            print(f'resumed {resume}: epoch {state["epoch"]}, step {state["step"]}', file=sys.stderr)

    if args.eval_only:
        top1, top5, n = evaluate(raw_model, loaders['val'], device, autocast)
        if rank == 0:
            print(json.dumps(dict(eval=resume, val_top1=round(top1, 4), val_top5=round(top5, 4), val_n=n)), flush=True)
        return

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, _on_signal)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        print(json.dumps(dict(config=cfg)), flush=True)
        atomic_save_text(json.dumps(cfg, indent=2), os.path.join(out, 'config.json'))
        truncate_log(os.path.join(out, 'log.jsonl'), state['epoch'])
    barrier()

    model = torch.compile(raw_model) if cfg['compile'] else raw_model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == 'cuda' else None)
    train_tf = Transform(cfg, img_size, info['mean'], info['std'], train=True, folder=folder)
    if on_device:
        loaders['train'] = DeviceBatches(train_set, device, cfg['per_process_batch_size'], train_tf, cfg,
                                         sampler=sampler)
    else:
        loaders['train'] = make_loader(Augmented(train_set, train_tf), sampler, cfg['per_process_batch_size'],
                                       workers, device)
    state = train(cfg, raw_model, model, optimizer, loaders, sampler, state, device, rank, world, autocast)
    if rank == 0:
        print(json.dumps(dict(summary=True, best_top1=round(state['best_top1'], 4), best_epoch=state['best_epoch'],
                              epochs=cfg['total_epochs'], output_dir=out)), flush=True)


def atomic_save_text(text, path):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        f.write(text + '\n')
    os.replace(tmp, path)


def truncate_log(path, epoch):
    """On resume keep only the log lines of the epochs before `epoch` (a line written after the last checkpoint
    would otherwise appear twice)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get('epoch', -1) < epoch]
    atomic_save_text(''.join(lines).rstrip('\n'), path) if lines else os.remove(path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    rank = dist_env()[0]
    code = 0
    STOP['signal'] = None
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        run(args)
    except UserError as e:
        prefix = f'[rank {rank}] ' if dist_env()[1] > 1 else ''
        msg = str(e)
        if msg.startswith('Caught UserError'):  # raised in a DataLoader worker: the message comes wrapped in the
            msg = msg.rsplit('UserError: ', 1)[-1].strip()  # worker's traceback; keep our own sentence
        print(f'{prefix}error: {msg}', file=sys.stderr, flush=True)
        code = 2
    except Stopped as e:
        if rank == 0:
            print(str(e), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print('interrupted before training started; nothing saved.', file=sys.stderr)
        code = 130
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        ## After an exception out of the data loader (e.g. an unreadable image) its workers may still be alive, and
        ## they ignore SIGTERM (_worker_init), so the interpreter's exit, which terminates and then joins them, would
        ## wait forever. Everything is saved by now: collect the loader, then end any worker that is left.
        gc.collect()
        for p in multiprocessing.active_children():
            p.kill()
            p.join()
    sys.exit(code)


if __name__ == '__main__':
    main()

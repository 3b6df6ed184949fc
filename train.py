"""
Train the ViT variants of mpvg.py with the recipes of the MPVG paper (Lee, Ham and Kim, AAAI 2025, Table 7).

    python train.py --data synthetic --epochs 2 --cooldown-epochs 0 --warmup-epochs 0   # offline smoke test, CPU ok
    python train.py --pe mpvg                                                           # ViT-Lite-7/4, CIFAR-100, 1 GPU
    torchrun --standalone --nproc_per_node 4 train.py --pe mpvg                         # same run on 4 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --master_addr HOST --master_port 29500 \
        train.py --model deit_tiny --pe mpvg --data-path /data/imagenet                 # DeiT-Ti, 2 nodes x 8 GPUs

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) it runs DistributedDataParallel (nccl on CUDA, gloo on CPU).
--global-batch-size is the batch of ONE optimizer step summed over all processes (each gets global / world_size).
Data: an in-memory set (CIFAR-100, synthetic) lives on the training device as uint8; an ImageFolder (ImageNet) is
decoded and randomly cropped per image in DataLoader workers; the rest of the recipe's augmentation runs on whole
batches on the training device, each op written once, as Pillow computes it (all of it in augment.py). Every random
draw is a pure function of (seed, epoch, step or sample position, rank): that makes --resume exact.

Sections: config/CLI + input checks, data, loss/schedule/optimizer, DDP helpers, run folder (provenance,
checkpoints), train/eval loop, main. `##` comments teach; `#` comments are functional; `# deviation:` marks every
departure from the official code.
"""
import argparse
import contextlib
import errno
import fcntl
import gc
import hashlib
import io
import json
import math
import multiprocessing
import os
import pathlib
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as nnF
import torchvision
from tqdm import tqdm

import augment
import mpvg


class UserError(Exception):
    """Bad input or an unrecoverable run state: main() prints the message as one paragraph, no traceback."""


# ----------------------------------------------------------------------------------------------------------------
# config / CLI

## The two official recipes (the paper's Table 7, as the official code runs them). A model's defaults are its
## recipe; most values are flags.
RECIPES = {
    ## Compact-Transformers `cifar100.yml` (timm train.py): lr not scaled, PE and cls token decayed; the scheduler is
    ## stepped with epoch + 1 after epoch e (lr_epoch_lag 0); the loader mixes uint8 batches, then erases (mix_first).
    'vit_lite': dict(data='cifar100', epochs=300, cooldown_epochs=10, global_batch_size=128, lr=6e-4,
                     lr_base_batch=None, warmup_epochs=10, warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.06,
                     skip_no_weight_decay=False, rrc_scale=(0.8, 1.0), interpolation='random',
                     repeated_aug=False, eval_crop_pct=0.875, lr_epoch_lag=0, mix_first=True),
    ## DeiT / LaPE `main.py`: lr = 5e-4 * global_batch / 512, no decay for model.no_weight_decay(); step(epoch)
    ## after epoch e, so epoch e >= 1 trains at lr(e - 1); images are erased, then batches mixed; its loop never
    ## reaches the cool-down epochs. Eval crop: LaPE's 1.0 (the paper's vit/lape DeiT rows are LaPE's; DeiT: 0.875).
    'deit': dict(data='imagenet', epochs=300, cooldown_epochs=0, global_batch_size=1024, lr=5e-4,
                 lr_base_batch=512, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05,
                 skip_no_weight_decay=True, rrc_scale=(0.08, 1.0), interpolation='bicubic',
                 repeated_aug=True, eval_crop_pct=1.0, lr_epoch_lag=1, mix_first=False),
}
COMMON_RECIPE = dict(smoothing=0.1, mixup=0.8, cutmix=1.0, reprob=0.25, hflip=0.5, randaug='rand-m9-mstd0.5-inc1')

DATASETS = {
    'cifar100': dict(num_classes=100, mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761)),
    'imagenet': dict(num_classes=1000, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    'synthetic': dict(num_classes=10, mean=(0.25, 0.25, 0.25), std=(0.25, 0.25, 0.25)),
}
GET_CIFAR = ('mkdir -p {root} && curl -L ' + augment.CIFAR100_URL + ' | tar xz -C {root}, or train offline on '
             'generated data with --data synthetic')
IMAGENET_LAYOUT = ('Expected ImageNet-1K as ImageFolders {root}/train/<class>/<image> and {root}/val/<class>/<image>; '
                   'it cannot be downloaded automatically: get ILSVRC2012 from https://image-net.org.')

ARCH_FLAGS = {d: d + '_rate' if d in ('drop_path', 'attn_drop') else d for d in ('img_size', 'patch_size', 'embed_dim',
              'depth', 'num_heads', 'mlp_ratio', 'drop_path', 'attn_drop')}  # CLI dest -> create_model keyword
## What identifies a run (never changes on resume) and what a resume may change on purpose (--allow-change).
IDENTITY = ('model', 'pe', 'model_kwargs', 'data', 'synthetic_size', 'classes')
CHANGEABLE = ('epochs', 'cooldown_epochs', 'global_batch_size', 'lr', 'min_lr', 'warmup_epochs', 'warmup_lr',
              'weight_decay', 'smoothing', 'mixup', 'cutmix', 'reprob', 'hflip', 'randaug', 'random_crop',
              'rrc_scale', 'repeated_aug', 'eval_crop_pct', 'seed')
EPOCH_BOUNDARY_ONLY = ('global_batch_size', 'repeated_aug', 'seed')  # they change how an epoch is cut into steps
RUN_FILES = ('config.json', 'log.jsonl', 'last.pt', 'best.pt', 'summary.json')
TORN_FILE = '(' + '|'.join(map(re.escape, RUN_FILES)) + r')\.tmp\d+'  # atomic_write's temporary file, left by a kill
CPUS = os.cpu_count() or 1


def flag(key):
    return '--' + key.replace('_', '-')


def show(v):
    return ' '.join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's page-long usage block
        self.exit(2, f'error: {message}. See python train.py --help.\n')


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": those defaults are the recipe's, in the text
        return action.help if action.default in (None, False, argparse.SUPPRESS) else super()._get_help_string(action)


def recipe_help(key, text):
    v = {r: show({**COMMON_RECIPE, **RECIPES[r]}[key]) for r in RECIPES}
    return f'{text} (default: vit_lite {v["vit_lite"]}; deit {v["deit"]})'.strip()


def build_parser():
    p = Parser(description='Train ViT-Lite / DeiT with the PE variants of mpvg.py (MPVG, AAAI 2025). Defaults are the '
                           'paper recipe of --model; every recipe value can be overridden.',
               epilog='--global-batch-size is the batch of one optimizer step summed over ALL processes. SIGTERM / '
                      'SIGINT: the current step finishes, last.pt is written and the run exits 0; --resume auto '
                      'continues exactly. Smoke test (offline, CPU): python train.py --data synthetic --epochs 2 '
                      '--cooldown-epochs 0 --warmup-epochs 0',
               formatter_class=HelpFormatter, allow_abbrev=False)
    BOOL, knob = argparse.BooleanOptionalAction, 'override the preset: '

    def int_or_none(s):
        return None if s.lower() == 'none' else int(s)

    g = p.add_argument_group('model')
    g.add_argument('--model', default='vit_lite_7_4', choices=sorted(mpvg.MODELS))
    g.add_argument('--pe', default='mpvg', choices=sorted(mpvg.PE_PRESETS), help='PE variant preset')
    g.add_argument('--num-classes', type=int, help='classifier outputs (default: the data\'s classes: cifar100 100, '
                   'synthetic 10, an image folder its class folders)')
    g.add_argument('--pool', choices=['cls', 'gap'], help=knob + 'pooling')
    g.add_argument('--pe-at-input', action=BOOL, help=knob + 'add pos_0 to the tokens before layer 0')
    ## 'none' is a value of these two, so "not given" is their absence (SUPPRESS)
    g.add_argument('--layerwise-from', type=int_or_none, default=argparse.SUPPRESS, metavar='L|none',
                   help=knob + 'first layer adding LN\'_l(PE) to its MSA input')
    g.add_argument('--hierarchical', action=BOOL, help=knob + 'pe_l = LN\'_l(pe_{l-1}) vs LN\'_l(pos_0)')
    g.add_argument('--last-ln-pe', type=int_or_none, default=argparse.SUPPRESS, metavar='K|none',
                   help=knob + 'PE added after the Last LN (0 = pos_0, MPVG)')
    for name in ARCH_FLAGS:
        g.add_argument(flag(name), type=float if name in ('mlp_ratio', 'drop_path', 'attn_drop') else int,
                       help='architecture override (default: the model\'s)')
    g = p.add_argument_group('data')
    g.add_argument('--data', choices=sorted(DATASETS), help=recipe_help('data', 'synthetic = generated, offline'))
    g.add_argument('--data-path', default='./data', help='folder holding cifar-100-python/ (downloaded if missing), '
                                                         'or ImageNet\'s train/ and val/ class folders')
    g.add_argument('--download', action=BOOL, default=True, help='download CIFAR-100 when it is missing')
    g.add_argument('--synthetic-size', type=int, default=1024, help='train images of --data synthetic (val: 1/4)')
    g.add_argument('--workers', type=int, help='image-folder decoding processes per rank (default: min(8, cpus))')
    g = p.add_argument_group('recipe (default: the paper recipe of --model)')
    for key, typ, text in [
            ('epochs', int, 'cosine epochs'), ('cooldown_epochs', int, 'epochs at min lr after the cosine'),
            ('global_batch_size', int, 'images per optimizer step summed over all processes'),
            ('lr', float, 'peak lr; deit scales it by global batch / 512, as DeiT\'s main.py (config.json holds '
                          'lr_base and the lr used)'), ('min_lr', float, ''),
            ('warmup_epochs', int, ''), ('warmup_lr', float, ''), ('weight_decay', float, ''),
            ('smoothing', float, 'label smoothing'), ('mixup', float, 'MixUp alpha, 0 = off'),
            ('cutmix', float, 'CutMix alpha, 0 = off'), ('reprob', float, 'RandomErasing probability'),
            ('hflip', float, 'horizontal flip probability'), ('randaug', str, "timm RandAugment string or 'none'"),
            ('eval_crop_pct', float, 'image-folder eval: Resize(int(img/pct)) + CenterCrop(img)')]:
        g.add_argument(flag(key), type=typ, help=recipe_help(key, text))
    g.add_argument('--rrc-scale', type=float, nargs=2, help=recipe_help('rrc_scale', 'RandomResizedCrop area range'))
    g.add_argument('--random-crop', action=BOOL, default=True, help='RandomResizedCrop; off = the eval geometry')
    g.add_argument('--repeated-aug', action=BOOL, help=recipe_help('repeated_aug', 'DeiT repeated augmentation (x3)'))
    g.add_argument('--no-aug', action='store_true', help='switch off every random augmentation (crop, flip, '
                   'RandAugment, MixUp/CutMix, erasing); label smoothing, drop-path and dropout stay')
    g = p.add_argument_group('run')
    g.add_argument('--output-dir', help='default runs/<model>_<pe>_<data>_seed<seed>')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--resume', help="checkpoint path, or 'auto' = <output-dir>/last.pt if present")
    g.add_argument('--allow-change', nargs='+', default=[], metavar='FLAG', help='--resume: let these recipe flags '
                   f'differ from the checkpoint on purpose; any of {", ".join(flag(k)[2:] for k in CHANGEABLE)}')
    g.add_argument('--overwrite', action='store_true', help='replace the run already in --output-dir')
    g.add_argument('--eval-only', action='store_true', help='evaluate the --resume checkpoint (with its own model '
                   'and data settings) and exit')
    g.add_argument('--amp', action=BOOL, default=True, help='bf16 autocast (CUDA only)')
    g.add_argument('--compile', action='store_true', help='torch.compile the model')
    g.add_argument('--log-interval', type=int, default=20, help='steps between loss syncs (progress line, '
                   'non-finite check, stop check)')
    g.add_argument('--no-progress', action='store_true', help='no progress bar or progress lines')
    return p


## Every flag's valid values, in one table, checked on the resolved config before any work: (config keys,
## valid(value), what is valid). NaN fails every comparison; math.isfinite is there for unbounded ones (inf).
## Only what cannot run is refused: a warm-up longer than the run, or an lr below --min-lr (DeiT's rule scales a
## small batch's lr down), runs as timm's scheduler runs it.
CHECKS = [
    (('epochs', 'global_batch_size', 'synthetic_size', 'log_interval'), lambda v: v >= 1, 'an int >= 1'),
    (('cooldown_epochs', 'warmup_epochs'), lambda v: v >= 0, 'an int >= 0'),
    (('num_classes',), lambda v: v is None or v >= 1, 'an int >= 1'),
    (('lr',), lambda v: math.isfinite(v) and v > 0, 'a finite number > 0'),
    (('min_lr', 'warmup_lr', 'weight_decay'), lambda v: math.isfinite(v) and v >= 0, 'a finite number >= 0'),
    (('mixup', 'cutmix'), lambda v: math.isfinite(v) and v >= 0, 'an alpha >= 0 (0 = off)'),
    (('smoothing',), lambda v: 0 <= v < 1, 'a number in [0, 1)'),
    (('reprob', 'hflip'), lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    (('rrc_scale',), lambda v: 0 < v[0] <= v[1] <= 1, 'two numbers 0 < min <= max <= 1'),
    (('eval_crop_pct',), lambda v: 0 < v <= 1, 'a fraction in (0, 1]'),
    (('workers',), lambda v: v is None or 0 <= v <= CPUS, f'an int in [0, {CPUS}] (the CPUs of this machine)'),
    (('seed',), lambda v: 0 <= v < 2 ** 63, 'an int in [0, 2**63)'),
]


def check_values(cfg, keys=None):
    """CHECKS on these keys of a config (all by default): one UserError naming each invalid value and what is valid."""
    bad = [f'{flag(k)} {show(cfg[k])} is invalid: must be {what}' for ks, ok, what in CHECKS for k in ks
           if (keys is None or k in keys) and not ok(cfg[k])]
    if bad:
        raise UserError('; '.join(bad) + '.')


def resolve_config(args, world_size):
    """Merge the recipe of --model with the flags and check every value; returns a JSON-able dict (config.json)."""
    rname = 'vit_lite' if args.model.startswith('vit_lite') else 'deit'
    recipe = {**RECIPES[rname], **COMMON_RECIPE}
    cfg = {**vars(args), **{k: v for k, v in recipe.items() if getattr(args, k, None) is None}, 'recipe': rname}
    if args.no_aug:
        cfg.update(mixup=0.0, cutmix=0.0, reprob=0.0, hflip=0.0, randaug='none', random_crop=False)
    cfg['rrc_scale'] = list(cfg['rrc_scale'])
    cfg['lr_base'] = cfg['lr']
    if recipe['lr_base_batch']:  # DeiT's main.py scales any --lr: lr = lr_base x global batch / 512
        cfg['lr'] = cfg['lr_base'] * cfg['global_batch_size'] / recipe['lr_base_batch']
    try:
        augment.parse_randaug(cfg['randaug'])
    except ValueError as e:
        raise UserError(f'{e}.') from None
    check_values(cfg)
    B = cfg['global_batch_size']
    if B % world_size:
        raise UserError(f'--global-batch-size {B} cannot be split over the {world_size} processes of this run '
                        f'(WORLD_SIZE={world_size}): pick a multiple of {world_size}.')
    cfg.update(world_size=world_size, per_process_batch_size=B // world_size,
               total_epochs=cfg['epochs'] + cfg['cooldown_epochs'])
    # what create_model needs besides (name, pe): the architecture and PE-knob overrides the user gave
    given = lambda k: k in cfg if k in ('layerwise_from', 'last_ln_pe') else cfg.get(k) is not None  # SUPPRESS'd
    cfg['model_kwargs'] = kw = {'num_classes': cfg['num_classes'] or DATASETS[cfg['data']]['num_classes'],
                                **{key: cfg[dest] for dest, key in ARCH_FLAGS.items() if cfg[dest] is not None},
                                **{k: cfg[k] for k in mpvg.PE_KNOBS if given(k)}}
    try:
        cfg['img_size_resolved'] = mpvg.make_config(cfg['model'], pe=cfg['pe'], **kw).img_size  # no weights built
    except ValueError as e:
        raise UserError(f'invalid model settings (--model {cfg["model"]}, --pe {cfg["pe"]} and the architecture '
                        f'/ knob flags): {e}')
    cfg['output_dir'] = args.output_dir or os.path.join('runs', f"{args.model}_{args.pe}_{cfg['data']}_seed{args.seed}")
    return cfg


def check_paths(cfg, args):
    """The data and output paths, before any work: what exists, what is writable."""
    root, out = cfg['data_path'], cfg['output_dir']
    missing = [s for s in ('train', 'val') if not os.path.isdir(os.path.join(root, s))]
    if cfg['data'] == 'imagenet' and missing:
        raise UserError(f'--data-path {root}: no {" or ".join(missing)} folder there. '
                        + IMAGENET_LAYOUT.format(root=root))
    if cfg['data'] == 'cifar100' and not cfg['download'] and not os.path.isdir(os.path.join(root, 'cifar-100-python')):
        raise UserError(f'CIFAR-100 not found at {root}/cifar-100-python and --no-download is set. Get it with: '
                        f'{GET_CIFAR.format(root=root)}.')
    if os.path.islink(out) and not os.path.exists(out):
        raise UserError(f'--output-dir {out} is a symlink to {os.readlink(out)}, which does not exist: create that '
                        f'folder, remove the link, or pick another --output-dir.')
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not args.eval_only and not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
        raise UserError(f'--output-dir {out}: {parent} is {"a file" if os.path.isfile(parent) else "not writable"}; '
                        f'the run needs a folder it can write.')


# ----------------------------------------------------------------------------------------------------------------
# data: the datasets; augment.py batches and augments them (samplers, loaders, the recipe's augmentation)

def folder_classes(root):
    """The classes of an image folder: its train/ class folders, which val/ must match (a cheap listing)."""
    try:
        classes = [torchvision.datasets.folder.find_classes(os.path.join(root, s))[0] for s in ('train', 'val')]
    except FileNotFoundError as e:
        raise UserError(f'ImageNet at {root} not usable ({e}). {IMAGENET_LAYOUT.format(root=root)}') from None
    if classes[0] != classes[1]:
        raise UserError(f'{root}/train has {len(classes[0])} class folders and {root}/val {len(classes[1])}, not the '
                        f'same ones ({", ".join(sorted(set(classes[0]) ^ set(classes[1]))[:5])}...): they must match.')
    return classes[0]


def load_cifar100(root):
    """CIFAR-100's train and test sets in memory (augment.read_cifar100 reads a file without running code)."""
    folder = os.path.join(root, 'cifar-100-python')
    how = (f'Expected the official CIFAR-100 python version at {folder}/{{train,test,meta}}: point --data-path at the '
           f'folder holding cifar-100-python/, or {GET_CIFAR.format(root=root)}.')
    out = []
    for f in (os.path.join(folder, s) for s in ('train', 'test')):
        try:
            out.append(torch.utils.data.TensorDataset(*augment.read_cifar100(f)))
        except Exception as e:
            raise UserError(f'{f} is not a valid CIFAR-100 python file ({type(e).__name__}: {e}): expected a pickled '
                            f'dict with b"data" (n, 3072) uint8 and b"fine_labels" (n ints in 0..99). {how}')
    return out


def load_imagenet(cfg):
    """ImageNet's train/ and val/ image folders, decoded and cropped in the DataLoader workers (augment.FolderCrops):
    train with the recipe's random resized crop (unless --no-random-crop), val with the evaluation crop."""
    root, sets = cfg['data_path'], []
    try:
        for split in ('train', 'val'):
            sets.append(augment.FolderCrops(augment.list_images(os.path.join(root, split)), cfg['img_size_resolved'],
                                            split == 'train' and cfg['random_crop'], cfg['rrc_scale'],
                                            cfg['interpolation'], cfg['eval_crop_pct']))
    except augment.ImageError as e:  # a symlink loop
        raise UserError(f'{e}.') from None
    except (FileNotFoundError, OSError) as e:  # a class folder without images, an unreadable folder
        raise UserError(f'ImageNet at {root} not usable ({type(e).__name__}: {e}). '
                        + IMAGENET_LAYOUT.format(root=root)) from None
    return sets


def load_data(cfg):
    """(train, val): CIFAR-100 or generated images in memory (TensorDataset), or ImageNet image folders."""
    if cfg['data'] != 'synthetic':
        return load_cifar100(cfg['data_path']) if cfg['data'] == 'cifar100' else load_imagenet(cfg)
    ## 10 classes told apart only by WHERE a bright square is (a model without PE under GAP cannot learn it): 5 rows
    ## x 2 distances of the column from the centre; the square sits at one of the two mirror columns at random, so a
    ## horizontal flip keeps the label
    sets, S = [], cfg['img_size_resolved']
    for n, split_seed in ((cfg['synthetic_size'], 1), (max(1, cfg['synthetic_size'] // 4), 2)):
        g = torch.Generator().manual_seed(split_seed)
        labels = torch.randint(10, (n,), generator=g)
        images = (torch.rand(n, 3, S, S, generator=g) * 64).to(torch.uint8)
        row, pair, side = labels // 2, labels % 2, torch.randint(2, (n,), generator=g)
        col, r = torch.where(side == 0, pair, 3 - pair), torch.arange(S)
        square = (r.view(-1, 1) // (S // 5) == row.view(-1, 1, 1)) & (r // (S // 4) == col.view(-1, 1, 1))  # (n, S, S)
        sets.append(torch.utils.data.TensorDataset(images.masked_fill_(square.unsqueeze(1), 230), labels))
    return sets


def make_loader(data, cfg, device, sampler=None, indices=None):
    """This rank's batches of uint8 images and labels, for training (sampler) or evaluation (indices)."""
    workers = cfg['workers'] if cfg['workers'] is not None else min(8, CPUS)
    return augment.batches(data, cfg['per_process_batch_size'], device, sampler, indices, workers)


def make_augment(cfg, in_memory):
    """The recipe's augmentation for this run's data: in-memory sets are cropped on the device, image folders in
    their DataLoader workers (augment.FolderCrops)."""
    info = DATASETS[cfg['data']]
    return augment.Augment(cfg['img_size_resolved'], info['mean'], info['std'], cfg['model_kwargs']['num_classes'],
                           crop=in_memory and cfg['random_crop'], crop_scale=cfg['rrc_scale'],
                           interpolation=cfg['interpolation'], hflip=cfg['hflip'], randaug=cfg['randaug'],
                           mixup=cfg['mixup'], cutmix=cfg['cutmix'], smoothing=cfg['smoothing'], reprob=cfg['reprob'],
                           mix_first=cfg['mix_first'])


# ----------------------------------------------------------------------------------------------------------------
# loss, schedule, optimizer

def soft_cross_entropy(logits, target):
    """timm SoftTargetCrossEntropy: mean over the batch of -sum_k t_k log softmax(z)_k."""
    return torch.sum(-target * nnF.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def lr_at(epoch, cfg):
    """Epoch `epoch`'s lr: timm's CosineLRScheduler at t = max(epoch - lr_epoch_lag, 0), as the recipe's script
    steps it (ViT-Lite: epoch e at lr(e); DeiT: e >= 1 at lr(e - 1)). lr(t): linear warm-up from warmup_lr, then
    min_lr + 1/2 (lr - min_lr)(1 + cos(pi t / epochs)), then min_lr (cool-down)."""
    t = max(epoch - cfg['lr_epoch_lag'], 0)
    lr, min_lr, warm, epochs = cfg['lr'], cfg['min_lr'], cfg['warmup_epochs'], cfg['epochs']
    if t < warm:
        return cfg['warmup_lr'] + t * (lr - cfg['warmup_lr']) / warm
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))


def weight_decay_split(model, skip_names):
    """(decay, no_decay) names: no decay for 1-D params, biases and skip_names (DeiT: pos_embed, cls_token)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith('.bias') or name in skip_names else decay).append(name)
    return decay, no_decay


def make_optimizer(model, cfg, device):
    decay, no_decay = weight_decay_split(model, set(model.no_weight_decay()) if cfg['skip_no_weight_decay'] else ())
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
    if dist.is_initialized():
        dist.barrier()


def all_reduce(t, op=dist.ReduceOp.SUM):
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


STOP = {'signal': None}  # set by the SIGTERM / SIGINT handler, read between steps


def _on_signal(signum, _frame):
    STOP['signal'] = signal.Signals(signum).name
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
    print(f'\n{STOP["signal"]} received: finishing the current step, then saving last.pt '
          f'(send it again to quit immediately)', file=sys.stderr, flush=True)


class Stopped(Exception):
    """Clean stop after SIGTERM / SIGINT, last.pt written."""

    def __init__(self, where, out):
        super().__init__(f'stopped by {STOP["signal"] or "a signal on another rank"} {where}; {out}/last.pt written. '
                         f'Continue with the same command plus --resume auto (the finished steps are skipped).')


# ----------------------------------------------------------------------------------------------------------------
# run folder: what made the run, lock, atomic writes, checkpoints

def provenance(argv, world):
    """Code (git commit, dirty tree, source hashes), command, library versions, hosts and devices of all ranks."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(['git', '-C', here, *a], capture_output=True, text=True, timeout=20).stdout.strip()
    try:
        commit, dirty = git('rev-parse', 'HEAD') or None, bool(git('status', '--porcelain', '--untracked-files=no'))
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        commit, dirty = None, None
    cuda = torch.cuda.is_available()
    ranks = [dict(host=socket.gethostname(), device=torch.cuda.get_device_name() if cuda else platform.machine())]
    if world > 1:
        ranks = ranks * world
        dist.all_gather_object(ranks, ranks[0])
    sha = {name: hashlib.sha256(pathlib.Path(here, name).read_bytes()).hexdigest()[:16]
           for name in ('train.py', 'mpvg.py', 'augment.py')}
    return dict(command='python train.py ' + shlex.join(argv), git_commit=commit, git_dirty=dirty if commit else None,
                source_sha256=sha, python=platform.python_version(),
                torch=str(torch.__version__), torchvision=str(torchvision.__version__),
                cuda=torch.version.cuda if cuda else None, cudnn=torch.backends.cudnn.version() if cuda else None,
                world_size=world, hosts=sorted({r['host'] for r in ranks}), devices=[r['device'] for r in ranks])


## A run's record is consistent at every instant: every file is written atomically; last.pt is the commit point
## and holds the log lines of every finished epoch too. After a kill anywhere, --resume auto rewrites log.jsonl from
## last.pt and copies last.pt to best.pt when the best epoch is the last one and best.pt missed it (write_record's
## order).

def atomic_write(path, data):
    """Bytes (or a checkpoint) to path via a temporary file, fsync and rename; on a write error (disk full) the old
    file stays intact and the message says so. -> the bytes."""
    if isinstance(data, dict):
        buf = io.BytesIO()
        torch.save(data, buf)
        data = buf.getvalue()
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        full = ' The disk is full (or the quota is used up).' if e.errno in (errno.ENOSPC, errno.EDQUOT) else ''
        raise UserError(f'could not write {path}: {e.strerror} ({errno.errorcode.get(e.errno, e.errno)}).{full} '
                        f'The previous {os.path.basename(path)} (if any) is intact; make room or fix the folder, '
                        f'then rerun with --resume auto.') from None
    return data


def write_record(out, ckpt, improved, replacing):
    """A checkpoint on disk, in this order: last.pt (the commit point), best.pt if it is the best epoch, log.jsonl
    (rewritten from last.pt's log lines). The first record of a run that replaces another (--overwrite) removes the
    old run's summary.json and best.pt (unless just written) after that commit point, and writes config.json."""
    data = atomic_write(os.path.join(out, 'last.pt'), ckpt)
    if improved:
        atomic_write(os.path.join(out, 'best.pt'), data)
    if replacing:
        for name in ('summary.json',) if improved else ('summary.json', 'best.pt'):
            pathlib.Path(out, name).unlink(missing_ok=True)
        atomic_write(os.path.join(out, 'config.json'), json_bytes(ckpt['config']))
    atomic_write(os.path.join(out, 'log.jsonl'), log_bytes(ckpt))


def is_own(resume, out):
    """Is the checkpoint to resume one of this run folder's own (not another run's, started from)?"""
    return resume is not None and os.path.abspath(os.path.dirname(resume)) == os.path.abspath(out)


def folder_state(out):
    """(run files present in <out>, whether a run trained there: a checkpoint, or a line in log.jsonl)."""
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    log = os.path.join(out, 'log.jsonl')
    trained = bool({'last.pt', 'best.pt'} & set(present)) or ('log.jsonl' in present and os.path.getsize(log) > 0)
    return present, trained


@contextlib.contextmanager
def run_folder(cfg, args, resume, rank, device):
    """The run folder, held for the run's life: rank 0 flocks <out>/train.lock (the kernel drops it when the process
    dies: a killed run's lock does not block a resume) and checks the folder: a run that trained there is continued
    (--resume), replaced (--overwrite: its files stay until this run's first checkpoint) or refused; what a run that
    trained nothing left (a config.json), and files a kill left half-written, are removed. Yields whether this run
    replaces an old one. A run that ends before its first checkpoint leaves nothing: its config.json and lock go,
    and the folder if this run made it and it is empty."""
    out = cfg['output_dir']
    fd, error, replacing, made = None, None, False, not os.path.exists(out)
    try:
        if rank == 0:
            os.makedirs(out, exist_ok=True)
            fd = os.open(os.path.join(out, 'train.lock'), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UserError(f'--output-dir {out} is in use by another train.py run ('
                                f'{os.pread(fd, 200, 0).decode(errors="replace").strip()}); wait for it to end, or '
                                f'use another --output-dir.') from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()} since {time.strftime("%F %T")}'.encode(), 0)
            present, trained = folder_state(out)
            ours = is_own(resume, out)
            if trained and not ours and not args.overwrite:
                if args.resume == 'auto':  # there is no last.pt, or this would be ours
                    raise UserError(f'--resume auto: {out} holds a run ({", ".join(present)}) but no last.pt: its '
                                    f'checkpoints are gone. Continue from best.pt with --resume {out}/best.pt, '
                                    f'replace the run with --overwrite, or pick another --output-dir.')
                raise UserError(f'--output-dir {out} already holds a run ({", ".join(present)}). Continue it with '
                                f'--resume auto, replace it with --overwrite, or pick another --output-dir.')
            replacing = trained and not ours
            for f in os.listdir(out):  # a run that trained nothing, or a write a kill interrupted
                if f in present and not trained or re.fullmatch(TORN_FILE, f):
                    os.remove(os.path.join(out, f))
    except UserError as e:
        if fd is not None:
            os.close(fd)
        fd, error = None, e
    if all_reduce(torch.tensor(int(error is not None), device=device), dist.ReduceOp.MAX).item():  # any rank failed
        raise error or UserError('rank 0 could not claim the run folder (see its message)')
    try:
        yield replacing
    finally:
        if fd is not None:
            if not folder_state(out)[1]:  # nothing trained: nothing left
                for name in ('config.json', 'train.lock'):
                    pathlib.Path(out, name).unlink(missing_ok=True)
                if made:
                    with contextlib.suppress(OSError):
                        os.rmdir(out)
            os.close(fd)


def load_checkpoint(path):
    """A checkpoint of this train.py, every field checked: one paragraph naming what is wrong otherwise."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        missing = {'model', 'optimizer', 'config', 'epoch', 'step', 'log', 'best_top1', 'best_epoch'} - set(ckpt)
        if missing:
            raise KeyError(f'missing {sorted(missing)}')
    except Exception as e:
        first = (str(e).splitlines() or [''])[0][:300]
        raise UserError(f'cannot read checkpoint {path} ({type(e).__name__}: {first}). It is not a complete '
                        f'checkpoint of this train.py (truncated, corrupt or another format); point --resume at '
                        f'another file (best.pt, or an older copy) or start a new run without --resume.') from None
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    epoch, step, log, best = ckpt['epoch'], ckpt['step'], ckpt['log'], ckpt['best_epoch']
    cfg = ckpt['config'] if isinstance(ckpt['config'], dict) else {}
    bad = [f'{k} {v!r}' for k, v, ok in [
        ('config', type(ckpt['config']).__name__, isinstance(ckpt['config'], dict) and 'model' in cfg),
        ('epoch', epoch, is_int(epoch) and epoch >= 0),
        ('step', step, is_int(step) and 0 <= step < max(cfg.get('steps_per_epoch', 1), 1)),
        ('log', type(log).__name__, isinstance(log, list) and all(isinstance(ln, dict) for ln in log)
         and len(log) == epoch),
        ('best_epoch', best, is_int(best) and -1 <= best < max(epoch, 0) and (best < 0 or best < len(log))),
        ('best_top1', ckpt['best_top1'], isinstance(ckpt['best_top1'], (int, float)))] if not ok]
    if bad:
        raise UserError(f'checkpoint {path} is inconsistent ({"; ".join(bad)}): edited or damaged. Valid: epoch and '
                        f'step ints >= 0, step below the epoch\'s steps, one log line per finished epoch, best_epoch '
                        f'among them (or -1). Point --resume at another file (best.pt, or an older copy).')
    return ckpt


def check_resume(saved, cfg, ckpt, args, path):
    """Refuse a resume that would silently change the run; --allow-change lets recipe values differ on purpose."""
    allowed = {a.lstrip('-').replace('-', '_') for a in args.allow_change}
    if allowed - set(CHANGEABLE):
        raise UserError(f'--allow-change {" ".join(sorted(allowed - set(CHANGEABLE)))}: not a flag a resume may '
                        f'change; valid: {", ".join(flag(k)[2:] for k in CHANGEABLE)}. The model, --pe, knob, '
                        f'architecture and --data flags identify a run and never change.')
    diff = lambda keys: [k for k in keys if saved.get(k) != cfg[k]]
    brief = lambda k, v: f'{len(v)} folders' if k == 'classes' and v else show(v)  # an image folder's classes
    name = lambda k: "the image folder's classes" if k == 'classes' else flag(k)
    says = lambda ks: '; '.join(f'{name(k)}: checkpoint {brief(k, saved.get(k))}, now {brief(k, cfg[k])}' for k in ks)
    if diff(IDENTITY):
        raise UserError(f'refusing to resume {path}: it belongs to a different run ({says(diff(IDENTITY))}). Use '
                        f'the flags of the run that wrote it, or a new --output-dir without --resume.')
    changed = diff(CHANGEABLE)
    if set(changed) - allowed:
        raise UserError(f'refusing to resume {path}: this command changes the run ({says(changed)}). Rerun with the '
                        f'checkpoint\'s values, or add --allow-change {" ".join(flag(k)[2:] for k in changed)} to '
                        f'continue with the new values on purpose.')
    cut = [k for k in changed if k in EPOCH_BOUNDARY_ONLY] + (
        ['world_size'] if saved.get('world_size') != cfg['world_size'] and cfg['repeated_aug'] else [])
    if ckpt['step'] > 0 and cut:
        raise UserError(f'refusing to resume {path} in the middle of epoch {ckpt["epoch"]} (step {ckpt["step"]}): '
                        f'{", ".join(cut)} changes how an epoch is cut into steps (images would be skipped or '
                        f'repeated). Finish the epoch with the checkpoint\'s values and process count first.')


def best_pt_is_current(out, ckpt):
    """Does <out>/best.pt hold the checkpoint's best epoch, of the same run? (mmap: its weights are not read)"""
    try:
        best = torch.load(os.path.join(out, 'best.pt'), map_location='cpu', weights_only=True, mmap=True)
        same_run = best['config'].get('run_id') == ckpt['config'].get('run_id')
        return same_run and best['best_epoch'] == ckpt['best_epoch']
    except Exception:  # missing or half-written
        return ckpt['best_epoch'] < 0


def json_bytes(obj):
    return (json.dumps(obj, indent=2) + '\n').encode()


def log_bytes(ckpt):
    return ''.join(json.dumps(ln) + '\n' for ln in ckpt['log']).encode()


def reconcile_record(out, ckpt):
    """After a kill: log.jsonl from last.pt's log lines; best.pt from last.pt when it missed the last epoch."""
    atomic_write(os.path.join(out, 'log.jsonl'), log_bytes(ckpt))
    ok = best_pt_is_current(out, ckpt)
    if not ok and ckpt['epoch'] == ckpt['best_epoch'] + 1 and ckpt['step'] == 0:  # the best is the last epoch
        atomic_write(os.path.join(out, 'best.pt'), pathlib.Path(out, 'last.pt').read_bytes())
    elif not ok:
        print(f'warning: {out}/best.pt does not hold the best epoch {ckpt["best_epoch"]} (cannot rebuild it)',
              file=sys.stderr)


def summary_json(cfg, log, best_epoch):
    """summary.json, a finished run's result in one file (written after its last epoch). A pure function of the last
    checkpoint (config, log lines, best epoch), so a run killed before writing it gets the same file on --resume auto.
    best_top1 is what the paper reports: the best epoch of the raw model. time_s sums the epochs' epoch_time_s
    (training + evaluation; start-up and checkpoint writes excluded); device_hours is time_s x processes / 3600 (the
    process count of the last session); img_per_s is the median over the epochs of the training throughput."""
    best, last, prov = log[best_epoch], log[-1], cfg.get('provenance') or {}
    time_s, speeds = sum(ln['epoch_time_s'] for ln in log), sorted(ln['img_per_s'] for ln in log)
    summary = dict(model=cfg['model'], pe=cfg['pe'], data=cfg['data'], seed=cfg['seed'], epochs=len(log),
                   best_top1=best['val_top1'], best_top5=best['val_top5'], best_epoch=best_epoch,
                   final_top1=last['val_top1'], final_top5=last['val_top5'], time_s=round(time_s, 1),
                   device_hours=round(time_s * cfg['world_size'] / 3600, 4), img_per_s=speeds[len(speeds) // 2],
                   world_size=cfg['world_size'], devices=prov.get('devices'), git_commit=prov.get('git_commit'))
    return json_bytes(summary)


# ----------------------------------------------------------------------------------------------------------------
# train / eval loop

@torch.no_grad()
def evaluate(model, loader, aug, device, autocast):
    """top-1 / top-5 in % over the whole validation set, counts summed over ranks (each sample counted once)."""
    model.eval()  # the training loop sets train() again at each epoch
    counts = torch.zeros(3, dtype=torch.long, device=device)  # correct@1, correct@5, n
    for x, y in loader:
        x, y = aug.eval(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        with autocast:
            logits = model(x)
        hit = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == y[:, None]  # (B, 5)
        counts += torch.stack([hit[:, :1].sum(), hit.sum(), torch.tensor(len(y), device=device)])
    c1, c5, n = all_reduce(counts).tolist()
    return 100.0 * c1 / max(n, 1), 100.0 * c5 / max(n, 1), n


def sync_status(first_bad, device, world):
    """(stop requested on any rank, first non-finite step or -1): one small all-reduce + one .item() sync."""
    t = torch.stack([torch.tensor(1 if STOP['signal'] else 0, device=device), first_bad.to(device)])
    if world > 1:
        all_reduce(t, dist.ReduceOp.MAX)
    return t.tolist()


def train(cfg, raw_model, model, optimizer, loaders, aug, sampler, state, device, rank, world, autocast):
    """The epoch loop. state: epoch, step, loss_sum, best_top1, best_epoch, log (restored by --resume)."""
    out, steps, show = cfg['output_dir'], sampler.steps, rank == 0 and not cfg['no_progress']
    checkpoint = lambda epoch, step, loss_sum: dict(
        model=raw_model.state_dict(), optimizer=optimizer.state_dict(), config=cfg, epoch=epoch, step=step,
        loss_sum=loss_sum, log=list(state['log']), best_top1=state['best_top1'], best_epoch=state['best_epoch'])
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
        pbar = tqdm(total=steps, initial=start, desc=f'epoch {epoch}', disable=not (show and sys.stderr.isatty()),
                    leave=False)
        model.train()
        for step, (x, y) in enumerate(loaders['train'], start=start):
            ## every step's randomness (augmentation draws, erasing noise, MixUp/CutMix, drop-path, dropout) comes
            ## from torch's global RNGs, seeded here by (seed, epoch, step, rank)
            torch.manual_seed(augment.derive_seed(cfg['seed'], epoch, step, rank, 'step'))
            x, target = aug(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            with autocast:
                logits = model(x)
            loss = soft_cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss = loss.detach()
            loss_sum += loss
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), epoch * steps + step, first_bad)  # no sync
            pbar.update(1)
            last = step + 1 == steps
            if (step + 1) % cfg['log_interval'] == 0 or last or (world == 1 and STOP['signal']):
                stop, bad = sync_status(first_bad, device, world)
                if bad >= 0:
                    good = f'{out}/last.pt is the last good checkpoint' if os.path.exists(f'{out}/last.pt') else 'no ' \
                        'checkpoint was written yet'
                    raise UserError(f'non-finite training loss at global step {bad} (epoch {epoch}); stopping. {good}. '
                                    f'Lower --lr or check the data.')
                if show:
                    speed = (step + 1 - start) * cfg['global_batch_size'] / (time.time() - t0)
                    msg = f'loss {loss.item():.4f} lr {lr:.2e} {speed:.0f} img/s'
                    if pbar.disable:  # stderr is no terminal (piped to a file): one line per sync
                        print(f'epoch {epoch} step {step + 1}/{steps} {msg}', file=sys.stderr, flush=True)
                    else:
                        pbar.set_postfix_str(msg)
                if stop and not last:
                    pbar.close()
                    ckpt = checkpoint(epoch, step + 1, all_reduce(loss_sum).cpu())
                    if rank == 0:
                        write_record(out, ckpt, False, state.pop('replacing', False))
                    barrier()
                    raise Stopped(f'at epoch {epoch}, step {step + 1}/{steps}', out)
        pbar.close()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        train_time = time.time() - t0
        train_loss = all_reduce(loss_sum).item() / (world * steps)
        ## evaluate the raw model: ranks see different numbers of batches, DDP's forward could sync
        top1, top5, n = evaluate(raw_model, loaders['val'], aug, device, autocast)
        line = dict(epoch=epoch, train_loss=round(train_loss, 6), val_top1=round(top1, 4), val_top5=round(top5, 4),
                    val_n=n, lr=lr, img_per_s=round((steps - start) * cfg['global_batch_size'] / train_time, 1),
                    epoch_time_s=round(time.time() - t0, 2))
        improved = top1 > state['best_top1']
        if improved:
            state['best_top1'], state['best_epoch'] = top1, epoch
        state['log'].append(line)
        if rank == 0:
            write_record(out, checkpoint(epoch + 1, 0, None), improved, state.pop('replacing', False))
            print(json.dumps(line), flush=True)
        stop, _ = sync_status(first_bad, device, world)
        if stop and epoch + 1 < cfg['total_epochs']:
            barrier()
            raise Stopped(f'after epoch {epoch}', out)
    return state


# ----------------------------------------------------------------------------------------------------------------
# main

def resolve_run(argv, world):
    """Every check before any work: flags, paths, --resume checkpoint. -> (args, cfg, resume, checkpoint, finished)."""
    args = build_parser().parse_args(argv)
    if args.eval_only:
        return (args,) + eval_config(args, world) + (False,)
    cfg = resolve_config(args, world)
    resume = os.path.join(cfg['output_dir'], 'last.pt') if args.resume == 'auto' else args.resume
    if args.resume == 'auto' and not os.path.exists(resume):
        resume = None  # nothing to resume yet: a new run
    ckpt = load_checkpoint(resume) if resume else None
    done = finished(args, cfg, resume, ckpt)
    if done:  # a finished run needs no data: its data may be gone by now
        settle_classes(cfg, ckpt['config'].get('classes'))
    else:
        check_paths(cfg, args)
        settle_classes(cfg, folder_classes(cfg['data_path']) if cfg['data'] == 'imagenet' else None)
    if ckpt is not None:
        check_resume(ckpt['config'], cfg, ckpt, args, resume)
    return args, cfg, resume, ckpt, done


def settle_classes(cfg, classes):
    """An image folder's classes (its class folders) set the head unless --num-classes does, and are recorded: a
    resume or an evaluation on a folder with other classes would shift every label, and is refused."""
    n = len(classes) if classes is not None else DATASETS[cfg['data']]['num_classes']
    if cfg['num_classes'] is not None and cfg['num_classes'] < n:
        raise UserError(f'--num-classes {cfg["num_classes"]} is smaller than the {n} classes of --data {cfg["data"]}: '
                        f'labels would fall outside the head; leave it out (it is set from the data) or raise it.')
    cfg['classes'], cfg['model_kwargs']['num_classes'] = classes, cfg['num_classes'] or n


def finished(args, cfg, resume, ckpt):
    """The run folder's own last.pt has trained every epoch this command asks for, at an epoch boundary, and its
    record is whole: summary.json, written last, is there, and log.jsonl holds every line. (Else a kill left the
    record behind last.pt: the run resumes as any other, which completes it.) More epochs (--epochs 400
    --allow-change epochs) is not finished: the run trains on."""
    if not (ckpt is not None and is_own(resume, cfg['output_dir']) and not (args.overwrite or args.eval_only)
            and ckpt['step'] == 0 and ckpt['epoch'] >= cfg['total_epochs']):
        return False
    read = lambda name: pathlib.Path(cfg['output_dir'], name).read_bytes()
    try:
        return (read('summary.json') == summary_json(ckpt['config'], ckpt['log'], ckpt['best_epoch'])
                and read('log.jsonl') == log_bytes(ckpt))
    except OSError:
        return False


def eval_config(args, world):
    """--eval-only: the checkpoint's own model, data and recipe; flags may say only where the data is, how read."""
    free = ('data_path', 'download', 'workers', 'global_batch_size', 'amp', 'resume', 'eval_only', 'no_progress')
    if args.resume in (None, 'auto') or not os.path.isfile(args.resume):
        raise UserError(f'--eval-only needs --resume PATH, the checkpoint file to evaluate (got {args.resume}).')
    ckpt, default = load_checkpoint(args.resume), build_parser().get_default
    given = {k: v for k, v in vars(args).items() if v != default(k)}
    if set(given) - set(free):
        raise UserError(f'--eval-only evaluates {args.resume} with the settings it was trained with; '
                        f'{", ".join(map(flag, sorted(set(given) - set(free))))} cannot change them.')
    cfg = {**ckpt['config'], **{k: v for k, v in given.items() if k in free}}
    check_values(cfg, free)
    cfg.update(world_size=world, per_process_batch_size=max(cfg['global_batch_size'] // world, 1))
    check_paths(cfg, args)
    if cfg['data'] == 'imagenet' and folder_classes(cfg['data_path']) != cfg.get('classes'):
        raise UserError(f'--eval-only: the image folder {cfg["data_path"]} has other classes than {args.resume} was '
                        f'trained on: its labels would not be the model\'s. Point --data-path at the data it was '
                        f'trained with.')
    return cfg, args.resume, ckpt


def pick_device(local_rank, local_world):
    """This process's device: GPU local_rank, or GPU 0 when each process sees one GPU (CUDA_VISIBLE_DEVICES set per
    process, as SLURM does); the CPU without CUDA."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return torch.device('cpu')
    if local_rank < n or n == 1:
        return torch.device('cuda', local_rank if local_rank < n else 0)
    raise UserError(f'this node runs {local_world} processes (LOCAL_RANK {local_rank}) but sees {n} GPUs '
                    f'(CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES", "unset")}): start at most {n} '
                    f'processes per node (torchrun --nproc_per_node {n}), or give each process its own GPU.')


def run(argv):
    rank, world, local_rank = dist_env()
    args, cfg, resume, ckpt, done = resolve_run(argv, world)  # every input checked before any work
    if done:  # a sweep run again: one line, no file written, no data loaded
        if rank == 0:
            best = ckpt['best_epoch']
            more = f' (this command asks for {cfg["total_epochs"]})' if ckpt['epoch'] > cfg['total_epochs'] else ''
            print(f'{cfg["output_dir"]}: finished ({ckpt["epoch"]} epochs{more}, best top-1 '
                  f'{ckpt["log"][best]["val_top1"]:.2f} at epoch {best}), nothing to do', flush=True)
        return
    device = pick_device(local_rank, int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    if cfg['data'] == 'cifar100':  # before any collective: a slow download must not time the others out
        try:
            augment.fetch_cifar100(cfg['data_path'], local_rank)
        except (OSError, TimeoutError) as e:
            raise UserError(f'{e}. Get it with: {GET_CIFAR.format(root=cfg["data_path"])}.') from None
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 for the fp32 parts
    if world > 1:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                device_id=device if device.type == 'cuda' else None)
    # deviation: bf16 autocast on CUDA (DeiT and CCT used fp16 autocast + GradScaler); CPU runs stay fp32
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if cfg['amp'] and device.type == 'cuda'
                else contextlib.nullcontext())
    out = cfg['output_dir']
    folder = contextlib.nullcontext(False) if args.eval_only else run_folder(cfg, args, resume, rank, device)
    with folder as replacing:
        ## what made this run: this session's code and command, after those of the sessions before it
        cfg['provenance'] = provenance(argv, world)
        before = (ckpt or {}).get('config', {})
        cfg['provenance_history'] = before.get('provenance_history', [before['provenance']] if before else [])
        cfg['provenance_history'] = cfg['provenance_history'] + [cfg['provenance']]
        cfg['run_id'] = before.get('run_id') or os.urandom(8).hex()  # tells this run's files from a replaced run's
        ## the model: same seed on all ranks, so every rank builds the same initial weights
        torch.manual_seed(cfg['seed'])
        raw_model = mpvg.create_model(cfg['model'], pe=cfg['pe'], **cfg['model_kwargs']).to(device)
        cfg['num_params'] = sum(p.numel() for p in raw_model.parameters())
        optimizer = make_optimizer(raw_model, cfg, device)
        state = dict(epoch=0, step=0, loss_sum=None, best_top1=-1.0, best_epoch=-1, log=[])
        if ckpt is not None:
            try:
                raw_model.load_state_dict(ckpt['model'])
                optimizer.load_state_dict(ckpt['optimizer'])
            except Exception as e:
                raise UserError(f'checkpoint {resume} does not fit this model/optimizer ({type(e).__name__}: '
                                f'{(str(e).splitlines() or [""])[0][:300]}).')
            state.update({k: ckpt[k] for k in state})
            if rank == 0:
                print(f'evaluating {resume} (trained {state["epoch"]} epochs)' if args.eval_only else
                      f'resumed {resume}: epoch {state["epoch"]}, step {state["step"]}', file=sys.stderr)
        ## data
        train_set, val_set = load_data(cfg)
        aug = make_augment(cfg, in_memory=isinstance(train_set, torch.utils.data.TensorDataset))
        sampler = augment.EpochSampler(len(train_set), cfg['per_process_batch_size'], world, rank, cfg['seed'],
                                       cfg['repeated_aug'])
        loaders = dict(val=make_loader(val_set, cfg, device, indices=augment.eval_indices(len(val_set), world, rank)))
        cfg.update(steps_per_epoch=sampler.steps, train_size=len(train_set), val_size=len(val_set))
        if args.eval_only:
            top1, top5, n = evaluate(raw_model, loaders['val'], aug, device, autocast)
            if rank == 0:
                print(json.dumps(dict(eval=resume, val_top1=round(top1, 4), val_top5=round(top5, 4), val_n=n)))
            return
        if sampler.steps == 0:
            how = (f'repeated augmentation keeps n // 256 * 256 images an epoch, none of {len(train_set)}: train '
                   f'without it (--no-repeated-aug)' if cfg['repeated_aug'] else
                   f'lower --global-batch-size to at most {len(train_set)}')
            raise UserError(f'the training set ({len(train_set)} images) gives no step of {cfg["global_batch_size"]} '
                            f'images an epoch: {how}.')
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, _on_signal)
        if rank == 0:
            print(json.dumps(dict(config=cfg)), flush=True)
            if not replacing:  # a replaced run's files stay until this run's first checkpoint
                pathlib.Path(out, 'summary.json').unlink(missing_ok=True)  # a finished run training on (more epochs)
                atomic_write(os.path.join(out, 'config.json'), json_bytes(cfg))
            if is_own(resume, out):
                reconcile_record(out, ckpt)
        barrier()
        model = torch.compile(raw_model) if cfg['compile'] else raw_model
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == 'cuda' else None)
        loaders['train'] = make_loader(train_set, cfg, device, sampler=sampler)
        state['replacing'] = replacing
        state = train(cfg, raw_model, model, optimizer, loaders, aug, sampler, state, device, rank, world, autocast)
        if rank == 0:  # the run is complete: its result in one file, from the config of its last checkpoint
            ## (this session's, unless it trained no epoch: a kill stopped the run between last.pt and this file)
            last_cfg = cfg if len(state['log']) > state['epoch'] else ckpt['config']
            atomic_write(os.path.join(out, 'summary.json'), summary_json(last_cfg, state['log'], state['best_epoch']))
            print(json.dumps(dict(summary=True, best_top1=round(state['best_top1'], 4), best_epoch=state['best_epoch'],
                                  epochs=cfg['total_epochs'], output_dir=out)), flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    rank, world = dist_env()[:2]
    code, STOP['signal'] = 0, None
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        run(argv)
    except (UserError, augment.ImageError) as e:
        msg = str(e)
        if msg.startswith('Caught '):  # raised in a DataLoader worker: the message comes wrapped in the worker's
            msg = msg.rsplit(f'{type(e).__name__}: ', 1)[-1].strip()  # traceback; keep our own sentence
        if isinstance(e, augment.ImageError):
            msg += ', then rerun with --resume auto to continue from the last checkpoint.'
        print(f'{f"[rank {rank}] " if world > 1 else ""}error: {msg}', file=sys.stderr, flush=True)
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
        if dist.is_initialized():
            dist.destroy_process_group()
        ## After an exception out of the data loader, its workers (which ignore SIGTERM) may be alive and the
        ## interpreter's exit would wait for them forever: everything is saved by now, so end them.
        gc.collect()
        for p in multiprocessing.active_children():
            p.kill()
            p.join()
    sys.exit(code)


if __name__ == '__main__':
    main()

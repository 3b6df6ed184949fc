"""
timm's training augmentation on whole batches, on any device (CPU or GPU), with Pillow's arithmetic.

The two recipes of the MPVG paper (Lee, Ham and Kim, AAAI 2025, Table 7) augment as timm does, one image at a time
with Pillow in DataLoader workers: DeiT on ImageNet, Compact-Transformers' ViT-Lite on CIFAR-100. This file does
the same thing to a whole uint8 batch that already sits on the training device:

    aug = Augment(img_size=32, mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761), num_classes=100,
                  crop_scale=(0.8, 1.0), interpolation='random', mix_first=True)   # the ViT-Lite recipe
    torch.manual_seed(step_seed)             # every draw below comes from torch's global RNGs
    x, target = aug(images, labels)          # uint8 (B, 3, H, W) on the device -> float (B, 3, S, S), (B, classes)
    x = aug.eval(images)                     # evaluation: the image as is (resized if another size), normalized

The ops, in timm's order: RandomResizedCrop (in-memory sets; an image folder is decoded and cropped per image in its
DataLoader workers by `FolderCrops`, with Pillow itself), horizontal flip, RandAugment `rand-m9-mstd0.5-inc1` (the
15 ops of timm's increasing set and its level mapping), then MixUp/CutMix, normalize and RandomErasing in the
recipe's order.

How it stays fast on a GPU:
- every random draw of a step is made on the host (the CPU, torch's global generator) for the whole batch, and all
  of them reach the device in ONE copy that does not block the host (`to_device`); nothing in a step reads a value
  back from the device, so the host queues the next step's kernels while the GPU works;
- the 15 RandAugment ops fall into three kinds, each run once per layer on the images that drew one of its ops
  (which images, the host knows from its own draws): point ops as one lookup in a per-image table, the three
  enhancements as one blend with a per-image degenerate image, the five geometric ops as one affine warp;
- pixels stay uint8 between ops (every Pillow op rounds to uint8); float64 only on the small tensors where Pillow's
  arithmetic needs it (the lookup tables, the warp's sampling points); tensors every step needs are made once;
- TF32 is switched off inside (it would change the resize and blur sums, which Pillow computes exactly).
About 250 device ops per step (kernels a GPU launches); benchmark.py --data-pipeline counts them.

Exactness: tests/test_augment.py compares every op with timm's own Pillow op, per magnitude, sign and
interpolation, at 32 and 224 pixels; where they may differ, the function says so in a `# deviation:` line.

Feeding it: `EpochSampler` says which images each step of an epoch takes on each process (DeiT's repeated
augmentation included) and with which crop seed, `batches` turns a dataset into a process's uint8 batches on the
device (an in-memory set such as CIFAR-100's, fetched by `fetch_cifar100` and read by `read_cifar100` without
running code, sliced on the device; an image folder decoded and cropped by `FolderCrops` in DataLoader workers),
and `derive_seed` makes every draw a pure function of (seed, epoch, step or position, rank): that is what lets an
interrupted run resume exactly.

Sections: host-to-device transfer; RandAugment's vocabulary and draws (host); boxes (host); resizing (Pillow in
workers, matrices on batches; FolderCrops); the three kinds of RandAugment ops (device); mixing, erasing,
normalizing; Augment; feeding it (samplers, seeds, batches).
`##` comments teach, `#` comments are functional. torch, torchvision (with its Pillow) and the standard library only.
"""
import contextlib
import hashlib
import math
import os
import pickle
import re
import shutil
import signal
import time

import PIL.Image
import torch
import torch.nn.functional as nnF
import torchvision
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF


# ----------------------------------------------------------------------------------------------------------------
# host -> device: one copy per step

def to_device(tensors, device):
    """A dict of CPU tensors -> the same dict on `device`, through ONE copy that does not block the host.

    Their bytes are packed into one buffer (pinned on CUDA: a pageable buffer would make the copy synchronous),
    copied with non_blocking=True, and viewed back as each tensor's dtype and shape on the device (views launch
    no kernel). Each part starts at a multiple of 8 bytes, so a float64 view of it is aligned."""
    if device.type == 'cpu':
        return dict(tensors)
    parts, layout, offset = [], [], 0
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8)                  # the tensor's bytes
        pad = -raw.numel() % 8
        parts += [raw, raw.new_zeros(pad)]
        layout.append((name, offset, raw.numel(), t.dtype, t.shape))
        offset += raw.numel() + pad
    buf = torch.cat(parts)
    if device.type == 'cuda':
        buf = buf.pin_memory()
    buf = buf.to(device, non_blocking=True)
    return {name: buf[o:o + n].view(dtype).view(shape) for name, o, n, dtype, shape in layout}


@contextlib.contextmanager
def no_tf32():
    """Full float32 matmuls and convolutions inside (TF32 keeps 10 mantissa bits: a resize would be off by +-2)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------------------------
# RandAugment's vocabulary and draws (host)

## timm's `rand-m9-mstd0.5-inc1`: 2 layers; in each, an image draws one of these 15 ops uniformly and applies it
## with probability 0.5, at magnitude m ~ N(9, 0.5) clipped to [0, 10]; level = m / 10, and `sign` is timm's random
## negation (+-1, 50/50). How a level becomes the op's argument (timm's auto_augment.py, the "increasing" set):
RA_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
          'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
          'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
LEVEL_TO_ARG = {
    'Rotate': lambda lv, s: s * 30 * lv,                        # degrees
    'ShearX': lambda lv, s: s * 0.3 * lv, 'ShearY': lambda lv, s: s * 0.3 * lv,
    'TranslateXRel': lambda lv, s: s * 0.45 * lv, 'TranslateYRel': lambda lv, s: s * 0.45 * lv,  # of the size
    'PosterizeIncreasing': lambda lv, s: 4 - (4 * lv).floor(),  # bits kept
    'SolarizeIncreasing': lambda lv, s: 256 - (256 * lv).floor(),  # threshold
    'SolarizeAdd': lambda lv, s: (110 * lv).floor(),            # added to pixels below 128
    **{f'{n}Increasing': lambda lv, s: (1 + s * 0.9 * lv).clamp(min=0.1)  # enhance factor
       for n in ('Color', 'Contrast', 'Brightness', 'Sharpness')},
}
## The three kinds, by how an op maps pixels (each kind is computed once per layer, see randaug_layer):
POINT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd',
             'BrightnessIncreasing')                  # out = table[image, channel, in]: a function of the pixel
BLEND_OPS = ('ColorIncreasing', 'ContrastIncreasing', 'SharpnessIncreasing')  # blend with a degenerate image
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')  # an affine warp
BICUBIC_SHARE = {'random': 0.5, 'bicubic': 1.0, 'bilinear': 0.0}  # 'random': bilinear or bicubic per image (timm)


def parse_randaug(s):
    """timm's 'rand-m9-mstd0.5-inc1' -> dict(num_ops=2, magnitude=9.0, magnitude_std=0.5); 'none' -> None."""
    if s.lower() == 'none':
        return None
    parts = dict(re.findall(r'-(mstd|m|n|inc)([0-9.]+)', s))
    if not (re.fullmatch(r'rand(-(mstd|m|inc)\d+(\.\d+)?|-n\d+)*', s) and parts.get('inc') == '1'
            and 0 <= float(parts.get('m', 10)) <= 10):
        raise ValueError(f"--randaug {s!r} is invalid: must be 'none' or a timm RandAugment string of the increasing "
                         f"op set like 'rand-m9-mstd0.5-inc1' (m<magnitude 0..10>, n<ops>, mstd<std>, inc1)")
    return dict(num_ops=int(parts.get('n', 2)), magnitude=float(parts.get('m', 10)),
                magnitude_std=float(parts.get('mstd', 0)))


def draw_randaug(n, ra, bicubic_p):
    """RandAugment's draws for n images, per layer (op, arg, bicubic) of (n,): op an index into RA_OPS (-1: skipped,
    p 0.5), arg the op's argument (float64; 0 for ops without one), bicubic the geometric ops' interpolation."""
    draws = []
    for _ in range(ra['num_ops']):
        op = torch.where(torch.rand(n) <= 0.5, torch.randint(len(RA_OPS), (n,)), -1)
        level = (ra['magnitude'] + ra['magnitude_std'] * torch.randn(n, dtype=torch.float64)).clamp(0, 10) / 10
        sign = torch.where(torch.rand(n) > 0.5, -1.0, 1.0).double()
        arg = torch.zeros(n, dtype=torch.float64)
        for k, name in enumerate(RA_OPS):
            if name in LEVEL_TO_ARG:
                arg = torch.where(op == k, LEVEL_TO_ARG[name](level, sign), arg)
        draws.append((op, arg, torch.rand(n) < bicubic_p))
    return draws


def host_tables(op, arg):
    """The lookup tables of the point ops whose table depends on the argument only, built on the host: (n, 256) uint8
    (the identity for AutoContrast and Equalize, whose tables come from the image, see point_ops)."""
    v = torch.arange(256, dtype=torch.float32).expand(len(op), 256)        # (n, 256): every input value
    a = arg.float().view(-1, 1)
    shift = 2 ** (8 - a)                                                    # Posterize keeps the top `a` bits
    tables = {'Invert': 255 - v,
              'PosterizeIncreasing': torch.floor(v / shift) * shift,      # 0 bits: black, as the official code's Pillow
              'SolarizeIncreasing': torch.where(v >= a, 255 - v, v),
              'SolarizeAdd': torch.where(v < 128, (v + a).clamp(max=255), v),
              ## ImageEnhance.Brightness: Image.blend(black, image, f), whose C code computes in float32
              'BrightnessIncreasing': (0 + a * (v - 0)).clamp(0, 255).trunc()}
    out = v.clone()
    for name, table in tables.items():
        out = torch.where((op == RA_OPS.index(name)).view(-1, 1), table, out)
    return out.to(torch.uint8)


def affine_matrices(name, arg, H, W):
    """(n, 6) Pillow matrices (a, b, c, d, e, f: output point (x, y) samples the input at (a x + b y + c,
    d x + e y + f)) of one geometric op for arguments (n,) float64 (rotation: Image.rotate's, about the centre)."""
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if name == 'Rotate':
        t = -torch.deg2rad(arg)
        cos, sin, cx, cy = torch.cos(t), torch.sin(t), W / 2.0, H / 2.0
        rows = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    else:
        rows = {'ShearX': (one, arg, zero, zero, one, zero), 'ShearY': (one, zero, zero, arg, one, zero),
                'TranslateXRel': (one, zero, arg * W, zero, one, zero),
                'TranslateYRel': (one, zero, zero, zero, one, arg * H)}[name]
    return torch.stack(rows, 1)


AXIS_OPS = ('ShearX', 'TranslateXRel', 'ShearY', 'TranslateYRel')  # geometric ops that move pixels along one axis
## The interpolations as matrices on 4 samples v1..v4 along a line (the sample point between v2 and v3, at fraction
## d past v2): p = (v1, v2, v3, v4) @ M, value p1 + d (p2 + d (p3 + d p4)), Pillow's Geometry.c. Bicubic (its
## BICUBIC, a = -1): p1 = v2, p2 = -v1 + v3, p3 = 2 (v1 - v2) + v3 - v4, p4 = -v1 + v2 - v3 + v4; bilinear (its
## BILINEAR, v2 + (v3 - v2) d): p1 = v2, p2 = v3 - v2, p3 = p4 = 0. Integer entries: exact on integer samples.
INTERPOLATION = torch.tensor([[[0.0, 0, 0, 0], [1, -1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]],        # bilinear
                              [[0.0, -1, 2, -1], [1, 0, -2, 1], [0, 1, 1, -1], [0, 0, -1, 1]]])  # bicubic


def plan_layer(op, arg, bicubic, H, W, prefix=''):
    """One RandAugment layer's draws (op, arg, bicubic of (n,), host) -> (tensors for the device, host facts).

    'changed': the images an op changes, grouped by kind so that each kind is one slice of them: the point ops
    (AutoContrast and Equalize last), the blends (Color, Contrast, Sharpness in this order), the geometric ops
    (rotations first); then what each kind needs per image. The host facts (how many images of each kind and
    variant) decide which kernels run, so the device is never asked."""
    by = lambda names: torch.cat([(op == RA_OPS.index(n)).nonzero()[:, 0] for n in names])
    data_ops = ('AutoContrast', 'Equalize')
    point, blend = by([n for n in POINT_OPS if n not in data_ops] + list(data_ops)), by(BLEND_OPS)
    rotate, axis = by(('Rotate',)), by(AXIS_OPS)
    warp = torch.cat([rotate, axis])
    count = lambda names: int(torch.isin(op, torch.tensor([RA_OPS.index(n) for n in names])).sum())
    is_ = lambda i, name: op[i] == RA_OPS.index(name)
    t = dict(changed=torch.cat([point, blend, warp]), point_table=host_tables(op[point], arg[point]),
             point_auto=is_(point, 'AutoContrast')[len(point) - count(data_ops):], blend_factor=arg[blend].float(),
             warp_interp=INTERPOLATION[bicubic[warp].long()],
             rotate=affine_matrices('Rotate', arg[rotate], H, W).float().view(-1, 2, 3))
    ## Shear and translate move pixels along x (X ops) or y (Y ops) only: each row (column) is shifted by its own
    ## offset r, Pillow's xin = (1 xin + shear yin) + 0 or (1 xin + 0 yin) + tx, i.e. xin + r exactly (adding 0 and
    ## multiplying by 1 are exact), with r = shear * yin or tx; likewise for y.
    a, x_op = arg[axis].view(-1, 1), (is_(axis, 'ShearX') | is_(axis, 'TranslateXRel')).view(-1, 1)
    line = torch.arange(max(H, W), dtype=torch.float64) + 0.5                   # yin of each row / xin of each column
    shear = is_(axis, 'ShearX') | is_(axis, 'ShearY')
    r = torch.where(shear.view(-1, 1), a * line, torch.where(x_op, a * W, a * H))  # (n, max(H, W)) float64
    size = torch.where(x_op, W, H)                                               # pixels along the moving axis
    t.update(axis_line=(~x_op).long().view(-1), axis_offset=r, axis_size=size.double(), axis_last=size - 1,
             warp_pad=torch.cat([torch.zeros_like(rotate), (~x_op).long().view(-1)]))
    facts = dict(point=len(point), point_data=count(data_ops), blend=len(blend), color=count(BLEND_OPS[:1]),
                 contrast=count(BLEND_OPS[1:2]), sharp=count(BLEND_OPS[2:]), warp=len(warp), rotate=len(rotate))
    return {prefix + k: v for k, v in t.items()}, facts


# ----------------------------------------------------------------------------------------------------------------
# boxes (host): crops and erasing

BOX_DRAWS = 22  # uniforms one box takes: 10 tries of an area and a ratio, then a position


def sample_boxes(u, height, width, scale, ratio, fits):
    """timm's box draws from uniforms u (n, BOX_DRAWS) in [0, 1): 10 tries of an area fraction U(scale) and a
    log-uniform ratio w/h; the first that fits(h, w, height, width) wins, at a uniform position. height, width:
    numbers or (n,) tensors. -> (n, 4) float64 (top, left, h, w) and (n,) bool 'a try fitted'."""
    H, W = (torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1) for v in (height, width))  # (n or 1, 1)
    lo, hi = scale
    area = H * W * (lo + (hi - lo) * u[:, :10])                                            # (n, 10)
    a, b = map(math.log, ratio)
    r = torch.exp(a + (b - a) * u[:, 10:20])
    h, w = torch.round(torch.sqrt(area / r)), torch.round(torch.sqrt(area * r))
    ok = fits(h, w, H, W)                                                                  # (n, 10)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)                                     # the first fitting try
    h, w = h.gather(1, first), w.gather(1, first)                                          # (n, 1) each
    top, left = torch.floor(u[:, 20:21] * (H - h + 1)), torch.floor(u[:, 21:22] * (W - w + 1))  # uniform position
    return torch.cat([top, left, h, w], 1), ok.any(1)


def rrc_boxes(n, height, width, scale, gen=None, u=None):
    """timm's RandomResizedCropAndInterpolation.get_params (ratio 3/4..4/3) for n images of height x width (numbers,
    or (n,) tensors), from the uniforms u (n, BOX_DRAWS), or drawn from gen. No try fits: the whole image, cut to
    the nearest ratio, centred."""
    u = torch.rand(n, BOX_DRAWS, dtype=torch.float64, generator=gen) if u is None else u
    boxes, ok = sample_boxes(u, height, width, scale, (3 / 4, 4 / 3), lambda h, w, H, W: (w <= W) & (h <= H))
    H, W = (torch.as_tensor(v, dtype=torch.float64).expand(n) for v in (height, width))
    h = torch.where(W / H < 3 / 4, torch.round(W / (3 / 4)), H)
    w = torch.where(W / H > 4 / 3, torch.round(H * 4 / 3), W)
    whole = torch.stack([torch.floor((H - h) / 2), torch.floor((W - w) / 2), h, w], 1)
    return torch.where(ok.view(-1, 1), boxes, whole)


def erase_boxes(n, height, width, prob, gen=None):
    """timm RandomErasing(prob, 'pixel', max_count 1): area U(0.02, 1/3) of the image, ratio in (0.3, 1/0.3), with
    probability prob. -> (n, 4) (top, left, h, w), h = w = 0 where nothing is erased."""
    u = torch.rand(n, BOX_DRAWS + 1, dtype=torch.float64, generator=gen)
    boxes, ok = sample_boxes(u, height, width, (0.02, 1 / 3), (0.3, 1 / 0.3), lambda h, w, H, W: (h < H) & (w < W))
    return boxes * (ok & (u[:, -1] < prob)).view(-1, 1)


# ----------------------------------------------------------------------------------------------------------------
# resizing: Pillow itself per image (image-folder workers, FolderCrops), the same arithmetic as matrices on batches

def crop_draws(heights, widths, scale, bicubic_p, seeds):
    """The random resized crops of images of these sizes, each drawn from its own seed (so an image's crop does not
    depend on the others of its batch), the boxes computed for all at once: ([(top, left, h, w)], [bicubic])."""
    u = torch.stack([torch.rand(BOX_DRAWS + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                     for s in seeds])                                                # (n, BOX_DRAWS + 1)
    H, W = torch.tensor(heights, dtype=torch.float64), torch.tensor(widths, dtype=torch.float64)
    return rrc_boxes(len(u), H, W, scale, u=u[:, :BOX_DRAWS]).int().tolist(), (u[:, -1] < bicubic_p).tolist()


def pil_resized_crop(img, box, bicubic, size):
    """torchvision's resized_crop on a PIL image, i.e. Pillow's crop + resize, the call timm makes -> PIL image."""
    mode = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
    return TF.resized_crop(img, *box, [size, size], mode)


def pil_center_crop(img, size, crop_pct):
    """DeiT's evaluation transform on a PIL image: Resize(int(size / crop_pct), bicubic) + CenterCrop(size)."""
    return TF.center_crop(TF.resize(img, int(size / crop_pct), InterpolationMode.BICUBIC), size)


class ImageError(ValueError):
    """An image file Pillow cannot decode (not an image, truncated, a decompression bomb), or an image folder that
    cannot be listed: the message names it."""


def open_image(path):
    """A PIL image of the file, its pixels not read yet (its size is); ImageError if Pillow cannot open it or it is a
    decompression bomb (more than 2 x PIL.Image.MAX_IMAGE_PIXELS pixels)."""
    try:
        return PIL.Image.open(path)
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise ImageError(f'cannot decode image {path} ({type(e).__name__}: {e}); replace or delete that file') from None


def rgb(img, path):
    """The image's pixels as 8-bit RGB, decoded (the file may be closed). A 16-bit grayscale image (a PNG of mode
    I;16) is scaled to 8 bits first: Pillow's convert('RGB') would clip it, nearly all white."""
    try:
        if img.mode == 'RGB':
            img.load()                                         # convert('RGB') would only copy it
            return img
        if img.mode.startswith('I'):
            img = img.convert('I').point(lambda v: v * (1 / 256)).convert('L')
        return img.convert('RGB')
    except (OSError, ValueError, SyntaxError) as e:            # truncated or malformed: found while decoding
        raise ImageError(f'cannot decode image {path} ({type(e).__name__}: {e}); replace or delete that file') from None


def list_images(root):
    """(path, class index) of every image under root/<class>/, as torchvision's ImageFolder lists them, except that a
    symlink loop (which would list a class's images once per turn until the path is too long) is an ImageError."""
    classes, class_to_idx = torchvision.datasets.folder.find_classes(root)
    for c in classes:
        seen = set()
        for folder, _, _ in os.walk(os.path.join(root, c), followlinks=True):
            key = (os.stat(folder).st_dev, os.stat(folder).st_ino)
            if key in seen:
                raise ImageError(f'{folder} leads back to a folder above it (a symlink loop): its images would be '
                                 f'listed again and again. Remove the link')
            seen.add(key)
    return torchvision.datasets.folder.make_dataset(root, class_to_idx, torchvision.datasets.folder.IMG_EXTENSIONS)


class FolderCrops(torch.utils.data.Dataset):
    """Image files read as uint8 (3, S, S) in DataLoader workers, a batch at a time (__getitems__; its batch is
    whole, so the loader's collate_fn must pass it through). samples: (path, label) pairs, as torchvision's
    ImageFolder lists them; keys: (index, seed). random_crop: timm's RandomResizedCropAndInterpolation with Pillow,
    the box and the interpolation drawn from the key's seed (crop_draws); otherwise DeiT's evaluation geometry,
    Resize(int(S / crop_pct)) + CenterCrop(S), bicubic."""

    def __init__(self, samples, size, random_crop, scale=(0.08, 1.0), interpolation='bicubic', crop_pct=0.875):
        self.samples, self.size, self.random_crop = samples, size, random_crop
        self.scale, self.bicubic_p, self.crop_pct = scale, BICUBIC_SHARE[interpolation], crop_pct

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        x, y = self.__getitems__([key])
        return x[0], y[0]

    def __getitems__(self, keys):
        """A batch: uint8 (B, 3, S, S) (channels last in memory) and labels (B,). The boxes are drawn at once from
        the images' sizes (read from their headers); each image is decoded just before its crop, while it is in the
        cache, and its crop's bytes go into one buffer that becomes the batch tensor."""
        samples, S = [self.samples[index] for index, _ in keys], self.size
        images = [open_image(path) for path, _ in samples]
        if self.random_crop:
            boxes, bicubic = crop_draws([im.height for im in images], [im.width for im in images], self.scale,
                                        self.bicubic_p, [seed for _, seed in keys])
        size = S * S * 3
        batch = bytearray(len(keys) * size)                                         # PIL's layout: channels last
        for k, (path, _) in enumerate(samples):
            img, images[k] = images[k], None  # dropped after its crop: the next image is decoded into warm memory
            with img:
                img = rgb(img, path)
            crop = (pil_resized_crop(img, boxes[k], bicubic[k], S) if self.random_crop else
                    pil_center_crop(img, S, self.crop_pct))
            batch[k * size:(k + 1) * size] = crop.tobytes()
        x = torch.frombuffer(batch, dtype=torch.uint8).view(len(keys), S, S, 3)    # the buffer, not a copy
        return x.permute(0, 3, 1, 2), torch.tensor([label for _, label in samples])


def pillow_coefficients(length, n_out, bicubic):
    """Pillow's resize weights (Resample.c's precompute_coeffs and normalize_coeffs_8bpc) for an axis of `length`
    input pixels -> n_out, as the integers Pillow uses: (n_out, length) float64. Output pixel i averages input pixels
    j in [int(c - support + .5), int(c + support + .5)) around c = (i + .5) length / n_out with weights
    kernel(((j - c) + .5) / max(1, scale)) (antialiased when shrinking), normalized by their sum (taken in order),
    then scaled by 2^22 and rounded half away from zero. All in float64, as Pillow."""
    scale = length / n_out                                                                 # input pixels per output
    filterscale = max(scale, 1.0)
    support, inv = (2.0 if bicubic else 1.0) * filterscale, 1.0 / filterscale
    c = (torch.arange(n_out, dtype=torch.float64).view(-1, 1) + 0.5) * scale              # (n_out, 1)
    j = torch.arange(length, dtype=torch.float64)                                           # (length,)
    inside = (j >= (c - support + 0.5).trunc().clamp(min=0)) & (j < (c + support + 0.5).trunc().clamp(max=length))
    t = (((j - c) + 0.5) * inv).abs()
    a = -0.5                                                   # Pillow's bicubic: cubic convolution, a = -0.5
    cubic = torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1, torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0))
    w = torch.where(inside, cubic if bicubic else (1 - t).clamp(min=0), 0.0)                # bilinear: a triangle
    total = w.cumsum(-1)[:, -1:]                                                            # Pillow sums in order
    w = torch.where(total != 0, w / total, w) * 2 ** 22
    return torch.where(w < 0, -(0.5 - w).floor(), (0.5 + w).floor())


def resize_tables(n_in, size):
    """Every matrix a crop of an axis of n_in pixels can need, made once: (2, n_in, size, 2 n_in) float32 (Pillow's
    integer weights are exact in float32), entry [bicubic, length - 1] the weights of the pixels [0, length) after
    n_in zero columns. Its window of n_in columns that starts at column n_in - start is the matrix of the pixels
    [start, start + length): table.unfold(-1, n_in, 1)[bicubic, length - 1, :, n_in - start] (see resized_crop)."""
    table = torch.zeros(2, n_in, size, 2 * n_in)
    for bicubic in (0, 1):
        for length in range(1, n_in + 1):
            table[bicubic, length - 1, :, n_in:n_in + length] = pillow_coefficients(length, size, bool(bicubic))
    return table


def crop_index(boxes, bicubic, H, W):
    """Host: boxes (B, 4) (top, left, h, w) and bicubic (B,) -> (B, 2, 3) int64, for each axis the index
    (bicubic, length - 1, size - start) of its matrix in resize_tables."""
    top, left, h, w = boxes.long().unbind(1)
    k = bicubic.long()
    return torch.stack([torch.stack([k, h - 1, H - top], 1), torch.stack([k, w - 1, W - left], 1)], 1)


def resized_crop(x, index, tables):
    """Crop each image of x (B, C, H, W) uint8 to its box and resize it to size x size as Pillow does: each pass
    sums integer weights times pixels from 2^21 (exact in float64), shifts by 22 bits and clips to uint8; the
    horizontal pass first. index (B, 2, 3) from crop_index, tables (rows', columns' resize_tables) on x's device.
    -> uint8 (B, C, size, size): Pillow's values exactly (tests/test_augment.py).
    # deviation: Pillow >= 13 resizes vertically first when the height loses more than twice as many pixels as the
    # width (older Pillow, which the official code ran, never): there its values may differ by a few levels. A crop
    # of CIFAR's 32 x 32 images back to 32 never does."""
    B, C, H, W = x.shape
    windows = (table.unfold(-1, n, 1) for table, n in zip(tables, (H, W)))      # (2, n, S, n + 1, n) views
    Wy, Wx = (w[i[:, 0], i[:, 1], :, i[:, 2]].double() for w, i in zip(windows, index.unbind(1)))  # (B, S, H/W)
    x = torch.bmm(x.double().view(B, C * H, W), Wx.mT).add_(2 ** 21).div_(2 ** 22).floor_().clamp_(0, 255)
    x = (Wy.unsqueeze(1) @ x.view(B, C, H, -1)).add_(2 ** 21).div_(2 ** 22).floor_().clamp_(0, 255)
    return x.to(torch.uint8)                                                          # (B, C, S, S)


# ----------------------------------------------------------------------------------------------------------------
# RandAugment on the device: the three kinds of ops

class Constants:
    """Tensors every step needs, made once per device, image size and batch size: built on the host and moved to
    the device in one non-blocking copy (made on the device at every step, each would be a host-to-device copy).
    RandAugment's for H x W images; `extra` adds the caller's own (CPU tensors), e.g. Augment's tables."""

    def __init__(self, device, H, W, fill, n, **extra):
        Wp, f64 = W + 4, torch.float64
        rows, cols = torch.arange(H).view(-1, 1), torch.arange(W)
        y, x = rows.expand(H, W).reshape(-1), cols.expand(H, W).reshape(-1)
        k = torch.arange(-1, 3)
        clamp_rows, clamp_cols = torch.arange(-2, H + 2).clamp(0, H - 1), torch.arange(-2, W + 2).clamp(0, W - 1)
        t = dict(
            ramp=torch.arange(256, dtype=f64), ramp_int=torch.arange(256), c255=torch.tensor(255.0, dtype=f64),
            one=torch.ones((), dtype=torch.int32),
            fill=torch.tensor(fill, dtype=torch.uint8).view(1, -1, 1, 1),
            ## Pillow's convert('L') + 2^15 (its rounding) as a 1x1 convolution; SMOOTH's kernel + 6.5 (see blend_ops)
            gray=torch.tensor([19595.0, 38470.0, 7471.0]).view(1, 3, 1, 1), gray_bias=torch.tensor([32768.0]),
            smooth=torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]).expand(3, 1, 3, 3).contiguous(),
            smooth_bias=torch.full((3,), 6.5),
            interior=((rows > 0) & (rows < H - 1) & (cols > 0) & (cols < W - 1)).view(1, 1, H, W),
            ## index (i C + c) 256 of table c of image i, for n images (see point_ops)
            channel=(torch.arange(n * len(fill), dtype=torch.int32) * 256).view(n, -1, 1, 1),
            ## the warp reads each image with a 2-pixel border that repeats its edge, flat: pad[0][i (W + 4) + j] is
            ## the pixel at row i - 2, column j - 2, clamped; pad[1] is the transposed image's ((W + 4) rows)
            pad=torch.stack([(clamp_rows.view(-1, 1) * W + clamp_cols).view(-1),
                             (clamp_cols.view(-1, 1) + clamp_rows * W).view(-1)]),
            xyin=torch.stack([x, y]).to(f64) + 0.5,                                 # (2, H W): pixel centres
            size32=torch.tensor([W, H], dtype=torch.float32).view(1, 2, 1),
            last=torch.tensor([W - 1, H - 1]).view(1, 2, 1),
            line=torch.stack([y, x]),                                              # (2, H W): row, column of each pixel
            ## where the window of a pixel's line starts in the padded image, less 1: X ops read row y (width
            ## W + 4), Y ops row x of the transposed image (width H + 4); rotation reads 4 rows
            line_base=torch.stack([(y + 2) * Wp + 1, (x + 2) * (H + 4) + 1]),
            rows4=(k + 2) * Wp + 1,
            **extra)
        t['xin32'], t['yin32'] = (v.float().view(1, 1, -1) for v in t['xyin'])
        self.__dict__.update(to_device(t, device))
        self.n = n


def randaug_layer(x, t, facts, c, prefix=''):
    """Apply one RandAugment layer planned by plan_layer (t: its tensors on the device, facts: on the host) to the
    uint8 batch x in place: the images an op changes are read once, each kind of op runs once on its slice of
    them, and they are written back once."""
    i = t[prefix + 'changed']
    if len(i):
        xs, P, B = x.index_select(0, i), facts['point'], facts['point'] + facts['blend']
        parts = [(xs[:P], point_ops), (xs[P:B], blend_ops), (xs[B:], warp)]
        x.index_copy_(0, i, torch.cat([fn(part, t, facts, c, prefix) for part, fn in parts if len(part)]))
    return x


def point_ops(x, t, facts, c, p):
    """Invert, Posterize, Solarize, SolarizeAdd, Brightness, AutoContrast, Equalize: out = table[image, channel, in].
    The first five tables come from the host; AutoContrast's and Equalize's (the last images) from each channel's
    histogram, as Pillow's ImageOps computes them (in Python, on integers and doubles)."""
    n, C, H, W = x.shape
    table, k = t[p + 'point_table'].view(n, 1, 256).expand(n, C, 256), facts['point_data']
    if k:
        xd = x[n - k:]                                                                # (k, C, H, W)
        idx = (xd + c.channel[:k]).view(-1)                                           # (k C H W,) int32
        hist = torch.zeros(k * C * 256, dtype=torch.int32, device=x.device)
        hist = hist.index_add_(0, idx, c.one.expand(idx.numel())).view(k, C, 256)
        lo, hi = xd.view(k, C, H * W).aminmax(dim=-1, keepdim=True)                  # (k, C, 1): darkest, brightest
        spread = hi > lo
        ## ImageOps.autocontrast: int(v * s + (-lo * s)), s = 255.0 / (hi - lo), clipped; identity when hi == lo
        s = c.c255 / (hi - lo)                               # a true division (255 / t would be 255 * (1 / t))
        auto = torch.where(spread, (c.ramp * s - lo * s).clamp(0, 255), c.ramp).to(torch.uint8)
        ## ImageOps.equalize: step = (pixels - count of the brightest value) // 255; table[v] = (step // 2 + number
        ## of pixels darker than v) // step, clipped to 255 by Image.point; identity for one value or step 0
        step = (H * W - hist.gather(-1, hi.long())) // 255
        darker = hist.cumsum(-1) - hist
        equal = ((step // 2 + darker) // step.clamp(min=1)).clamp(max=255)
        equal = torch.where((step > 0) & spread, equal, c.ramp_int).to(torch.uint8)
        table = torch.cat([table[:n - k], torch.where(t[p + 'point_auto'].view(k, 1, 1), auto, equal)])
    return table.reshape(-1).index_select(0, (x + c.channel[:n]).view(-1)).view(n, C, H, W)


def blend_ops(x, t, facts, c, p):
    """Color, Contrast, Sharpness (ImageEnhance), images in this order: Image.blend(degenerate, x, f) =
    degenerate + f (x - degenerate) in float32 as Pillow's C code, clipped and truncated. Degenerate: the gray
    image (Color), its mean rounded (Contrast), the image smoothed (Sharpness)."""
    n, C, H, W = x.shape
    xf, gray_ones, sharp = x.float(), facts['color'] + facts['contrast'], facts['sharp']
    degenerate = []
    if gray_ones:
        ## convert('L'): (19595 R + 38470 G + 7471 B + 2^15) >> 16, exact in float32 (< 2^24)
        gray = nnF.conv2d(xf[:gray_ones], c.gray, c.gray_bias).div_(65536).floor_()
        ## ImageEnhance.Contrast: int(mean + 0.5) of the gray image, the mean in float64 as Python's
        mean = (gray[facts['color']:].mean((2, 3), keepdim=True, dtype=torch.float64) + 0.5).floor_().float()
        degenerate += [gray[:facts['color']].expand(-1, C, -1, -1), mean.expand(-1, C, H, W)]
    if sharp:
        ## ImageFilter.SMOOTH: (3x3 ones, 5 in the centre) / 13, rounded, border pixels kept. Pillow computes
        ## 0.5 + sum of v * (k / 13) in float32 and truncates; here floor((sum + 6.5) / 13): the same integer, as
        ## sum / 13 is never within 0.038 of a half
        smooth = nnF.conv2d(xf[n - sharp:], c.smooth[:C], c.smooth_bias[:C], padding=1, groups=C).div_(13).floor_()
        degenerate.append(torch.where(c.interior, smooth, xf[n - sharp:]))
    degenerate = torch.cat(degenerate)
    f = t[p + 'blend_factor'].view(n, 1, 1, 1)
    return (degenerate + f * (xf - degenerate)).clamp_(0, 255).to(torch.uint8)


def horner(p, d):
    """Pillow's polynomial p1 + d (p2 + d (p3 + d p4)) in its order, p (..., 4) -> (...), in d's precision."""
    p1, p2, p3, p4 = p.unbind(-1)
    return p1 + d * (p2 + d * (p3 + d * p4))


def warp(x, t, facts, c, p):
    """Rotate, ShearX/Y, TranslateX/YRel: Pillow's Image.transform(AFFINE, matrix, resample, fillcolor) as its
    Geometry.c computes it. Output pixel (x, y) samples the input at xin = a (x + .5) + b (y + .5) + c, yin likewise;
    a point outside [0, W) x [0, H) gets the fill colour. The 4 x 4 (bicubic) or 2 x 2 (bilinear) neighbours, clamped
    to the image, are interpolated along each row with dx = xin - .5 - floor(xin - .5), then down the column with dy.
    Shear and translate move pixels along one axis: the other pass is the identity (d = 0 exactly), so they are one
    1-D pass, in float64 as Pillow (tests/test_augment.py shows float32 is not enough: a translation by 0.6 pixel puts
    1 in 25 values 1 off). Rotation is 2-D: 16 neighbours per pixel, in float32.
    # deviation: rotation in float32 (Pillow: float64): about 1 value in 10^4 is 1 off (measured in the tests)."""
    n, C, H, W = x.shape
    ## each image padded by 2 pixels that repeat its edge (Pillow clamps neighbours to the image), flat; a Y op's
    ## image transposed, so that every 1-D pass reads 4 consecutive values: one window of unfold(.., 4, 1). In
    ## float16: the samples (0..255) and the p's made of them (integers below 1021) are exact, at half the bytes.
    xp = x.view(n, C, H * W).gather(2, c.pad[t[p + 'warp_pad']].unsqueeze(1).expand(-1, C, -1)).half()
    windows = xp.unfold(2, 4, 1)                                                      # (n, C, L - 3, 4) view
    taps = lambda w, base: w.gather(2, base.view(len(w), 1, -1, 1).expand(-1, C, -1, 4))  # (., C, len(base), 4)
    m, R, out, inside = t[p + 'warp_interp'].half(), facts['rotate'], [], []
    if R:
        a = t[p + 'rotate'].view(R, 2, 3, 1)
        pts = a[:, :, 0] * c.xin32 + a[:, :, 1] * c.yin32 + a[:, :, 2]                   # (R, 2, H W): xin, yin
        inside.append(((pts >= 0) & (pts < c.size32)).all(1))
        pts = pts - 0.5
        corner = pts.floor()
        d = pts - corner
        corner = corner.long().clamp(min=-1).clamp(max=c.last)                       # outside points: any pixel
        base = (corner[:, 1] * (W + 4) + corner[:, 0]).unsqueeze(-1) + c.rows4       # (R, H W, 4): rows y0-1..y0+2
        v = taps(windows[:R], base)                                                   # (R, C, H W 4, 4)
        rows = horner(torch.bmm(v.view(R, -1, 4), m[:R]).view(R, C, H * W, 4, 4), d[:, 0].view(R, 1, -1, 1))
        col = horner(torch.bmm(rows.view(R, -1, 4), m[:R].float()).view(R, C, H * W, 4), d[:, 1].view(R, 1, -1))
        out.append(col.clamp_(0, 255).to(torch.uint8))
    if n > R:
        along, r = t[p + 'axis_line'], t[p + 'axis_offset']                          # 0: X op (rows), 1: Y op
        s = c.xyin[along] + r.gather(1, c.line[along])                                # (A, H W) float64
        inside.append((s >= 0) & (s < t[p + 'axis_size']))
        s = s - 0.5
        start = s.floor()
        d = (s - start).to(facts.get('axis_dtype', torch.float64))
        start = start.long().clamp(min=-1).clamp(max=t[p + 'axis_last'])
        v = taps(windows[R:], start + c.line_base[along])                             # (A, C, H W, 4)
        val = horner(torch.bmm(v.view(n - R, -1, 4), m[R:]).view(n - R, C, H * W, 4), d.view(n - R, 1, -1))
        out.append(val.clamp_(0, 255).to(torch.uint8))
    out = torch.cat(out).view(n, C, H, W)
    return torch.where(torch.cat(inside).view(n, 1, H, W), out, c.fill[:, :C])


def randaug_op(x, name, arg, bicubic, fill, axis_dtype=torch.float64):
    """One RandAugment op applied to every image of x (uint8, any device) with arguments arg (n,) and
    interpolations bicubic (n,) (host tensors): the same code path as Augment's, for tests and for users.
    axis_dtype: the precision of shear and translate (float64, as Pillow; tests show float32 is not enough)."""
    n, _, H, W = x.shape
    host, facts = plan_layer(torch.full((n,), RA_OPS.index(name)), arg.double(), bicubic.bool(), H, W)
    with no_tf32():
        return randaug_layer(x.clone(), to_device(host, x.device), dict(facts, axis_dtype=axis_dtype),
                             Constants(x.device, H, W, fill, n))


# ----------------------------------------------------------------------------------------------------------------
# mixing, erasing, normalizing

def draw_mix(n, mixup, cutmix, H, W):
    """timm's Mixup draws for one batch (prob 1, switch 0.5, mode 'batch', correct_lam): lambda ~ Beta(alpha,
    alpha), MixUp or CutMix 50/50; CutMix's box of sqrt(1 - lambda) of each side at a uniform centre, clipped,
    lambda set to the area kept (timm 0.3.2 / 0.4.12's box, the official code's). -> (lam, box or None), host."""
    if not (mixup > 0 or cutmix > 0):
        return 1.0, None
    cut = cutmix > 0 and (mixup == 0 or float(torch.rand(())) < 0.5)
    alpha = cutmix if cut else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if not cut:
        return lam, None
    ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(H, ())), int(torch.randint(W, ()))
    yl, yh, xl, xh = max(cy - ch // 2, 0), min(cy + ch // 2, H), max(cx - cw // 2, 0), min(cx + cw // 2, W)
    return 1 - (yh - yl) * (xh - xl) / (H * W), (yl, yh, xl, xh)


def mix(x, y, lam, box, num_classes, smoothing, rint):
    """timm's Mixup and mixup_target: image i is mixed with image B-1-i (timm's x.flip(0); repeated augmentation
    puts an image's copies next to each other, so a neighbour is often a copy). y (B,) labels -> smoothed soft
    targets (B, classes). rint: x is uint8, mixed in float32 and rounded as timm's uint8 collate does."""
    if box is not None:
        yl, yh, xl, xh = box
        x[..., yl:yh, xl:xh] = x[..., yl:yh, xl:xh].flip(0)                             # in place: x is ours
    elif lam < 1:
        xf = x.float() if rint else x
        x = xf * lam + xf.flip(0) * (1 - lam)
        x = x.round_().to(torch.uint8) if rint else x
    off = smoothing / num_classes
    t = torch.full((len(y), num_classes), off, device=y.device).scatter_(1, y.view(-1, 1), 1 - smoothing + off)
    return x, t * lam + t.flip(0) * (1 - lam)


def erase(x, idx, rows, cols):
    """Per-pixel N(0, 1) noise (the device's RNG) where rows (n, S) and cols (n, S) of the images idx are both set."""
    part = x.index_select(0, idx)
    inside = (rows.unsqueeze(-1) & cols.unsqueeze(-2)).unsqueeze(1)                   # (n, 1, S, S)
    return x.index_copy_(0, idx, torch.where(inside, torch.randn_like(part), part))


# ----------------------------------------------------------------------------------------------------------------
# the recipe

class Augment:
    """The recipe's augmentation: uint8 batch (B, 3, H, W) + labels on the device -> normalized float images
    (B, 3, S, S) + smoothed soft targets. timm's order: [RandomResizedCrop (crop=True; an image folder is cropped in
    its workers)] -> h-flip -> RandAugment, then either MixUp/CutMix on the uint8 batch -> normalize -> RandomErasing
    (mix_first: ViT-Lite, timm's prefetching loader), or normalize -> RandomErasing -> MixUp/CutMix (DeiT: per-image
    transform, then Mixup in the training loop). Random draws come from torch's global RNGs: seed them per step
    (torch.manual_seed) and a step's augmentation is a function of that seed."""

    def __init__(self, img_size, mean, std, num_classes, *, crop=True, crop_scale=(0.08, 1.0),
                 interpolation='bicubic', hflip=0.5, randaug='rand-m9-mstd0.5-inc1', mixup=0.8, cutmix=1.0,
                 smoothing=0.1, reprob=0.25, mix_first=False):
        if interpolation not in BICUBIC_SHARE:
            raise ValueError(f'interpolation {interpolation!r} is invalid; valid: {", ".join(BICUBIC_SHARE)}')
        self.S, self.K, self.crop, self.scale = img_size, num_classes, crop, tuple(crop_scale)
        self.bicubic_p, self.hflip, self.ra = BICUBIC_SHARE[interpolation], hflip, parse_randaug(randaug)
        self.mixup, self.cutmix, self.smoothing, self.reprob, self.mix_first = mixup, cutmix, smoothing, reprob, mix_first
        self.mean, self.std = mean, std
        self.fill = [min(255, round(255 * m)) for m in mean]                          # timm's img_mean
        self._consts = {}

    def constants(self, device, B, H, W):
        """The constants of a batch of B images of H x W on `device`: RandAugment's (at the output size), the
        normalization table, and the resize tables of the crop (or of the evaluation resize when H, W != S)."""
        key, S = (str(device), H, W), self.S
        if key not in self._consts or self._consts[key].n < B:
            ## normalize as timm does, (v / 255 - mean) / std in float32, for every value v, per channel: (C 256,)
            v = torch.arange(256, dtype=torch.float32) / 255
            extra = dict(normalize=((v - torch.tensor(self.mean).view(-1, 1)) / torch.tensor(self.std).view(-1, 1)).view(-1))
            if self.crop or (H, W) != (S, S):
                extra.update(rows=resize_tables(H, S), cols=resize_tables(W, S) if W != H else None,
                             whole=crop_index(torch.tensor([[0, 0, H, W]]), torch.ones(1, dtype=torch.bool), H, W))
            c = Constants(device, S, S, self.fill, max(B, 256), **{k: v for k, v in extra.items() if v is not None})
            if hasattr(c, 'rows'):
                c.resize = (c.rows, getattr(c, 'cols', c.rows))
            self._consts[key] = c
        return self._consts[key]

    def draw(self, B, H, W):
        """Every random draw of one step, on the host: (tensors for the device, facts for the host)."""
        S, host, facts = self.S, {}, {}
        if self.crop:
            host['crop'] = crop_index(rrc_boxes(B, H, W, self.scale), torch.rand(B) < self.bicubic_p, H, W)
        host['flip'] = torch.rand(B) < self.hflip
        facts['layers'] = []
        for k, (op, arg, bicubic) in enumerate(draw_randaug(B, self.ra, self.bicubic_p) if self.ra else ()):
            plan, f = plan_layer(op, arg, bicubic, S, S, prefix=f'ra{k}_')
            host.update(plan)
            facts['layers'].append(f)
        facts['mix'] = draw_mix(B, self.mixup, self.cutmix, S, S)
        boxes = erase_boxes(B, S, S, self.reprob) if self.reprob > 0 else torch.zeros(B, 4)
        erased = (boxes[:, 2] > 0).nonzero()[:, 0]
        top, left, h, w = boxes[erased].view(-1, 4, 1).unbind(1)
        line = torch.arange(S)
        host.update(erase=erased, erase_rows=(line >= top) & (line < top + h), erase_cols=(line >= left) & (line < left + w))
        facts['erase'] = len(erased)
        return host, facts

    def normalize(self, x, c):
        """uint8 (B, C, S, S) -> (v / 255 - mean) / std, float32, as a lookup per channel (table c at c 256)."""
        return c.normalize.index_select(0, (x + c.channel[:1]).view(-1)).view(x.shape)

    def __call__(self, x, y):
        """x uint8 (B, C, H, W) and labels y (B,) on the device (x is consumed: it may be changed in place) ->
        normalized float images (B, C, S, S), soft targets (B, num_classes)."""
        x = x.contiguous()                                     # an image folder's batches come channels last
        B, _, H, W = x.shape
        c = self.constants(x.device, B, H, W)
        host, facts = self.draw(B, H, W)
        t = to_device(host, x.device)                                                 # the step's one copy
        with no_tf32():
            if self.crop:
                x = resized_crop(x, t['crop'], c.resize)
            elif (H, W) != (self.S, self.S):
                x = resized_crop(x, c.whole.expand(B, 2, 3), c.resize)
            x = torch.where(t['flip'].view(-1, 1, 1, 1), x.flip(-1), x)
            for k, f in enumerate(facts['layers']):
                x = randaug_layer(x, t, f, c, prefix=f'ra{k}_')
            lam, box = facts['mix']
            if self.mix_first:
                x, target = mix(x, y, lam, box, self.K, self.smoothing, rint=True)
            x = self.normalize(x, c)
            if facts['erase']:
                x = erase(x, t['erase'], t['erase_rows'], t['erase_cols'])
            if not self.mix_first:
                x, target = mix(x, y, lam, box, self.K, self.smoothing, rint=False)
        return x, target

    def eval(self, x):
        """Evaluation: uint8 (B, C, H, W) -> normalized float (B, C, S, S), resized (bicubic) when H, W != S."""
        x = x.contiguous()
        B, _, H, W = x.shape
        c = self.constants(x.device, B, H, W)
        if (H, W) != (self.S, self.S):
            with no_tf32():
                x = resized_crop(x, c.whole.expand(B, 2, 3), c.resize)
        return self.normalize(x, c)


# ----------------------------------------------------------------------------------------------------------------
# feeding it: which images each step takes (and with which crop seed), and how they reach the device

CIFAR100_URL = 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'
CIFAR100_MD5 = 'eb9058c3a382ffc7106e4002c42a8d85'


def fetch_cifar100(root, local_rank=0):
    """CIFAR-100's python version under root/cifar-100-python, downloaded if missing: by local rank 0, extracted
    aside and moved in whole, while the node's other processes wait up to an hour for it to appear (call it before
    any collective, whose timeout a slow download would exceed). OSError if the download fails (offline, proxy, disk
    full...), TimeoutError if the wait does."""
    folder = os.path.join(root, 'cifar-100-python')
    if os.path.isdir(folder):
        return
    if local_rank == 0:
        tmp = os.path.join(root, f'.cifar-100-download-{os.getpid()}')
        try:
            torchvision.datasets.utils.download_and_extract_archive(CIFAR100_URL, tmp, md5=CIFAR100_MD5)
            os.replace(os.path.join(tmp, 'cifar-100-python'), folder)
        except Exception as e:
            raise OSError(f'CIFAR-100 is not at {folder} and the download failed ({type(e).__name__}: {e})') from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    deadline = time.time() + 3600
    while not os.path.isdir(folder):
        if time.time() > deadline:
            raise TimeoutError(f'waited an hour for local rank 0 to download CIFAR-100 into {folder} (see its message)')
        time.sleep(1)


class CifarUnpickler(pickle.Unpickler):
    """CIFAR-100's python files are pickles: unpickling runs whatever a file names. This one admits only what those
    files hold (dicts, lists, bytes, ints and numpy arrays), so a crafted file is an error, not code run."""
    ALLOWED = {('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.multiarray', '_reconstruct'),
               ('numpy._core.multiarray', '_reconstruct'), ('numpy.core.multiarray', 'scalar'),
               ('numpy._core.multiarray', 'scalar'), ('numpy.core.numeric', '_frombuffer'),
               ('numpy._core.numeric', '_frombuffer'), ('_codecs', 'encode')}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'it names {module}.{name}, which a CIFAR-100 file does not hold')
        return super().find_class(module, name)


def read_cifar100(path):
    """A file of CIFAR-100's python version (train or test) -> uint8 images (n, 3, 32, 32), fine labels (n,): the
    in-memory set MemoryBatches slices. ValueError (or the unpickler's error) says what is wrong with it."""
    with open(path, 'rb') as f:
        d = CifarUnpickler(f, encoding='bytes').load()
    images = torch.as_tensor(d[b'data'], dtype=torch.uint8).view(-1, 3, 32, 32)        # (n, 3072) -> (n, 3, 32, 32)
    labels = torch.as_tensor(d[b'fine_labels'], dtype=torch.long)
    if len(labels) != len(images) or not 0 <= labels.min() <= labels.max() < 100:
        raise ValueError(f'{len(images)} images, {len(labels)} labels in [{labels.min()}, {labels.max()}]')
    return images, labels


def derive_seed(*keys):
    """A 63-bit seed that is a pure function of the keys (seed, epoch, step or sample position, rank, ...): seeding
    each step's draws (and each image's crop) with one makes a resumed run draw what the uninterrupted run drew."""
    return int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), 'little') >> 1


class EpochSampler(torch.utils.data.Sampler):
    """This process's samples of one epoch from step `start_step` on: indices, or keys (index, crop seed) for
    FolderCrops. batch_size is a process's; a step's global batch is batch_size x world. Plain: a permutation seeded
    by (seed, epoch) cut into global batches, process `rank` taking chunk `rank` of each, so 1 process and k
    processes see the same samples in every step. Repeated augmentation (DeiT): see ra_indices."""

    def __init__(self, n, batch_size, world=1, rank=0, seed=0, repeated=False):
        self.n, self.b, self.B, self.world, self.rank = n, batch_size, batch_size * world, world, rank
        self.seed, self.repeated = seed, repeated
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    @property
    def steps(self):
        return self.n // 256 * 256 // self.world // self.b if self.repeated else self.n // self.B

    def indices(self):
        """This process's sample indices for the whole epoch, steps * batch_size of them."""
        perm_seed = derive_seed(self.seed, self.epoch)
        if self.repeated:
            return ra_indices(self.n, self.world, self.rank, perm_seed)[:self.steps * self.b]
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(perm_seed))[:self.steps * self.B]
        return perm.view(self.steps, self.world, self.b)[:, self.rank].reshape(-1).tolist()  # (steps, world, b)

    def keys(self):
        ## a copy of an image on another process must get another crop: the rank enters the seed; in the plain
        ## case the position in the global order does, so any world size crops an image alike
        where = lambda p: (self.rank, p) if self.repeated else (p // self.b * self.B + self.rank * self.b + p % self.b,)
        return [(int(i), derive_seed(self.seed, self.epoch, *where(p))) for p, i in enumerate(self.indices())]

    def __iter__(self):
        return iter(self.keys()[self.start_step * self.b:])


def ra_indices(n, world, rank, perm_seed, repeats=3):
    """DeiT's RASampler (repeated augmentation): permutation, each index repeated `repeats` times in a row, padded to
    a multiple of the world size, rank r takes every world-th element from r (so the copies of an image land on
    different ranks when world >= repeats), and keeps the first floor(n // 256 * 256 / world).
    # deviation: DeiT seeds the permutation with the epoch only; here it is derived from (seed, epoch)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    idx = torch.repeat_interleave(perm, repeats).tolist()
    total = int(math.ceil(n * repeats / world)) * world
    idx += idx[:total - len(idx)]
    return idx[rank:total:world][:n // 256 * 256 // world]


def eval_indices(n, world, rank):
    """Every validation sample exactly once across processes: rank r takes r, r + world, ... (no padding).
    # deviation: DeiT's --dist-eval pads with DistributedSampler (a few images counted twice); here none are."""
    return list(range(rank, n, world))


class MemoryBatches:
    """Batches (uint8 images, labels) of an in-memory set on the device: the sampler's (train) or given indices.
    The epoch's indices reach the device in one non-blocking copy; a step only slices them."""

    def __init__(self, data, device, batch_size, sampler, indices):
        self.images, self.labels = (t.to(device) for t in data.tensors)  # uint8 (n, 3, H, W), labels (n,)
        self.device, self.b, self.sampler, self.fixed = device, batch_size, sampler, indices

    def __iter__(self):
        s = self.sampler
        order = torch.tensor(self.fixed if s is None else s.indices()[s.start_step * s.b:], dtype=torch.long)
        order = to_device(dict(i=order), self.device)['i']
        for i in order.split(self.b):
            yield self.images[i], self.labels[i]


def batches(data, batch_size, device, sampler=None, indices=None, workers=0):
    """A process's batches (uint8 images, labels) for training (sampler) or evaluation (indices): an in-memory
    TensorDataset as MemoryBatches, FolderCrops through a DataLoader with `workers` processes (pinned memory on
    CUDA; the workers ignore Ctrl-C and SIGTERM, so that the main process alone decides how to stop)."""
    if isinstance(data, torch.utils.data.TensorDataset):
        return MemoryBatches(data, device, batch_size, sampler, indices)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler or [(i, 0) for i in indices],
                                       num_workers=workers, pin_memory=device.type == 'cuda',
                                       persistent_workers=workers > 0, worker_init_fn=_ignore_stop_signals,
                                       collate_fn=_whole_batch)


def _ignore_stop_signals(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C and SIGTERM reach the whole process group
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _whole_batch(batch):
    return batch  # FolderCrops.__getitems__ returns the batch already (a module-level function: workers pickle it)

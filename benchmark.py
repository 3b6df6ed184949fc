"""Benchmark: training and inference throughput and peak memory of every PE variant, against timm.

    python benchmark.py                                  # all variants of vit_lite_7_4 and deit_tiny, + timm
    python benchmark.py --device cpu --models deit_tiny --repeats 7
    python benchmark.py --quick                          # a short smoke run of the whole script (numbers meaningless)
    python benchmark.py --json bench.json                # also save the raw numbers

Prints one markdown table (for the README) headed by the hardware and the exact command line.

What is measured, per model x variant (x torch.compile on/off):
- train img/s: forward + backward + AdamW step in train mode (drop-path and attention dropout active),
  on one fixed random batch, so data loading is not part of it;
- infer img/s: forward in eval mode under torch.inference_mode();
- peak mem: peak tensor memory of building the model and training it, i.e. weights + grads + AdamW
  state + activations, one configuration at a time. CUDA: torch.cuda.max_memory_allocated. CPU: torch's
  MemTracker (torch.distributed._tools, private; '-' where it is missing), which counts live tensors.
- timm: the same architecture built with timm, when timm is importable: `timm.create_model(
  'deit_*_patch16_224')` for deit_*, and for models timm does not have (vit_lite_7_4) the closest timm
  VisionTransformer (same sizes, same parameter count; a pre-norm block instead of the CCT layer, which
  does the same operations in another order), labelled "closest".

Timing is honest in the airbench way: warm-up first (this also compiles), then `--repeats` rounds; in each
round every configuration runs `--steps` steps, round-robin in a rotated order, so that drift in the
machine's speed hits every configuration alike. A throughput is the median over rounds; a ratio is the
median over rounds of the ratio within the round. CUDA steps are timed with CUDA events, CPU steps with
time.perf_counter. Nothing in the timed loop reads a value back to the host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import mpvg


# ----------------------------------------------------------------------------------------------------
# Models: ours, and timm's equivalent
# ----------------------------------------------------------------------------------------------------

_CFG_CACHE: dict[str, mpvg.ViTConfig] = {}


def model_config(name: str) -> mpvg.ViTConfig:
    """The resolved architecture of `name` (the one create_model builds), built once."""
    if name not in _CFG_CACHE:
        _CFG_CACHE[name] = mpvg.create_model(name, pe="vit").cfg
    return _CFG_CACHE[name]


def timm_name(name: str) -> str | None:
    """timm's registered model for `name` ('deit_tiny' -> 'deit_tiny_patch16_224'), or None if it has none."""
    import timm
    candidate = f"{name}_patch16_224"
    return candidate if timm.is_model(candidate) else None


def build(name: str, variant: str) -> nn.Module:
    """Our model with PE preset `variant`, or, for variant 'timm', timm's pe='vit' equivalent."""
    if variant != "timm":
        return mpvg.create_model(name, pe=variant)
    import timm
    from timm.models.vision_transformer import VisionTransformer
    cfg = model_config(name)
    ## Same regularization as ours: timm's DeiT defaults to drop_path_rate=0, which would skip work we do.
    reg = dict(drop_path_rate=cfg.drop_path_rate, attn_drop_rate=cfg.attn_drop_rate, num_classes=cfg.num_classes)
    registered = timm_name(name)
    if registered is not None:
        return timm.create_model(registered, pretrained=False, **reg)
    return VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                             depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                             qkv_bias=cfg.qkv_bias, norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps), **reg)


def timm_label(name: str) -> str:
    registered = timm_name(name)
    return f"timm `{registered}`" if registered else "timm ViT (closest)"


def make_optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the DeiT weight-decay groups (no decay for biases, norms, pos_embed, cls_token)."""
    skip = model.no_weight_decay()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n not in skip]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or n in skip]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    ## fused=True: one kernel for the whole update on CUDA (the issue asks for it); CPU keeps torch's default.
    return torch.optim.AdamW(groups, lr=1e-3, fused=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------
# One configuration: a model, its optimizer, a fixed batch, and the two functions that are timed
# ----------------------------------------------------------------------------------------------------

@dataclass
class Config:
    model_name: str
    variant: str                       # a PE preset, or 'timm'
    compile: bool
    batch_size: int
    params: int = 0
    train_s: list[float] = field(default_factory=list)   # seconds per `steps` training steps, one per round
    infer_s: list[float] = field(default_factory=list)
    peak_mem_mib: float | None = None

    @property
    def key(self) -> tuple:
        return (self.model_name, self.variant, self.compile)


class Runner:
    """Holds what one configuration needs; train / infer run n steps, launch work and never sync."""

    def __init__(self, c: Config, device: torch.device, amp_dtype: torch.dtype | None):
        torch.manual_seed(0)
        cfg = model_config(c.model_name)
        self.raw_model = build(c.model_name, c.variant).to(device)
        c.params = sum(p.numel() for p in self.raw_model.parameters())
        ## dynamic=False: each configuration is compiled for its own fixed shapes, as in a training run. Without it,
        ## a second model class instance with another batch size or token count recompiles the shared forward
        ## with dynamic shapes (torch's automatic_dynamic_shapes), and later configurations run slower kernels.
        self.model = torch.compile(self.raw_model, dynamic=False) if c.compile else self.raw_model
        self.opt = make_optimizer(self.raw_model, device)
        self.x = torch.randn(c.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
        self.y = torch.randint(0, cfg.num_classes, (c.batch_size,), device=device)
        self.autocast = partial(torch.autocast, device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def train(self, steps: int):
        self.model.train()
        for _ in range(steps):
            with self.autocast():
                loss = F.cross_entropy(self.model(self.x), self.y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def infer(self, steps: int):
        self.model.eval()
        with torch.inference_mode(), self.autocast():
            for _ in range(steps):
                self.model(self.x)


def timed(run, steps: int, device: torch.device) -> float:
    """Seconds that run(steps) takes, measured on the device (CUDA events) or the host clock (CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)                 # earlier work must not leak into this window
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(steps)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    run(steps)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------
# Peak memory: a separate phase, one configuration at a time, so that no other model is resident
# ----------------------------------------------------------------------------------------------------

MEM_STEPS = 2   # the first step allocates grads and AdamW state; the second shows the steady state


def measure_memory(c: Config, device: torch.device, amp_dtype) -> float | None:
    """Peak tensor memory (MiB) of building the model and training it: weights, grads, AdamW state, activations."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        r = Runner(c, device, amp_dtype)
        r.train(MEM_STEPS)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del r
        torch.cuda.empty_cache()
        return peak / 2**20
    ## The CPU allocator keeps no statistics, and the process's peak RSS mixes in library code paged in on
    ## first use and malloc's free lists (it differed by 10% between models with equal tensors). torch's
    ## MemTracker (a private API, torch >= 2.5) counts live tensors instead, like max_memory_allocated does.
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
        r = Runner(c, device, amp_dtype)
        r.train(MEM_STEPS - 1)                         # creates the AdamW state, which step 2 carries at its peak
        tracker = MemTracker()
        tracker.track_external(r.raw_model, r.opt)     # weights, grads and AdamW state count too
        with tracker:
            r.train(1)                                 # MemTracker follows a single iteration
        return tracker.get_tracker_snapshot("peak")[device]["Total"] / 2**20
    except Exception as e:                             # missing or changed private API: say so, report '-'
        print(f"  no CPU memory measurement for {c.key}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------------------------------
# What a training step asks of the device, counted without one
# ----------------------------------------------------------------------------------------------------

class DeviceOpCounter(TorchDispatchMode):
    """Counts every aten op dispatched on `device`. On PyTorch's meta device (tensors with shapes and no data) a
    step runs op for op as it would on a GPU, so a CPU can count what a GPU would do:
    - kernels: ops that are not views (a view launches no kernel);
    - copies to the device, and those that block the host (on CUDA a copy waits for the host unless it is
      non_blocking from pinned memory; the code pins what it sends, which the meta device cannot show);
    - device reads: an op that brings a device value to the host (.item(), .tolist(), bool(t), a copy to the CPU):
      on a GPU each one waits for everything queued before it (on meta it fails: a meta tensor has no value);
    - bytes: every tensor argument and result of a kernel, in full (a broadcast argument counts once), the
      float64 ones apart. An upper bound of what a kernel reads and writes."""

    VIEWS = (torch.ops.aten._unsafe_view.default, torch.ops.aten.alias.default)
    COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device = device
        self.kernels = self.views = self.copies_in = self.blocking = self.reads = 0
        self.bytes = self.bytes_f64 = 0
        self.kinds: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on = lambda t: isinstance(t, torch.Tensor) and t.device.type == self.device
        ## reads and copies are counted before the op runs: on meta, a read raises
        if func is torch.ops.aten._local_scalar_dense.default and on(args[0]):
            self.reads += 1
        if func in self.COPIES:
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            to = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device") or src.device
            if src.device.type == "cpu" and torch.device(to).type == self.device:
                self.copies_in += 1
                self.blocking += not (kwargs.get("non_blocking") or (len(args) > 2 and args[2]))
            elif on(src) and torch.device(to).type == "cpu":
                self.reads += 1
        out = func(*args, **kwargs)
        here = [t for t in pytree.tree_flatten((args, kwargs, out))[0] if on(t)]
        if not here:
            return out
        if func.is_view or func in self.VIEWS:
            self.views += 1
            return out
        self.kernels += 1
        self.kinds[func.__name__] = self.kinds.get(func.__name__, 0) + 1
        size = lambda t: min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
        moved = sum(size(t) for t in here)
        self.bytes += moved
        self.bytes_f64 += moved if any(t.dtype == torch.float64 for t in here) else 0
        return out

    def summary(self) -> dict:
        return dict(kernels=self.kernels, copies_to_device=self.copies_in, blocking_copies=self.blocking,
                    device_reads=self.reads, gb=self.bytes / 1e9, gb_float64=self.bytes_f64 / 1e9)


AUG_PATHS = {  # per GPU, as the recipes run: DeiT's 1024 over 4 GPUs, ViT-Lite's 128 on one
    "deit": dict(model="deit_tiny", batch=256, data="imagenet"),
    "vit_lite": dict(model="vit_lite_7_4", batch=128, data="cifar100"),
}


def count_augmentation_steps(path: str, steps: int = 5, seed: int = 0) -> list[dict]:
    """Counts (DeviceOpCounter.summary) of `steps` training steps' data path on the meta device, each from the batch
    leaving the loader to the augmented batch: train.py's own loader and augmentation, configured by its recipe.
    deit: a worker's uint8 batch (256 x 224 x 224, pinned on CUDA) copied to the device, then augmented; vit_lite:
    CIFAR-100's 32 x 32 images live on the device, a batch of 128 is sliced from them and augmented. The first
    step is run before (it makes the constants once)."""
    import augment
    import train
    p = AUG_PATHS[path]
    cfg = train.resolve_config(train.build_parser().parse_args(
        ["--model", p["model"], "--global-batch-size", str(p["batch"]), "--data", p["data"]]), 1)
    meta, S, B = torch.device("meta"), cfg["img_size_resolved"], p["batch"]
    aug = train.make_augment(cfg, in_memory=path == "vit_lite")
    if path == "vit_lite":
        n = 50_000 // B * B
        data = torch.utils.data.TensorDataset(torch.zeros(n, 3, 32, 32, dtype=torch.uint8),
                                              torch.zeros(n, dtype=torch.long))
        sampler = augment.EpochSampler(n, B)
        loader = iter(train.make_loader(data, cfg, meta, sampler=sampler))
        batches = lambda: next(loader)
    else:
        x_cpu = torch.zeros(B, S, S, 3, dtype=torch.uint8).permute(0, 3, 1, 2)       # as a worker stacks it
        y_cpu = torch.zeros(B, dtype=torch.long)
        batches = lambda: (x_cpu.to(meta, non_blocking=True), y_cpu.to(meta, non_blocking=True))
    counts = []
    for step in range(steps + 1):
        torch.manual_seed(augment.derive_seed(seed, 0, step, 0, "step"))           # train.py's per-step seeding
        with DeviceOpCounter("meta") as c:
            aug(*batches())
        counts.append(c.summary())
    return counts[1:]


# ----------------------------------------------------------------------------------------------------
# train.py's data path, for both dataset shapes: in memory (CIFAR-100) and an image folder (ImageNet)
# ----------------------------------------------------------------------------------------------------

def image_folder(root: str, n: int, classes: int = 4) -> None:
    """n JPEGs of ImageNet's typical size (about 500 x 375, varied) with smooth content, in `classes` class
    folders under root/train and root/val (JPEG decoding cost depends on the size, little on the content)."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        h, w = 333 + int(torch.randint(0, 90, (), generator=g)), 500
        small = torch.randint(0, 256, (3, h // 16, w // 16), generator=g, dtype=torch.uint8).float()[None]
        img = F.interpolate(small, size=(h, w), mode="bicubic").clamp(0, 255).to(torch.uint8)[0]
        for split in ("train", "val"):
            folder = os.path.join(root, split, f"n{i % classes:08d}")
            os.makedirs(folder, exist_ok=True)
            if split == "train" or i < classes:
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i}.jpg"), quality=90)


def worker_speed(root: str, cfg: dict, rounds: int) -> tuple[float, float | None]:
    """ms per image of an image-folder worker, one thread, on the JPEGs under root: train.py's (decode, timm's random
    resized crop with Pillow, to a uint8 tensor; a batch at a time, as its DataLoader calls it) and timm's own
    (decode + RandomResizedCropAndInterpolation, an image at a time) given the very same crops, in alternating
    rounds; None for timm when it is not installed. Medians over the rounds."""
    import augment
    import torchvision
    ours = augment.FolderCrops(augment.list_images(root), cfg["img_size_resolved"], True, cfg["rrc_scale"],
                               cfg["interpolation"])
    paths = [p for p, _ in ours.samples]
    decode = torchvision.datasets.folder.default_loader
    sizes = [decode(p).size for p in paths]                                   # (width, height)
    try:
        from timm.data.transforms import RandomResizedCropAndInterpolation
        crop = RandomResizedCropAndInterpolation(cfg["img_size_resolved"], scale=tuple(cfg["rrc_scale"]),
                                                 interpolation=cfg["interpolation"])
    except ImportError:
        crop = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    per_round: dict[str, list[float]] = {"ours": [], "timm": []}
    try:
        for r in range(rounds):
            keys = [(i, r * len(paths) + i) for i in range(len(paths))]
            batch = cfg["per_process_batch_size"]
            if crop is not None:                                              # timm's own crop, our boxes
                boxes, _ = augment.crop_draws([h for _, h in sizes], [w for w, _ in sizes], cfg["rrc_scale"],
                                              1.0, [s for _, s in keys])
                crop.get_params = lambda img, scale, ratio, it=iter(boxes): next(it)
            runs = (("ours", lambda: [ours.__getitems__(keys[k:k + batch]) for k in range(0, len(keys), batch)]),
                    ("timm", crop and (lambda: [crop(decode(p)) for p in paths])))
            for who, run in runs[::1 if r % 2 else -1]:                   # who goes first alternates
                if run is None:
                    continue
                t0 = time.perf_counter()
                run()
                per_round[who].append((time.perf_counter() - t0) / len(paths) * 1e3)
    finally:
        torch.set_num_threads(threads)
    med = lambda v: statistics.median(v) if v else None
    return med(per_round["ours"]), med(per_round["timm"])


def data_pipeline(args, device: torch.device, amp_dtype) -> str:
    """train.py's own data path (loader + the recipe's whole augmentation) for each dataset shape, at the recipe's
    per-GPU batch, and what it costs next to the model:
    - CIFAR-100 shape, ViT-Lite-7/4 recipe: 32 x 32 uint8 images in memory on the device, every op batched there;
    - ImageNet shape, DeiT-Ti recipe: JPEGs (about 500 x 375) decoded and randomly cropped to 224 in --workers
      DataLoader processes, the rest batched on the device.
    Per shape: the augmentation alone on a batch already on the device, a training step of MPVG on a fixed batch
    (ms per step each), the whole data path alone and feeding training (img/s), the projected wall time of the
    full recipe's training steps at that rate (evaluation and start-up not included), and the device ops, copies
    to the device, host syncs and bytes of one augmentation step, counted on the meta device
    (count_augmentation_steps). Then an image-folder worker against timm's, per image, one thread.
    Generated images stand in for the data sets; the JPEG pool is small and read from the page cache, so the
    folder row measures decoding and augmentation, not the disk. Nothing measured is kept alive: on a GPU the
    batches of a timed window are freed as they go."""
    import tempfile

    import augment
    import train
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    shapes = [("CIFAR-100 in memory", "vit_lite", "vit_lite_7_4", 50000, 310),
              ("ImageNet folder", "deit", "deit_tiny", 1281167, 300)]
    rows, steps, worker = [], args.steps * args.repeats, None    # one long timed window per shape
    with tempfile.TemporaryDirectory() as tmp:
        for shape, path, name, n_full, epochs in shapes:
            B = args.batch_sizes.get(name, AUG_PATHS[path]["batch"])
            argv = ["--model", name, "--global-batch-size", str(B), "--workers", str(workers), "--lr", "5e-4"]
            if name == "deit_tiny":
                image_folder(os.path.join(tmp, "in"), max(256, 2 * B))   # repeated augmentation keeps n // 256 * 256
                argv += ["--data", "imagenet", "--data-path", os.path.join(tmp, "in")]
            else:
                argv += ["--data", "synthetic", "--synthetic-size", str(max(4096, 4 * B))]
            cfg = train.resolve_config(train.build_parser().parse_args(argv), 1)
            train_set, _ = train.load_data(cfg)
            in_memory = isinstance(train_set, torch.utils.data.TensorDataset)
            aug = train.make_augment(cfg, in_memory)
            sampler = augment.EpochSampler(len(train_set), B)
            loader = train.make_loader(train_set, cfg, device, sampler=sampler)

            if sampler.steps == 0:
                raise SystemExit(f"error: {shape}: batch {B} leaves no training step in an epoch of this data")

            def batches():                                      # endless, epoch after epoch, as train.py runs
                epoch, step = 0, 0
                while True:
                    sampler.set_epoch(epoch)
                    for x, y in loader:
                        torch.manual_seed(step)
                        step += 1
                        yield aug(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                    epoch += 1
            torch.manual_seed(0)
            model = mpvg.create_model(name, pe="mpvg", num_classes=train.DATASETS[cfg["data"]]["num_classes"]).to(device)
            opt = make_optimizer(model, device)
            autocast = partial(torch.autocast, device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

            def step(x, target):
                with autocast():
                    loss = train.soft_cross_entropy(model(x), target)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            def drain(k, fn=lambda x, target: None):            # batches are dropped as they go
                for _ in range(k):
                    fn(*next(it))
            it = batches()
            drain(max(args.warmup, 1), step)                    # starts the workers, fills the pipeline
            x0, y0 = next(it)                                   # a fixed augmented batch for the model alone
            S = cfg["img_size_resolved"]
            raw = torch.randint(0, 256, (B, 3, S, S) if not in_memory else (B, 3, 32, 32), dtype=torch.uint8,
                                device=device)
            labels = torch.zeros(B, dtype=torch.long, device=device)
            aug_s = timed(lambda k: [aug(raw.clone(), labels) and None for _ in range(k)], steps, device)
            model_s = timed(lambda k: [step(x0, y0) for _ in range(k)], steps, device)
            data_steps = max(4 * steps, 2 * workers + 10)       # more batches than the loader keeps ready
            data_s = timed(drain, data_steps, device)
            train_s = timed(lambda k: drain(k, step), steps, device)
            if not in_memory:
                del it, loader                                  # ends the workers: they would share the CPUs
                worker = worker_speed(os.path.join(tmp, "in", "train"), cfg, 1 if args.quick else 5)
            counts = count_augmentation_steps(path, steps=1 if args.quick else 5)
            per_epoch = n_full // 256 * 256 if cfg["repeated_aug"] else n_full // B * B
            rows.append((shape, name, B, aug_s / steps * 1e3, model_s / steps * 1e3, data_steps * B / data_s,
                         steps * B / train_s, epochs * per_epoch, counts))
    lines = [f"{hardware_line(device)}; {'bf16' if amp_dtype else 'fp32'}; {workers} DataLoader workers",
             f"command: `{args.command}`", "",
             "| data | model (MPVG) | batch | augmentation ms/step | model ms/step | data + augmentation img/s "
             "| training img/s | projected recipe | device ops/step | copies to device (blocking) | host syncs "
             "| GB/step (float64) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape, name, B, aug_ms, model_ms, data_ips, train_ips, images, counts in rows:
        hours = images / train_ips / 3600
        when = ("- (--quick)" if args.quick else f"{hours * 60:.1f} min" if hours < 1 else
                f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.0f} days")
        def span(k, f="{:.0f}"):                             # the range over the counted steps
            lo, hi = (f.format(g(c[k] for c in counts)) for g in (min, max))
            return lo if lo == hi else f"{lo}-{hi}"

        lines.append(f"| {shape} | {name} | {B} | {aug_ms:.1f} | {model_ms:.1f} | {data_ips:.0f} | {train_ips:.1f} "
                     f"| {when} | {span('kernels')} | {span('copies_to_device')} ({span('blocking_copies')}) "
                     f"| {span('device_reads')} | {span('gb', '{:.1f}')} ({span('gb_float64', '{:.1f}')}) |")
    if worker is not None:
        ours, theirs = worker
        vs = f"timm {theirs:.2f} ms, ratio {ours / theirs:.2f}" if theirs else "timm not installed"
        lines += ["", f"Image-folder worker, per image, one thread (decode + random resized crop to 224): "
                      f"train.py {ours:.2f} ms, {vs}."]
    if args.quick:
        lines += ["", "--quick: a smoke run of the script; its numbers, projections included, measure nothing."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------

def hardware_line(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"CPU {cpu} ({os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads)",
             f"torch {torch.__version__}"]
    try:
        import timm
        parts.append(f"timm {timm.__version__}")
    except ImportError:
        parts.append("timm not installed")
    if device.type == "cuda":
        parts.insert(0, f"GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    return ", ".join(parts)


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of throughput(a) / throughput(b), from seconds per round (paired by round)."""
    return statistics.median(tb / ta for ta, tb in zip(a, b))


def ratio_interval(a: list[float], b: list[float], n: int = 2000) -> tuple[float, float] | None:
    """A 95% bootstrap interval (percentile method, fixed seed) for median_ratio(a, b): how far the median of
    the per-round ratios could move on a rerun of as many rounds. None with fewer than 5 rounds."""
    ratios = [tb / ta for ta, tb in zip(a, b)]
    if len(ratios) < 5:
        return None
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n))
    return medians[int(0.025 * n)], medians[int(0.975 * n) - 1]


def fmt_interval(ci) -> str:
    return "" if ci is None else f" ({ci[0]:.2f}–{ci[1]:.2f})"


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def make_table(configs: list[Config], args, device, header: str) -> tuple[str, dict]:
    by_key = {c.key: c for c in configs}
    lines = [f"**Hardware:** {header}  ",
             f"**Command:** `{args.command}`  ",
             f"**Settings:** device {device.type}, {'bf16 autocast' if args.amp == 'bf16' else 'fp32'}"
             f"{', TF32 matmuls, fused AdamW' if device.type == 'cuda' else ''}; "
             f"{args.warmup} warm-up steps, median of {args.repeats} rounds of {args.steps} steps; "
             f"batch size {', '.join(f'{m} {args.batch_sizes[m]}' for m in args.models)}",
             "",
             "| model | variant | compile | params | train img/s | infer img/s | peak mem MiB "
             "| train vs vit | infer vs vit | train vs timm | infer vs timm |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    raw = []
    for c in configs:
        steps_imgs = args.steps * c.batch_size
        train = steps_imgs / statistics.median(c.train_s)
        infer = steps_imgs / statistics.median(c.infer_s)
        vit = by_key.get((c.model_name, "vit", c.compile))
        tm = by_key.get((c.model_name, "timm", c.compile))
        r = {"train_vs_vit": vit and median_ratio(c.train_s, vit.train_s),
             "infer_vs_vit": vit and median_ratio(c.infer_s, vit.infer_s),
             "train_vs_timm": tm and median_ratio(c.train_s, tm.train_s),
             "infer_vs_timm": tm and median_ratio(c.infer_s, tm.infer_s),
             "train_vs_vit_ci95": ratio_interval(c.train_s, vit.train_s) if vit and vit is not c else None,
             "train_vs_timm_ci95": ratio_interval(c.train_s, tm.train_s) if tm and tm is not c else None}
        label = timm_label(c.model_name) if c.variant == "timm" else c.variant
        lines.append(f"| {c.model_name} | {label} | {'on' if c.compile else 'off'} | {c.params / 1e6:.3f}M "
                     f"| {train:,.1f} | {infer:,.1f} | {fmt(c.peak_mem_mib, ',.0f')} "
                     f"| {fmt(r['train_vs_vit'])}{fmt_interval(r['train_vs_vit_ci95'])} | {fmt(r['infer_vs_vit'])} "
                     f"| {fmt(r['train_vs_timm'])}{fmt_interval(r['train_vs_timm_ci95'])} "
                     f"| {fmt(r['infer_vs_timm'])} |")
        raw.append({"model": c.model_name, "variant": c.variant, "compile": c.compile,
                    "batch_size": c.batch_size, "params": c.params, "train_img_s": train, "infer_img_s": infer,
                    "peak_mem_mib": c.peak_mem_mib, "train_s_per_round": c.train_s,
                    "infer_s_per_round": c.infer_s, **r})
    mem_note = ("not measured (--mem off)" if not args.mem else
                "torch.cuda.max_memory_allocated over building the model and two training steps"
                if device.type == "cuda" else
                "peak of live tensors (torch MemTracker) over a model's second training step, weights included")
    lines += ["",
              "img/s: images per second, median over rounds. Ratios: throughput of the row / throughput of "
              "`vit` (or timm) of the same model and compile setting, median over rounds of the per-round "
              "ratio; > 1 is faster, and a training-step time within 3% of `vit` is a ratio >= 0.971. "
              "In brackets: a 95% bootstrap interval of that median over the rounds (with 5 rounds or more). "
              "`vit` has one token more than the GAP variants (class token). "
              f"Peak mem: {mem_note}. "
              "timm ViT (closest): timm's VisionTransformer with ViT-Lite's sizes (no timm model exists); its "
              "pre-norm block runs the same layers as the CCT layer in another order.",
              ]
    return "\n".join(lines), {"hardware": header, "command": args.command, "device": device.type,
                              "amp": args.amp, "steps": args.steps, "repeats": args.repeats,
                              "warmup": args.warmup, "results": raw}


MAX_BATCH = 65536  # images per step: more would not fit any GPU's memory; a typo, not a benchmark


def parse_args(argv=None):
    ## allow_abbrev=False: `--rep 3` is an error, not a silent `--repeats 3` (or, once a flag is added, another one)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_lite_7_4", "deit_tiny"], choices=list(mpvg.MODELS))
    p.add_argument("--pe", nargs="+", default=list(mpvg.PE_PRESETS), choices=list(mpvg.PE_PRESETS),
                   help="PE variants (default: all)")
    p.add_argument("--no-timm", action="store_true", help="skip the timm rows")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", choices=["both", "on", "off"], default=None,
                   help="torch.compile the model (default: both on CUDA, off on CPU, where compiling is slow)")
    p.add_argument("--amp", choices=["bf16", "off"], default=None,
                   help="bf16 autocast (default: bf16 on CUDA, off (fp32) on CPU)")
    p.add_argument("--batch-size", nargs="+", default=[], metavar="[MODEL=]B",
                   help="images per step: one number for all models, or MODEL=B entries "
                        "(default CPU: vit_lite 64, deit 16; CUDA: 256 / 128)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed round (default CUDA 20, CPU 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds; the table shows the median (default CUDA 5, CPU 30: a noisy CPU needs many "
                        "short rounds, so that each ratio compares configurations timed moments apart)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per config first (default CUDA 10, CPU 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--mem", choices=["on", "off"], default="on", help="measure peak memory (default on)")
    p.add_argument("--json", metavar="PATH", help="also write the raw numbers to this JSON file")
    p.add_argument("--data-pipeline", action="store_true",
                   help="instead of the model table: train.py's data path for the CIFAR-100 (in memory) and "
                        "ImageNet (image folder) shapes, alone and feeding training, and the projected recipe time")
    p.add_argument("--workers", type=int, default=None, help="--data-pipeline: DataLoader workers (min(8, cpus))")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batch 2, 1 step, 1 round, 1 warm-up, no compile (numbers meaningless); "
                        "flags given explicitly win")
    args = p.parse_args(argv)
    args.command = "python benchmark.py" + (" " + shlex.join(sys.argv[1:]) if argv is None and sys.argv[1:] else "")

    ## Every value is checked here, before anything is built or timed, and as given: a default only fills in a
    ## flag that was left out, never an explicit 0.
    bad = []
    cpus = os.cpu_count() or 1
    for flag, lowest, highest in (("steps", 1, None), ("repeats", 1, None), ("warmup", 0, None), ("threads", 1, cpus),
                                  ("workers", 0, cpus)):
        value = getattr(args, flag)
        if value is not None and not lowest <= value <= (highest or value):
            bad.append(f"--{flag} {value}: must be an int >= {lowest}" +
                       (f" and <= {highest} (the CPUs of this machine)" if highest else ""))
    given_sizes = []                                   # (model or None for all, batch size), in command-line order
    for entry in args.batch_size:
        name, eq, b = entry.rpartition("=")
        if eq and name not in mpvg.MODELS:
            what = f"unknown model {name!r}" if name else "no model before '='"
            bad.append(f"--batch-size {entry}: {what}; valid: MODEL=B with MODEL one of "
                       f"{', '.join(mpvg.MODELS)}, or B for every model")
            continue
        try:
            size = int(b)
        except ValueError:
            size = None
        if size is None or not 1 <= size <= MAX_BATCH:
            bad.append(f"--batch-size {entry}: batch size {b!r} is not an int >= 1 and <= {MAX_BATCH}; valid: B or "
                       f"MODEL=B, 1 <= B <= {MAX_BATCH}")
        else:
            given_sizes.append((name or None, size))
    if args.json is not None:
        ## Checked now, not after the whole run: the folder must exist and take a new file, and the path must not
        ## be a folder. Opening for append leaves an existing file as it is; a file made here is removed again.
        existed = os.path.lexists(args.json)
        try:
            with open(args.json, "a"):
                pass
            if not existed:
                os.remove(args.json)
        except OSError as e:
            folder = os.path.dirname(os.path.abspath(args.json))
            why = ("the path is empty" if not args.json else "it is a folder" if os.path.isdir(args.json) else
                   f"no folder {folder}" if not os.path.isdir(folder) else e.strerror)
            bad.append(f"--json {args.json!r}: cannot be written ({why}); valid: a file path in an existing, "
                       f"writable folder")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        bad.append("--device cuda but torch.cuda.is_available() is False; valid: --device cpu")
    if bad:
        p.error("; ".join(bad))

    args.amp = args.amp or ("bf16" if cuda else "off")
    args.compile = args.compile or ("off" if args.quick or not cuda else "both")
    if args.steps is None:
        args.steps = 1 if args.quick else 20 if cuda else 1
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5 if cuda else 30
    if args.warmup is None:
        args.warmup = 1 if args.quick else 10 if cuda else 2
    args.mem = args.mem == "on"
    sizes = {}
    for m in args.models:
        cct = mpvg.MODELS[m].get("family") == "cct"
        sizes[m] = 2 if args.quick else (256 if cct else 128) if cuda else (64 if cct else 16)
    for name, size in given_sizes:
        for m in ([name] if name else args.models):
            sizes[m] = size
    args.batch_sizes = sizes
    return args


def main():
    args = parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
    try:
        import timm  # noqa: F401
        with_timm = not args.no_timm
    except ImportError:
        with_timm = False
    if args.data_pipeline:
        print(data_pipeline(args, device, amp_dtype))
        return
    variants = list(args.pe) + (["timm"] if with_timm else [])
    compiles = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    if True in compiles:
        ## All variants share VisionTransformer.forward, and each variant x train/eval is its own graph: more than
        ## dynamo's default of 8 per function. Past the limit it would silently run eager; raise instead.
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # < 2.7
        setattr(torch._dynamo.config, limit, 64)
        if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
            torch._dynamo.config.fail_on_recompile_limit_hit = True
    configs = [Config(m, v, comp, args.batch_sizes[m]) for m in args.models for comp in compiles for v in variants]

    if args.mem:
        for c in configs:
            print(f"memory: {c.key}", file=sys.stderr)
            c.peak_mem_mib = measure_memory(c, device, amp_dtype)

    runners = {}
    for c in configs:
        print(f"build + warm-up: {c.key}", file=sys.stderr)
        r = runners[c.key] = Runner(c, device, amp_dtype)
        r.train(args.warmup)
        r.infer(args.warmup)
    for rnd in range(args.repeats):
        print(f"round {rnd + 1}/{args.repeats}", file=sys.stderr)
        order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]   # rotate who goes first
        for c in order:
            c.train_s.append(timed(runners[c.key].train, args.steps, device))
        for c in order:
            c.infer_s.append(timed(runners[c.key].infer, args.steps, device))

    table, raw = make_table(configs, args, device, hardware_line(device))
    print(table, flush=True)
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(raw, f, indent=1)
        except OSError as e:  # checked writable at the start; a full disk shows only now
            sys.exit(f"error: --json {args.json}: could not write the numbers ({e.strerror}); the table above has them")


if __name__ == "__main__":
    main()

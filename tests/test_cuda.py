"""What only a GPU can show; every test is skipped, with the reason, on a machine without CUDA.

- each augmentation op on CUDA equals the same op on the CPU (which tests/test_augment.py compares with timm);
- a whole augmentation step and a training step never wait on the GPU (torch.cuda.set_sync_debug_mode('error')
  raises on any synchronizing call);
- train.py on CUDA: a short run killed with SIGKILL and resumed with --resume auto. On CUDA, resuming is not bitwise:
  the data order, every augmentation draw and the per-step seeds are the same as without the kill, but some of
  the GPU's kernels (the attention backward, atomic adds) sum in an order that varies from run to run, so the weights
  agree to float32 rounding, not bit for bit; the test says how close;
- --compile and bf16 autocast on the real models;
- the image-folder path with DataLoader workers and pinned memory, and torchrun's nccl process group (2 GPUs)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import augment  # noqa: E402
import mpvg  # noqa: E402
import train  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device on this machine')
CUDA, CPU = torch.device('cuda'), torch.device('cpu')
TRAIN = os.path.join(ROOT, 'train.py')
TINY = ['--embed-dim', '32', '--depth', '2', '--num-heads', '2', '--patch-size', '8', '--no-progress',
        '--warmup-epochs', '1', '--cooldown-epochs', '0']


def images(n, h, w, seed=0):
    from test_augment import natural_images
    return natural_images(n, h, w, seed)


@pytest.mark.parametrize('size', [(40, 48), (224, 224)])
@pytest.mark.parametrize('interp', ['bilinear', 'bicubic'])
@pytest.mark.parametrize('name', augment.RA_OPS)
def test_each_op_on_cuda_equals_the_cpu_op(name, interp, size):
    """Same images, same arguments: equal value for value, but Rotate (float32: the matmul of the vertical pass
    may sum in another order) up to 1 on at most 1 value in 10^4."""
    x = images(4, *size, seed=1)
    g = torch.Generator().manual_seed(0)
    level, sign = torch.rand(4, generator=g, dtype=torch.float64), torch.where(torch.rand(4, generator=g) < .5, -1., 1.)
    arg = augment.LEVEL_TO_ARG[name](level, sign.double()) if name in augment.LEVEL_TO_ARG else torch.zeros(4)
    bicubic = torch.full((4,), interp == 'bicubic')
    cpu = augment.randaug_op(x, name, arg, bicubic, (129, 124, 112))
    gpu = augment.randaug_op(x.to(CUDA), name, arg, bicubic, (129, 124, 112)).cpu()
    d = (cpu.float() - gpu.float()).abs()
    if name == 'Rotate':
        assert d.max() <= 1 and (d > 0).float().mean() <= 1e-4, (d.max(), (d > 0).float().mean())
    else:
        assert torch.equal(cpu, gpu), (name, d.max())


@pytest.mark.parametrize('recipe', ['vit_lite', 'deit'])
def test_whole_augmentation_on_cuda_equals_the_cpu(recipe):
    """The recipe's whole augmentation, MixUp/CutMix and erasing off (they draw noise from each device's own RNG):
    the crop (in-memory), flip, RandAugment and normalize give the same batch on both devices."""
    model = 'vit_lite_7_4' if recipe == 'vit_lite' else 'deit_tiny'
    cfg = train.resolve_config(train.build_parser().parse_args(
        ['--model', model, '--mixup', '0', '--cutmix', '0', '--reprob', '0']), 1)
    aug = train.make_augment(cfg, in_memory=recipe == 'vit_lite')
    x = images(32, 32, 32) if recipe == 'vit_lite' else images(16, 224, 224)
    y = torch.zeros(len(x), dtype=torch.long)
    torch.manual_seed(5)
    cpu, _ = aug(x.clone(), y)
    torch.manual_seed(5)
    gpu, _ = aug(x.to(CUDA), y.to(CUDA))
    d = (cpu - gpu.cpu()).abs()
    assert (d > 0).float().mean() <= 1e-4, (d > 0).float().mean()                # a Rotate value 1 off at most


@pytest.mark.parametrize('recipe', ['vit_lite', 'deit'])
def test_a_training_step_never_syncs(recipe):
    """torch.cuda.set_sync_debug_mode('error'): any call that makes the host wait for the GPU raises. A step of each
    recipe's augmentation (at its per-GPU batch) and of MPVG training (bf16 autocast, fused AdamW), twice after a
    warm-up that makes the constants and the optimizer state."""
    model_name = 'vit_lite_7_4' if recipe == 'vit_lite' else 'deit_tiny'
    cfg = train.resolve_config(train.build_parser().parse_args(['--model', model_name]), 1)
    B = 128 if recipe == 'vit_lite' else 64
    aug = train.make_augment(cfg, in_memory=recipe == 'vit_lite')
    data = images(B, 32, 32) if recipe == 'vit_lite' else images(B, 224, 224)
    x = data.to(CUDA) if recipe == 'vit_lite' else data.pin_memory()
    y = torch.zeros(B, dtype=torch.long).pin_memory()
    model = mpvg.create_model(model_name, pe='mpvg', num_classes=cfg['model_kwargs']['num_classes']).to(CUDA)
    opt = train.make_optimizer(model, cfg, CUDA)

    def step(s):
        torch.manual_seed(s)
        xs, t = aug(x.to(CUDA, non_blocking=True), y.to(CUDA, non_blocking=True))
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = train.soft_cross_entropy(model(xs), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        losses = [step(s) for s in (1, 2)]
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert all(torch.isfinite(v) for v in losses)


def run_cli(argv, **kw):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    return subprocess.run([sys.executable, TRAIN] + [str(a) for a in argv], capture_output=True, text=True,
                          env=env, cwd=ROOT, **kw)


def weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


def test_kill_and_resume_on_cuda(tmp_path):
    """A 4-epoch run on CUDA killed (SIGKILL) during its third epoch, then --resume auto, against the same run never
    killed: the same epochs and the same record, weights equal to float32 rounding (not bit for bit, see above)."""
    argv = ['--data', 'synthetic', '--synthetic-size', '512', '--global-batch-size', '64', '--epochs', '4',
            '--seed', '3', '--log-interval', '1'] + TINY
    whole, cut = tmp_path / 'whole', tmp_path / 'cut'
    assert run_cli(argv + ['--output-dir', whole], timeout=900).returncode == 0
    p = subprocess.Popen([sys.executable, TRAIN] + [str(a) for a in argv + ['--output-dir', cut]], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not ((cut / 'log.jsonl').exists() and len((cut / 'log.jsonl').read_text().splitlines()) >= 2):
        assert p.poll() is None, 'the run ended before it was killed'
        assert time.time() < deadline, 'two epochs took more than 10 minutes'
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = run_cli(argv + ['--output-dir', cut, '--resume', 'auto'], timeout=900)
    assert r.returncode == 0, r.stderr
    lines = lambda d: [json.loads(ln) for ln in (d / 'log.jsonl').read_text().splitlines()]
    assert [ln['epoch'] for ln in lines(cut)] == [0, 1, 2, 3] == [ln['epoch'] for ln in lines(whole)]
    a, b = weights(whole / 'last.pt'), weights(cut / 'last.pt')
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-2, worst


def test_compile_and_bf16_on_cuda(tmp_path):
    """--compile trains on CUDA (one epoch, finite loss); bf16 autocast on every variant of both real models gives the
    fp32 logits to bf16's precision."""
    r = run_cli(['--data', 'synthetic', '--synthetic-size', '256', '--global-batch-size', '64', '--epochs', '1',
                 '--compile', '--output-dir', tmp_path / 'c'] + TINY, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / 'c' / 'log.jsonl').read_text().splitlines()[0])['train_loss'] > 0
    for name, size in (('vit_lite_7_4', 32), ('deit_tiny', 224)):
        for pe in mpvg.PE_PRESETS:
            torch.manual_seed(0)
            model = mpvg.create_model(name, pe=pe).to(CUDA).eval()
            x = torch.randn(8, 3, size, size, device=CUDA)
            with torch.no_grad():
                full = model(x)
                with torch.autocast('cuda', dtype=torch.bfloat16):
                    half = model(x).float()
            assert (half - full).abs().max() <= 0.05 * full.abs().max() + 1e-2, (name, pe)


def test_image_folder_with_workers_on_cuda(tmp_path):
    """The DeiT recipe's data path on CUDA: a generated ImageNet-like folder read by 4 DataLoader workers into pinned
    memory, one epoch of a tiny DeiT."""
    import benchmark
    benchmark.image_folder(str(tmp_path / 'in'), 256)
    r = run_cli(['--model', 'deit_tiny', '--data', 'imagenet', '--data-path', tmp_path / 'in', '--img-size', '64',
                 '--patch-size', '16', '--embed-dim', '32', '--depth', '2', '--num-heads', '2',
                 '--global-batch-size', '64', '--epochs', '1', '--warmup-epochs', '0', '--workers', '4',
                 '--no-progress', '--output-dir', tmp_path / 'out'], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / 'out' / 'log.jsonl').read_text().splitlines()[0])['val_n'] == 4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='nccl needs a GPU per process: fewer than 2 GPUs here')
def test_torchrun_nccl_two_processes(tmp_path):
    """torchrun with two processes, a GPU each: the nccl process group, DDP steps, evaluation all-reduced. (With one
    process train.py starts no process group at all, so only two can show nccl.)"""
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', TRAIN,
                        '--data', 'synthetic', '--synthetic-size', '256', '--global-batch-size', '64', '--epochs', '1',
                        '--output-dir', str(tmp_path / 'd')] + TINY, capture_output=True, text=True, cwd=ROOT,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((tmp_path / 'd' / 'config.json').read_text())
    assert config['world_size'] == 2 and len(config['provenance']['devices']) == 2
    assert json.loads((tmp_path / 'd' / 'log.jsonl').read_text().splitlines()[0])['val_n'] == 64   # 256 / 4, summed

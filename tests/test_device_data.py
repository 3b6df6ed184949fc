"""The batched, on-device CIFAR path of train.py (issue 6), CPU only.

Each batched op is checked against the per-image op it replaces (ra_apply, torchvision's resized_crop / erase,
the per-image level mapping and PIL matrices) for the SAME random parameters, image by image. Where the two
must differ (bicubic next to a crop box's edge) the test says where and checks the rest exactly. Then: the
on-device sharding gives every sample of the epoch's permutation exactly once across processes, the batched
transform draws what the per-image one draws, and a run on the batched path resumes exactly."""
import os
import sys

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

FILL = (129, 124, 112)  # timm's img_mean of CIFAR-100


def images(n=12, h=32, w=32, seed=0):
    """Smooth random uint8 images (a blurred noise field), so interpolation differences stay small and visible."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g).float()
    x = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    return x.round().to(torch.uint8)


def per_image_args(name, n, seed=1):
    """n (magnitude, sign) draws for op `name` and their arguments from the PER-IMAGE mapping."""
    g = torch.Generator().manual_seed(seed)
    mags = (torch.rand(n, generator=g) * 10).tolist()
    signs = [1.0 if i % 2 else -1.0 for i in range(n)]
    return mags, signs, [train.ra_level_to_arg(name, m, s) for m, s in zip(mags, signs)]


@pytest.mark.parametrize('name', train.RA_OPS)
def test_level_mapping_matches_the_per_image_one(name):
    mags, signs, args = per_image_args(name, 40)
    mags += [0.0, 10.0, 9.0]
    signs += [1.0, -1.0, 1.0]
    args += [train.ra_level_to_arg(name, m, s) for m, s in zip(mags[-3:], signs[-3:])]
    op = torch.full((len(mags),), train.RA_OPS.index(name))
    got = train.batched_level_to_arg(op, torch.tensor(mags, dtype=torch.float64),
                                      torch.tensor(signs, dtype=torch.float64))
    want = torch.tensor([0.0 if a is None else float(a) for a in args], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize('interp', [InterpolationMode.BILINEAR, InterpolationMode.BICUBIC])
@pytest.mark.parametrize('name', train.RA_OPS)
def test_each_randaugment_op_matches_ra_apply(name, interp):
    x = images()
    n = len(x)
    _, _, args = per_image_args(name, n)
    op = torch.full((n,), train.RA_OPS.index(name))
    arg = torch.tensor([0.0 if a is None else float(a) for a in args])
    bicubic = torch.full((n,), interp == InterpolationMode.BICUBIC)
    got = train.batched_randaugment_op(x.float(), op, arg, bicubic, torch.tensor(FILL, dtype=torch.float32))
    for i in range(n):
        want = train.ra_apply(x[i], name, args[i], [float(f) for f in FILL], interp)
        diff = (got[i] - want.float()).abs()
        ## same formulas; float32 sums in another order can truncate a value on an integer boundary differently
        assert diff.max() <= 1, (name, i, args[i], diff.max())
        assert (diff > 0).float().mean() < 0.05, (name, i, (diff > 0).float().mean())


def test_mixed_ops_in_one_batch_each_image_gets_its_own():
    x = images(30)
    g = torch.Generator().manual_seed(3)
    op = torch.randint(-1, len(train.RA_OPS), (30,), generator=g)
    mag, sign = torch.rand(30, generator=g) * 10, torch.where(torch.rand(30, generator=g) < .5, 1.0, -1.0)
    arg = train.batched_level_to_arg(op, mag, sign)
    bicubic = torch.rand(30, generator=g) < .5
    got = train.batched_randaugment_op(x.float(), op, arg, bicubic, torch.tensor(FILL, dtype=torch.float32))
    assert (op == -1).any() and len(set(op.tolist())) > 10
    for i in range(30):
        if op[i] < 0:
            assert torch.equal(got[i], x[i].float())
            continue
        name = train.RA_OPS[op[i]]
        a = train.ra_level_to_arg(name, float(mag[i]), float(sign[i]))
        interp = InterpolationMode.BICUBIC if bicubic[i] else InterpolationMode.BILINEAR
        want = train.ra_apply(x[i], name, a, [float(f) for f in FILL], interp).float()
        assert (got[i] - want).abs().max() <= 1, (i, name)


def test_pil_matrices_match_the_per_image_ones():
    g = torch.Generator().manual_seed(0)
    names = ['Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel', 'Invert']
    op = torch.tensor([train.RA_OPS.index(n) for n in names] * 3)
    arg = (torch.rand(len(op), generator=g, dtype=torch.float64) - 0.5)
    arg = torch.where(op == train.RA_OPS.index('Rotate'), arg * 60, arg)
    M = train.batched_pil_matrices(op, arg, 24, 40)
    for i, k in enumerate(op.tolist()):
        a, H, W = float(arg[i]), 24, 40
        want = {'Rotate': train.pil_rotate_matrix(a, W, H), 'ShearX': (1, a, 0, 0, 1, 0),
                'ShearY': (1, 0, 0, a, 1, 0), 'TranslateXRel': (1, 0, a * W, 0, 1, 0),
                'TranslateYRel': (1, 0, 0, 0, 1, a * H), 'Invert': (1, 0, 0, 0, 1, 0)}[train.RA_OPS[k]]
        torch.testing.assert_close(M[i], torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=0)


def test_resized_crop_matches_torchvision_per_image():
    x = images(16, 32, 32)
    g = torch.Generator().manual_seed(0)
    boxes = train.batched_rrc_boxes(16, 32, 32, (0.3, 1.0), g)
    for bicubic in (False, True):
        got = train.batched_resized_crop(x.float(), boxes, 32, torch.full((16,), bicubic))
        mode = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
        for i, (top, left, h, w) in enumerate(boxes.tolist()):
            ## the per-image path's op: uint8 in fixed point, and its antialiased bicubic uses PIL's kernel
            ## (a = -0.5) where grid_sample uses a = -0.75: a few levels apart on these smooth images
            want8 = F.resized_crop(x[i], top, left, h, w, [32, 32], mode, antialias=True).float()
            assert (got[i] - want8).abs().max() <= (4 if bicubic else 1), i
            ## the same geometry and kernel in float: exact (bicubic: but for the two outer rows/columns,
            ## which see pixels beyond the box edge where crop-then-resize replicates the edge)
            want = F.resized_crop(x[i].float(), top, left, h, w, [32, 32], mode, antialias=not bicubic)
            diff = (got[i] - want.round().clamp(0, 255)).abs()
            if bicubic:  # (16 taps summed in another order: a value at .5 may round the other way)
                assert diff[:, 2:-2, 2:-2].max() <= 1 and (diff[:, 2:-2, 2:-2] > 0).float().mean() < 0.05, i
            else:
                assert diff.max() == 0, (i, diff.max())
    ## and the check can fail: a box shifted by one pixel is far off
    shifted = boxes.clone()
    shifted[:, 1] = (shifted[:, 1] + 1).clamp(max=32 - shifted[:, 3])
    moved = train.batched_resized_crop(x.float(), shifted, 32, torch.zeros(16, dtype=torch.bool))
    assert (moved - got).abs().amax(dim=(1, 2, 3)).max() > 5


def test_box_samplers_follow_torchvision_rules():
    g = torch.Generator().manual_seed(0)
    n = 4000
    top, left, h, w = train.batched_rrc_boxes(n, 32, 32, (0.08, 1.0), g).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    assert (h > 0).all() and (w > 0).all()
    ratio = w / h
    assert ratio.min() >= 3 / 4 * 0.8 and ratio.max() <= 4 / 3 * 1.25   # rounding to whole pixels widens it a bit
    frac = (h * w).float() / 1024
    assert frac.min() >= 0.05 and frac.max() <= 1.0 and 0.45 < frac.mean() < 0.6  # mean of U(0.08, 1) = 0.54
    assert len(set(left.tolist())) > 20                                 # positions spread over the image
    top, left, h, w = train.batched_erasing_boxes(n, 32, 32, 0.25, g).T
    erased = h > 0
    assert 0.2 < erased.float().mean() < 0.3                            # p = 0.25
    assert (h[erased] < 32).all() and (w[erased] < 32).all() and (top + h <= 32).all() and (left + w <= 32).all()
    assert (h[~erased] == 0).all() and (w[~erased] == 0).all()


def test_erase_matches_torchvision_erase():
    x = torch.randn(6, 3, 32, 32)
    noise = torch.randn(6, 3, 32, 32)
    boxes = torch.tensor([[0, 0, 5, 7], [10, 3, 1, 1], [31, 31, 1, 1], [4, 4, 0, 0], [2, 20, 30, 12], [0, 0, 31, 31]])
    got = train.batched_erase(x, boxes, noise)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        want = F.erase(x[i], top, left, h, w, noise[i, :, top:top + h, left:left + w]) if h else x[i]
        assert torch.equal(got[i], want), i


def tiny_cfg(*extra):
    argv = ['--data', 'synthetic', '--global-batch-size', '20', '--no-progress'] + list(extra)
    return train.resolve_config(train.build_parser().parse_args(argv), 1)


def test_randaugment_draws_match_the_per_image_draws(monkeypatch):
    """The batched draws (op, argument, interpolation) have the distribution of the per-image RandAugment's:
    the per-image draws are recorded from the real RandAugment.__call__ (ra_apply replaced by a recorder;
    ra_apply itself is tested above), over 3000 images each, and compared op by op."""
    cfg = tiny_cfg()
    tf = train.Transform(cfg, 32, (0.5,) * 3, (0.25,) * 3, train=True, folder=False)
    n = 3000
    per_image = []
    monkeypatch.setattr(train, 'ra_apply', lambda img, name, arg, fill, interp: per_image.append(
        (name, 0.0 if arg is None else float(arg), interp == InterpolationMode.BICUBIC)) or img)
    torch.manual_seed(0)
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    for _ in range(n):
        tf.ra(img)
    batched = []
    for op, arg, bicubic in train.BatchedTransform(tf, cfg).draw_randaug(n, torch.Generator().manual_seed(0)):
        batched += [(train.RA_OPS[o], a, b) for o, a, b in zip(op.tolist(), arg.tolist(), bicubic.tolist()) if o >= 0]
    ## 2 slots x p 0.5: about n ops applied in all; op counts ~ Binomial(2n, 0.5/15) = 100 +- 10 each
    assert abs(len(per_image) - len(batched)) < 0.1 * n
    for name in train.RA_OPS:
        a = [x for x in per_image if x[0] == name]
        b = [x for x in batched if x[0] == name]
        assert abs(len(a) - len(b)) < 50, (name, len(a), len(b))
        scale = max(1.0, max(abs(x[1]) for x in a + b))               # the op's largest |argument|
        mean_arg = lambda d: sum(x[1] for x in d) / len(d)              # sign included
        mean_abs = lambda d: sum(abs(x[1]) for x in d) / len(d)
        bicubic = lambda d: sum(x[2] for x in d) / len(d)
        assert abs(mean_arg(a) - mean_arg(b)) < 0.25 * scale, (name, mean_arg(a), mean_arg(b))
        if name in train.GEOMETRIC_OPS:                                 # |argument| = level * maximum
            assert abs(mean_abs(a) - mean_abs(b)) < 0.05 * scale, (name, mean_abs(a), mean_abs(b))
        assert abs(bicubic(a) - bicubic(b)) < 0.2, (name, bicubic(a), bicubic(b))
        if name in ('ShearX', 'Rotate', 'TranslateXRel'):
            ## a random sign: both halves present, magnitudes around level 0.9 of the maximum
            assert 0.3 < sum(x[1] > 0 for x in b) / len(b) < 0.7


@pytest.mark.parametrize('n,world', [(100, 2), (103, 2), (120, 4), (101, 1)])
def test_device_sharding_gives_every_sample_once_per_epoch(n, world):
    cfg = tiny_cfg('--global-batch-size', '20', '--no-aug')
    data = train.TensorImages(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.arange(n))
    tf = train.Transform(cfg, 32, (0.5,) * 3, (0.25,) * 3, train=True, folder=False)
    seen = {}
    for epoch in (0, 1):
        labels = []
        for rank in range(world):
            c = dict(cfg, per_process_batch_size=20 // world)
            sampler = train.EpochSampler(n, c, rank, world)
            sampler.set_epoch(epoch)
            batches = list(train.DeviceBatches(data, torch.device('cpu'), 20 // world, tf, c, sampler=sampler))
            assert len(batches) == n // 20 and all(len(y) == 20 // world for _, y in batches)
            labels += [int(v) for _, y in batches for v in y]
        assert len(labels) == len(set(labels)) == n // 20 * 20              # each sample at most once, none lost
        seen[epoch] = labels
    assert seen[0] != seen[1]                                               # a new permutation every epoch


def test_device_eval_covers_the_validation_set_once():
    cfg = tiny_cfg()
    data = train.TensorImages(torch.zeros(23, 3, 32, 32, dtype=torch.uint8), torch.arange(23))
    tf = train.Transform(cfg, 32, (0.5,) * 3, (0.25,) * 3, train=False, folder=False)
    labels = []
    for rank in range(3):
        loader = train.DeviceBatches(data, torch.device('cpu'), 4, tf, cfg, indices=train.eval_indices(23, 3, rank))
        labels += [int(v) for _, y in loader for v in y]
    assert sorted(labels) == list(range(23))


def test_training_on_the_batched_path_resumes_exactly(tmp_path):
    common = ['--data', 'synthetic', '--synthetic-size', '80', '--global-batch-size', '20', '--embed-dim', '32',
              '--depth', '2', '--num-heads', '2', '--patch-size', '8', '--workers', '0', '--no-progress',
              '--warmup-epochs', '1', '--device-data', 'on']

    def run(out, cooldown, resume=False):
        ## the same 3-epoch schedule: 2 cosine epochs + 1 cool-down; the interrupted run leaves the cool-down out
        argv = common + ['--epochs', '2', '--cooldown-epochs', str(cooldown), '--output-dir', str(out)]
        with pytest.raises(SystemExit) as e:
            train.main(argv + (['--resume', 'auto'] if resume else []))
        assert (e.value.code or 0) == 0

    run(tmp_path / 'a', 1)
    run(tmp_path / 'b', 0)
    run(tmp_path / 'b', 1, resume=True)
    a = torch.load(tmp_path / 'a' / 'last.pt', weights_only=True)
    b = torch.load(tmp_path / 'b' / 'last.pt', weights_only=True)
    assert a['config']['device_data_resolved'] is True
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k

"""Tests of train.py, CPU only: recipes, schedule, optimizer, samplers and whole runs. Most runs call train.main()
in this process (importing torch costs seconds per subprocess on a small machine); the torchrun, SIGTERM and
worker tests go through the real command line. The augmentation is tested against timm in test_augment.py, the
input checks and the run record under kills in test_reliability.py."""
import collections
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import augment  # noqa: E402
import mpvg  # noqa: E402
import train  # noqa: E402

TRAIN = os.path.join(ROOT, 'train.py')
TINY = ['--embed-dim', '32', '--depth', '2', '--num-heads', '2', '--patch-size', '8', '--workers', '0',
        '--no-progress', '--warmup-epochs', '1', '--cooldown-epochs', '0']
SYN = ['--data', 'synthetic'] + TINY
TIMING = ('img_per_s', 'epoch_time_s')


def run_main(argv):
    """train.main in this process -> exit code."""
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    return e.value.code or 0


def env1():
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


def log_lines(out, drop=TIMING):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [{k: v for k, v in json.loads(ln).items() if k not in drop} for ln in f if ln.strip()]


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def cfg_for(argv, world=1):
    return train.resolve_config(train.build_parser().parse_args(argv), world)


# ------------------------------------------------------------------------------------------------ schedule

@pytest.mark.parametrize('model', ['vit_lite_7_4', 'deit_tiny'])
def test_every_epochs_lr_is_what_the_official_script_gives(model):
    """timm's CosineLRScheduler driven as each official script drives it, the lr read at the start of every epoch:
    timm's train.py (Compact-Transformers) steps it with epoch + 1 after each epoch; DeiT / LaPE's main.py with
    epoch. Also the closed form with the values of the paper's Table 7: a linear warm-up from 1e-6, then
    1e-5 + (lr - 1e-5)(1 + cos(pi e / 300)) / 2, then (ViT-Lite) 10 cool-down epochs at 1e-5."""
    from timm.scheduler import CosineLRScheduler
    cfg = cfg_for(['--model', model])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg['lr'])
    sched = CosineLRScheduler(opt, t_initial=cfg['epochs'], lr_min=cfg['min_lr'], warmup_t=cfg['warmup_epochs'],
                              warmup_lr_init=cfg['warmup_lr'], cycle_limit=1, t_in_epochs=True)
    official = []
    for epoch in range(cfg['total_epochs']):
        official.append(opt.param_groups[0]['lr'])      # what this epoch trains at
        sched.step(epoch + 1 if model == 'vit_lite_7_4' else epoch)
    ours = [train.lr_at(e, cfg) for e in range(cfg['total_epochs'])]
    assert ours == pytest.approx(official, rel=1e-12, abs=0)
    lr, warm = cfg['lr'], cfg['warmup_epochs']
    closed = lambda t: (1e-6 + t * (lr - 1e-6) / warm if t < warm else
                        1e-5 + 0.5 * (lr - 1e-5) * (1 + math.cos(math.pi * t / 300)) if t < 300 else 1e-5)
    if model == 'vit_lite_7_4':
        assert cfg['total_epochs'] == 310 and ours == pytest.approx([closed(e) for e in range(310)], rel=1e-12)
    else:  # epochs 0 and 1 both train at the warm-up lr; epoch e >= 1 at lr(e - 1)
        assert cfg['total_epochs'] == 300 and ours[0] == ours[1] == 1e-6
        assert ours == pytest.approx([closed(max(e - 1, 0)) for e in range(300)], rel=1e-12)


def test_resolved_config_batch_and_lr():
    c = cfg_for(['--model', 'deit_tiny'])
    assert c['global_batch_size'] == 1024 and c['lr'] == pytest.approx(1e-3) and c['weight_decay'] == 0.05
    assert c['warmup_epochs'] == 5 and c['cooldown_epochs'] == 0 and c['repeated_aug'] and c['data'] == 'imagenet'
    assert c['eval_crop_pct'] == 1.0 and not c['mix_first'] and c['lr_epoch_lag'] == 1  # LaPE's crop; DeiT's order
    c = cfg_for(['--model', 'deit_tiny', '--global-batch-size', '256'], world=4)
    assert c['lr'] == pytest.approx(2.5e-4) and c['per_process_batch_size'] == 64
    ## DeiT's main.py scales any --lr by the global batch / 512 (issue 17); both values are recorded
    c = cfg_for(['--model', 'deit_tiny', '--lr', '3e-4', '--global-batch-size', '256'])
    assert c['lr'] == pytest.approx(1.5e-4) and c['lr_base'] == 3e-4
    assert cfg_for(['--lr', '3e-4'])['lr'] == 3e-4                         # ViT-Lite's recipe does not scale
    c = cfg_for([])
    assert (c['lr'], c['global_batch_size'], c['weight_decay'], c['data'], c['total_epochs']) == \
           (6e-4, 128, 0.06, 'cifar100', 310)
    assert c['model_kwargs'] == {'num_classes': 100} and c['mix_first'] and c['lr_epoch_lag'] == 0
    c = cfg_for(['--pe', 'pvg', '--last-ln-pe', 'none', '--layerwise-from', '2', '--no-hierarchical', '--depth', '4'])
    assert c['model_kwargs'] == dict(num_classes=100, depth=4, layerwise_from=2, hierarchical=False, last_ln_pe=None)
    with pytest.raises(train.UserError, match='cannot be split over the 3 processes'):
        cfg_for(['--global-batch-size', '100'], world=3)


def test_help_shows_each_recipes_defaults():
    r = subprocess.run([sys.executable, TRAIN, '--model', 'deit_tiny', '--help'], capture_output=True, text=True,
                       timeout=120, env=env1())
    text = ' '.join(r.stdout.split())
    assert r.returncode == 0 and '(default: None)' not in text
    assert 'image-folder eval: Resize(int(img/pct)) + CenterCrop(img) (default: vit_lite 0.875; deit 1.0)' in text
    assert 'cosine epochs (default: vit_lite 300; deit 300)' in text and 'deit 1024)' in text


# ------------------------------------------------------------------------------------------------ optimizer

def test_weight_decay_groups_per_recipe():
    m = mpvg.create_model('vit_lite_7_4', pe='vit', embed_dim=32, depth=2, num_heads=2)
    names = dict(m.named_parameters())
    ## ViT-Lite / CCT: 1-D and biases not decayed, pos_embed and cls_token decayed
    decay, no_decay = train.weight_decay_split(m, set())
    assert {'pos_embed', 'cls_token', 'patch_embed.proj.weight', 'head.weight'} <= set(decay)
    assert all(names[n].ndim >= 2 and not n.endswith('.bias') for n in decay)
    assert all(names[n].ndim <= 1 for n in no_decay) and any('norm' in n for n in no_decay)
    assert set(decay) | set(no_decay) == set(names) and not set(decay) & set(no_decay)
    opt = train.make_optimizer(m, cfg_for(['--pe', 'vit']), torch.device('cpu'))
    wd = {id(p): g['weight_decay'] for g in opt.param_groups for p in g['params']}
    assert wd[id(m.pos_embed)] == 0.06 and wd[id(m.cls_token)] == 0.06 and wd[id(m.head.bias)] == 0.0
    assert opt.defaults['betas'] == (0.9, 0.999) and opt.defaults['eps'] == 1e-8
    ## DeiT: additionally model.no_weight_decay() = pos_embed, cls_token
    d = mpvg.create_model('deit_tiny', pe='vit', embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8)
    opt = train.make_optimizer(d, cfg_for(['--model', 'deit_tiny', '--pe', 'vit']), torch.device('cpu'))
    wd = {id(p): g['weight_decay'] for g in opt.param_groups for p in g['params']}
    assert wd[id(d.pos_embed)] == 0.0 and wd[id(d.cls_token)] == 0.0 and wd[id(d.head.bias)] == 0.0
    assert wd[id(d.head.weight)] == 0.05 and wd[id(d.blocks[0].attn.qkv.weight)] == 0.05
    assert wd[id(d.blocks[0].norm1.weight)] == 0.0


# ------------------------------------------------------------------------------------------------ samplers

def test_repeated_aug_sampler_properties():
    n = 1000
    for world in (1, 2, 3, 4):
        per_rank = [augment.ra_indices(n, world, r, perm_seed=7) for r in range(world)]
        assert all(len(p) == (n // 256 * 256) // world == math.floor(n // 256 * 256 / world) for p in per_rank)
        if world >= 3:
            ## the 3 copies of an image land on 3 different ranks, never twice on one rank
            assert all(len(set(p)) == len(p) for p in per_rank)
    ## before the cut: every index exactly 3 times in all; consecutive copies go to ranks 0, 1, 2
    world = 3
    total = math.ceil(n * 3 / world) * world
    uncut = [_ra_uncut(n, world, r, 7, total) for r in range(world)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7)).tolist()
    assert all([uncut[r][j] for r in range(3)] == [i, i, i] for j, i in enumerate(perm))
    assert all(augment.ra_indices(n, world, r, 7) == uncut[r][:256] for r in range(world))
    counts = collections.Counter(i for u in uncut for i in u)
    assert set(counts.values()) == {3} and len(counts) == n
    ## deterministic per epoch, different across epochs
    assert augment.ra_indices(n, 2, 0, 7) == augment.ra_indices(n, 2, 0, 7) != augment.ra_indices(n, 2, 0, 8)
    s = augment.EpochSampler(n, 32, world=2, rank=1, seed=0, repeated=True)
    s.set_epoch(3)
    k1 = list(s)
    s.set_epoch(3)
    assert list(s) == k1 and len(k1) == s.steps * 32 == 384 and s.steps == 12


def _ra_uncut(n, world, rank, seed, total):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    idx = torch.repeat_interleave(perm, 3).tolist()
    idx += idx[:total - len(idx)]
    return idx[rank:total:world]


def test_plain_sampler_same_samples_per_step_for_any_world_size():
    n, B = 103, 16
    one = augment.EpochSampler(n, B, seed=5)
    one.set_epoch(2)
    keys1 = list(one)
    assert one.steps == n // B and len(keys1) == one.steps * B
    for world in (2, 4):
        b = B // world
        ranks = []
        for r in range(world):
            s = augment.EpochSampler(n, b, world, r, seed=5)
            s.set_epoch(2)
            ranks.append(list(s))
        for step in range(one.steps):
            union = sorted(k for r in range(world) for k in ranks[r][step * b:(step + 1) * b])
            assert union == sorted(keys1[step * B:(step + 1) * B])  # same images AND same augmentation seeds
    one.set_epoch(3)
    assert list(one) != keys1
    one.set_epoch(2, start_step=4)
    assert list(one) == keys1[4 * B:]


def test_eval_sharding_counts_each_sample_once():
    for n in (1, 7, 25, 50):
        for world in (1, 2, 3, 4, 8):
            shards = [augment.eval_indices(n, world, r) for r in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(n))


# ------------------------------------------------------------------------------------------------ runs

def test_resume_gives_the_same_weights_and_log(tmp_path, capsys):
    """3 epochs straight vs 2 epochs, stop, resume for the 3rd (augmentation, drop-path, dropout on). The first
    run stops after epoch 2 by leaving out the last (cool-down) epoch, which the resumed run adds back on purpose
    (--allow-change)."""
    common = SYN + ['--synthetic-size', '256', '--global-batch-size', '64', '--epochs', '2', '--seed', '3']
    a, b = tmp_path / 'straight', tmp_path / 'resumed'
    assert run_main(common + ['--cooldown-epochs', '1', '--output-dir', a]) == 0
    assert run_main(common + ['--cooldown-epochs', '0', '--output-dir', b]) == 0
    assert len(log_lines(b)) == 2
    assert run_main(common + ['--cooldown-epochs', '1', '--output-dir', b, '--resume', 'auto',
                              '--allow-change', 'cooldown-epochs']) == 0
    assert_same_weights(weights(a / 'last.pt'), weights(b / 'last.pt'))
    la, lb = log_lines(a), log_lines(b)
    assert la == lb and [x['epoch'] for x in la] == [0, 1, 2] and la[2]['lr'] == 1e-5
    oa = torch.load(a / 'last.pt', weights_only=True)['optimizer']['state']
    ob = torch.load(b / 'last.pt', weights_only=True)['optimizer']['state']
    assert all(torch.equal(oa[k]['exp_avg'], ob[k]['exp_avg']) for k in oa)
    ## a checkpoint rebuilds the model from its config alone (the README's recipe, under *Outputs and resuming*)
    ck = torch.load(a / 'best.pt', weights_only=True)
    m = mpvg.create_model(ck['config']['model'], pe=ck['config']['pe'], **ck['config']['model_kwargs'])
    m.load_state_dict(ck['model'])
    assert json.load(open(a / 'config.json'))['lr'] == 6e-4
    ## --eval-only evaluates a checkpoint with its own model and data settings: no other flag needed
    capsys.readouterr()
    assert run_main(['--resume', a / 'last.pt', '--eval-only', '--no-progress']) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res['val_top1'] == la[2]['val_top1'] and res['val_top5'] == la[2]['val_top5'] and res['val_n'] == 64
    ## provenance: the code, the command and the libraries that made the run
    prov = json.load(open(a / 'config.json'))['provenance']
    assert prov['command'].startswith('python train.py --data synthetic') and prov['world_size'] == 1
    assert prov['torch'] == str(torch.__version__) and prov['python'] == sys.version.split()[0]
    assert len(prov['source_sha256']['train.py']) == 16 and prov['hosts'] and prov['devices']
    if os.path.isdir(os.path.join(ROOT, '.git')):
        assert len(prov['git_commit']) == 40 and isinstance(prov['git_dirty'], bool)


def test_sigterm_writes_checkpoint_and_resume_finishes_exactly(tmp_path):
    args = SYN + ['--synthetic-size', '1024', '--global-batch-size', '16', '--epochs', '2', '--seed', '4']
    out = tmp_path / 'run'
    ## the interrupted run loads with 2 worker processes (which must not keep it from exiting), the others with none
    p = subprocess.Popen([sys.executable, TRAIN] + args + ['--output-dir', str(out), '--workers', '2'], cwd=tmp_path,
                         env=env1(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()  # the config line: training starts right after it
    assert first.startswith('{"config"'), first + p.stderr.read()
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert 'stopped by SIGTERM' in err and 'Traceback' not in err, err
    ck = torch.load(out / 'last.pt', weights_only=True)
    assert (ck['epoch'], ck['step']) != (2, 0), 'the run finished before the signal'
    ## resume finishes the run; it equals a run that was never interrupted
    assert run_main(args + ['--output-dir', out, '--resume', 'auto']) == 0
    ref = tmp_path / 'ref'
    assert run_main(args + ['--output-dir', ref]) == 0
    assert_same_weights(weights(out / 'last.pt'), weights(ref / 'last.pt'))
    assert log_lines(out) == log_lines(ref) and len(log_lines(ref)) == 2


def test_torchrun_two_processes_equal_one_process(tmp_path):
    """Same global batch (16) on 1 process and on 2 gloo processes (8 each), augmentation off: same weights.
    The validation set (25 images) is not divisible by 2: each image must be counted exactly once."""
    args = SYN + ['--synthetic-size', '100', '--global-batch-size', '16', '--epochs', '2', '--no-aug', '--lr', '1e-3',
                  '--drop-path', '0', '--attn-drop', '0', '--seed', '2', '--warmup-epochs', '0']
    one, two = tmp_path / 'one', tmp_path / 'two'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        TRAIN] + args + ['--output-dir', str(two)], cwd=tmp_path, env=env1(),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_main(args + ['--output-dir', one]) == 0
    cfg = json.load(open(two / 'config.json'))
    assert cfg['world_size'] == 2 and cfg['per_process_batch_size'] == 8 and cfg['steps_per_epoch'] == 6
    ## not bitwise: the mean over 16 vs the mean of two means over 8 round differently, and Adam's m / sqrt(v)
    ## magnifies that on near-zero gradients (seen: 1.3e-6); a wrong sharding moves weights by ~lr = 1e-3 per step
    assert_same_weights(weights(one / 'last.pt'), weights(two / 'last.pt'), atol=1e-5)
    l1, l2 = log_lines(one), log_lines(two)
    assert [x['val_n'] for x in l1] == [x['val_n'] for x in l2] == [25, 25]
    assert [x['val_top1'] for x in l1] == [x['val_top1'] for x in l2]
    for x, y in zip(l1, l2):
        assert x['train_loss'] == pytest.approx(y['train_loss'], abs=1e-5)


def _write_cifar(root, n_train=64, n_test=20):
    import numpy as np
    d = root / 'cifar-100-python'
    d.mkdir(parents=True)
    g = np.random.default_rng(0)
    for name, n in (('train', n_train), ('test', n_test)):
        fine = g.integers(0, 100, n).tolist()
        obj = {b'filenames': [f'img{i}.png'.encode() for i in range(n)], b'batch_label': name.encode(),
               b'fine_labels': fine, b'coarse_labels': [f // 5 for f in fine],
               b'data': g.integers(0, 256, (n, 3072), dtype=np.uint8)}
        with open(d / name, 'wb') as f:
            pickle.dump(obj, f)
    with open(d / 'meta', 'wb') as f:
        pickle.dump({b'fine_label_names': [f'c{i}'.encode() for i in range(100)],
                     b'coarse_label_names': [f'k{i}'.encode() for i in range(20)]}, f)


def test_one_epoch_on_tiny_official_cifar100_archive(tmp_path):
    _write_cifar(tmp_path / 'data')
    out = tmp_path / 'out'
    args = TINY[:] + ['--data', 'cifar100', '--data-path', tmp_path / 'data', '--no-download',
                      '--global-batch-size', '16', '--epochs', '1', '--output-dir', out]
    args[args.index('--workers') + 1] = '1'  # through a worker process, augmentation on
    assert run_main(args) == 0
    (line,) = log_lines(out)
    cfg = json.load(open(out / 'config.json'))
    assert line['val_n'] == 20 and math.isfinite(line['train_loss']) and cfg['steps_per_epoch'] == 4
    assert cfg['randaug'] == 'rand-m9-mstd0.5-inc1' and cfg['mixup'] == 0.8 and cfg['reprob'] == 0.25
    assert cfg['model_kwargs']['num_classes'] == 100


def test_one_epoch_on_tiny_imagefolder_deit_recipe(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', 258), ('val', 10)):
        for i in range(n):
            c = tmp_path / 'in' / split / f'n0{i % 3}'
            c.mkdir(parents=True, exist_ok=True)
            h, w = 20 + i % 7, 24 + i % 5
            arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(c / f'{i}.png')
    out = tmp_path / 'out'
    args = TINY + ['--model', 'deit_tiny', '--img-size', '32', '--data', 'imagenet', '--data-path', tmp_path / 'in',
                   '--global-batch-size', '64', '--epochs', '1', '--output-dir', out]
    assert run_main(args) == 0
    (line,) = log_lines(out)
    cfg = json.load(open(out / 'config.json'))
    assert line['val_n'] == 10 and math.isfinite(line['train_loss'])
    ## repeated augmentation keeps floor(258 // 256 * 256 / 1) = 256 samples -> 4 steps of 64
    assert cfg['repeated_aug'] and cfg['steps_per_epoch'] == 4 and cfg['lr'] == pytest.approx(5e-4 * 64 / 512)


@pytest.mark.parametrize('workers', [0, 2])
def test_corrupt_image_names_the_file(workers, tmp_path, capsys):
    """workers 0: in this process; workers 2: the real command line, where the error comes out of a worker process
    and the run must still exit (not wait forever on its workers)."""
    from PIL import Image
    for split, n in (('train', 8), ('val', 2)):
        for i in range(n):
            c = tmp_path / 'in' / split / f'n0{i % 2}'
            c.mkdir(parents=True, exist_ok=True)
            Image.new('RGB', (20, 20), (i * 20, 0, 0)).save(c / f'{i}.jpg')
    (tmp_path / 'in' / 'train' / 'n01' / '3.jpg').write_bytes(b'\xff\xd8\xff\xe0 a truncated download')
    argv = TINY + ['--model', 'deit_tiny', '--img-size', '16', '--data', 'imagenet', '--data-path', tmp_path / 'in',
                   '--global-batch-size', '4', '--min-lr', '1e-6', '--no-repeated-aug', '--epochs', '1',
                   '--output-dir', tmp_path / 'o']
    argv[argv.index('--workers') + 1] = str(workers)
    if workers:
        r = subprocess.run([sys.executable, TRAIN] + [str(a) for a in argv], cwd=tmp_path, env=env1(),
                           capture_output=True, text=True, timeout=120)
        code, err = r.returncode, r.stderr
    else:
        capsys.readouterr()
        code, err = run_main(argv), capsys.readouterr().err
    assert_one_paragraph_error(code, err, str(tmp_path / 'in' / 'train' / 'n01' / '3.jpg'), 'cannot decode',
                               '--resume auto')


# ------------------------------------------------------------------------------------------------ errors

def assert_one_paragraph_error(code, err, *words):
    assert code != 0
    assert 'Traceback' not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith('error:') or ln.startswith('[rank')]
    assert len(errors) == 1, err
    for w in words:
        assert w in errors[0], (w, err)


def test_bad_input_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, TRAIN, '--data', 'imagenet', '--data-path', str(tmp_path / 'nope'),
                        '--model', 'deit_tiny'], cwd=tmp_path, env=env1(), capture_output=True, text=True,
                       timeout=300)
    assert_one_paragraph_error(r.returncode, r.stderr, 'nope', 'train', 'image-net.org')


@pytest.mark.parametrize('case', ['pe', 'model', 'knob', 'data', 'cifar', 'world', 'ckpt', 'mismatch', 'eval'])
def test_bad_input_gives_one_paragraph(case, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    base = SYN + ['--synthetic-size', '64', '--global-batch-size', '32', '--epochs', '1', '--output-dir', out]
    if case == 'pe':
        argv, words = base + ['--pe', 'nope'], ['--pe', 'nope', 'mpvg']
    elif case == 'model':
        argv, words = base + ['--model', 'resnet50'], ['--model', 'resnet50', 'vit_lite_7_4']
    elif case == 'knob':  # mpvg.create_model's ValueError, surfaced
        argv, words = base + ['--layerwise-from', '5'], ['layerwise_from=5']
    elif case == 'data':
        argv, words = base + ['--data', 'imagenet', '--data-path', tmp_path / 'missing'], ['missing', 'val']
    elif case == 'cifar':
        (tmp_path / 'c' / 'cifar-100-python').mkdir(parents=True)
        for s in ('train', 'test'):
            (tmp_path / 'c' / 'cifar-100-python' / s).write_bytes(b'not a pickle')
        argv, words = base + ['--data', 'cifar100', '--data-path', tmp_path / 'c'], ['cifar-100-python', 'fine_labels']
    elif case == 'world':
        monkeypatch.setenv('WORLD_SIZE', '3')
        monkeypatch.setenv('RANK', '0')
        argv, words = base, ['--global-batch-size 32', 'cannot be split', '3 processes']
    elif case == 'ckpt':
        (tmp_path / 'bad.pt').write_bytes(b'\x00garbage' * 10)
        argv, words = base + ['--resume', tmp_path / 'bad.pt'], ['bad.pt', 'checkpoint']
    elif case == 'mismatch':
        assert run_main(base) == 0
        argv, words = base + ['--pe', 'pvg', '--resume', 'auto'], ['--pe: checkpoint mpvg, now pvg', 'different run']
    elif case == 'eval':
        argv, words = base + ['--eval-only'], ['--resume']
    capsys.readouterr()
    code = run_main(argv)
    assert_one_paragraph_error(code, capsys.readouterr().err, *words)


def test_non_finite_loss_names_step_and_checkpoint(tmp_path, capsys):
    out = tmp_path / 'out'
    base = SYN + ['--synthetic-size', '64', '--global-batch-size', '32', '--output-dir', out, '--no-aug',
                  '--warmup-epochs', '0', '--log-interval', '1']
    assert run_main(base + ['--epochs', '1']) == 0
    capsys.readouterr()
    code = run_main(base + ['--epochs', '3', '--resume', 'auto', '--lr', '1e30', '--allow-change', 'epochs', 'lr'])
    assert_one_paragraph_error(code, capsys.readouterr().err, 'non-finite', 'global step 3', str(out / 'last.pt'))
    assert torch.load(out / 'last.pt', weights_only=True)['epoch'] == 1  # the good checkpoint was not overwritten


def test_synthetic_images_hold_the_square_where_the_label_says():
    """--data synthetic: class = (row of 5, distance of the column from the centre, 2 mirror columns each)."""
    for size in (16, 32, 40):
        images, labels = train.load_data(dict(data='synthetic', synthetic_size=200, img_size_resolved=size))[0].tensors
        ch, cw = size // 5, size // 4
        for img, label in zip(images, labels.tolist()):
            bright = (img[0] == 230).nonzero()
            rows, cols = set((bright[:, 0] // ch).tolist()), set((bright[:, 1] // cw).tolist())
            assert len(bright) == ch * cw and rows == {label // 2} and cols in ({label % 2}, {3 - label % 2})
            assert (img[:, bright[:, 0], bright[:, 1]] == 230).all() and (img < 64).sum() == 3 * (size * size - ch * cw)

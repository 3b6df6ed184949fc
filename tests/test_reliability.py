"""No run is lost or silently wrong (issue 12), CPU only: every mistyped flag is refused before any work; a run killed
with SIGKILL anywhere, inside every checkpoint and log write included, resumes to the record of a run never
killed; a full disk ends in a message with the last checkpoint intact; a second run never clobbers the first."""
import json
import math
import os
import resource
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
import train  # noqa: E402
from test_train import SYN, TINY, TRAIN, assert_one_paragraph_error, env1, log_lines, run_main, weights  # noqa: E402

RUN = SYN + ['--synthetic-size', '64', '--global-batch-size', '32', '--epochs', '3', '--seed', '5',
             '--log-interval', '1']


# ------------------------------------------------------------------------------------------------ input checks

def bad_cases(tmp):
    """(extra flags, words the one-paragraph error must contain)."""
    (tmp / 'a_file').write_text('x')
    (tmp / 'empty.pt').write_bytes(b'')
    (tmp / 'garbage.pt').write_bytes(b'\x00garbage' * 10)
    torch.save({'model': {}}, tmp / 'other.pt')
    return [
        (['--embed-dim', '0'], ['embed_dim=0']), (['--num-heads', '0'], ['num_heads=0']),
        (['--patch-size', '0'], ['patch_size=0']), (['--depth', '0'], ['depth=0']),
        (['--img-size', '30'], ['img_size=30', 'patch_size=8']), (['--mlp-ratio', '0'], ['mlp_ratio=0']),
        (['--drop-path', '1.5'], ['drop_path_rate=1.5']), (['--attn-drop', '-0.1'], ['attn_drop_rate=-0.1']),
        (['--num-heads', '3'], ['embed_dim=32', 'num_heads=3']), (['--layerwise-from', '9'], ['layerwise_from=9']),
        (['--reprob', '1.5'], ['--reprob 1.5', '[0, 1]']), (['--hflip', '-0.1'], ['--hflip -0.1']),
        (['--smoothing', '1.5'], ['--smoothing 1.5', '[0, 1)']), (['--mixup', '-1'], ['--mixup -1.0', '>= 0']),
        (['--cutmix', 'nan'], ['--cutmix nan']), (['--rrc-scale', '1', '0.5'], ['--rrc-scale 1.0 0.5']),
        (['--rrc-scale', '0', '1'], ['--rrc-scale 0.0 1.0']), (['--lr', 'nan'], ['--lr nan', 'finite']),
        (['--lr', '0'], ['--lr 0.0', '> 0']), (['--lr', 'inf'], ['--lr inf']), (['--min-lr', '-1'], ['--min-lr -1.0']),
        (['--warmup-lr', '-1'], ['--warmup-lr -1.0']), (['--min-lr', 'inf'], ['--min-lr inf', 'finite']),
        (['--epochs', '0'], ['--epochs 0', '>= 1']), (['--epochs', '-1'], ['--epochs -1']),
        (['--cooldown-epochs', '-1'], ['--cooldown-epochs -1']), (['--warmup-epochs', '-1'], ['--warmup-epochs -1']),
        (['--global-batch-size', '0'], ['--global-batch-size 0', '>= 1']), (['--log-interval', '0'], ['--log-interval 0']),
        (['--workers', '-1'], ['--workers -1']), (['--workers', '100000'], ['--workers 100000', 'CPUs']),
        (['--eval-crop-pct', '0'], ['--eval-crop-pct 0.0', '(0, 1]']), (['--eval-crop-pct', '1.5'], ['--eval-crop-pct 1.5']),
        (['--weight-decay', '-1'], ['--weight-decay -1.0']), (['--seed', '-1'], ['--seed -1']),
        (['--synthetic-size', '0'], ['--synthetic-size 0']), (['--randaug', 'rand-m11-inc1'], ['--randaug', 'magnitude 0..10']),
        (['--randaug', 'color-jitter'], ['--randaug', "'rand-m9-mstd0.5-inc1'"]),
        (['--output-dir', tmp / 'a_file'], ['a_file', 'is a file']),
        (['--output-dir', tmp / 'a_file' / 'sub'], ['a_file', 'is a file']),
        (['--resume', tmp / 'nope.pt'], ['nope.pt', 'No such file']),
        (['--resume', tmp / 'empty.pt'], ['empty.pt', 'cannot read checkpoint']),
        (['--resume', tmp / 'garbage.pt'], ['garbage.pt', 'cannot read checkpoint']),
        (['--resume', tmp / 'other.pt'], ['other.pt', 'missing']),
        (['--data', 'imagenet', '--data-path', tmp / 'nowhere'], ['nowhere', 'train or val', 'image-net.org']),
        (['--data', 'cifar100', '--data-path', tmp / 'nowhere', '--no-download'], ['nowhere', '--no-download']),
        (['--epoch', '2'], ['unrecognized arguments: --epoch 2']), (['--eval-only'], ['--eval-only needs --resume']),
        (['--pe', 'nope'], ['--pe', 'nope', 'mpvg']), (['--lr', 'fast'], ['--lr', "'fast'"]),
    ]


def test_every_mistyped_flag_is_refused_before_any_work(tmp_path, capsys):
    """Each case exits 2 with one paragraph naming the flag and what is valid, no traceback, and before any work:
    no output folder is created (the run folder is locked before data is loaded or a model is built)."""
    out = tmp_path / 'out'
    for extra, words in bad_cases(tmp_path):
        capsys.readouterr()
        code = run_main(RUN + ['--output-dir', out] + extra)
        assert_one_paragraph_error(code, capsys.readouterr().err, *words)
        assert not out.exists(), extra


def test_the_first_hour(tmp_path, capsys):
    """Piped output (stderr is no terminal here) shows a progress line every --log-interval steps."""
    capsys.readouterr()
    assert run_main([a for a in RUN if a != '--no-progress'] + ['--epochs', '1', '--output-dir', tmp_path / 'a']) == 0
    err = capsys.readouterr().err
    assert 'epoch 0 step 1/2 loss' in err and 'epoch 0 step 2/2 loss' in err and 'img/s' in err


# ------------------------------------------------------------------------------------------------ no clobbering

def test_the_same_command_twice_refuses_and_keeps_the_first_run(tmp_path, capsys):
    out = tmp_path / 'run'
    argv = RUN + ['--epochs', '1', '--output-dir', out]
    assert run_main(argv) == 0
    before = {f: (out / f).read_bytes() for f in train.RUN_FILES}
    capsys.readouterr()
    assert_one_paragraph_error(run_main(argv), capsys.readouterr().err, str(out), 'already holds a run',
                               '--resume auto', '--overwrite')
    assert before == {f: (out / f).read_bytes() for f in train.RUN_FILES}
    assert run_main(argv + ['--overwrite', '--seed', '6']) == 0  # on purpose: replaced
    assert json.load(open(out / 'config.json'))['seed'] == 6 and len(log_lines(out)) == 1


def test_a_second_live_run_into_the_folder_refuses(tmp_path, capsys):
    """A run is live in the folder: a second one refuses, naming it. Once the first is killed (SIGKILL: its lock
    file stays behind), --resume auto works: there is no checkpoint yet, so it starts afresh and trains."""
    out = tmp_path / 'run'
    argv = SYN + ['--synthetic-size', '4096', '--global-batch-size', '32', '--epochs', '2', '--output-dir', str(out)]
    p = subprocess.Popen([sys.executable, TRAIN] + argv, cwd=tmp_path, env=env1(), stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    try:
        assert p.stdout.readline().startswith('{"config"')
        capsys.readouterr()
        code = run_main(argv + ['--resume', 'auto'])
        assert_one_paragraph_error(code, capsys.readouterr().err, 'in use by another train.py run', f'pid {p.pid}')
    finally:
        p.kill()
        p.wait()
    assert (out / 'train.lock').exists() and not (out / 'last.pt').exists()
    assert run_main(argv + ['--resume', 'auto']) == 0 and len(log_lines(out)) == 2


# ------------------------------------------------------------------------------------------------ resume refusals

def test_resume_refuses_what_would_silently_change_the_run(tmp_path, capsys):
    out = tmp_path / 'run'
    argv = RUN + ['--output-dir', out]
    assert run_main(argv + ['--epochs', '1']) == 0
    for extra, words in [(['--lr', '1e-3'], ['--lr: checkpoint 0.0006, now 0.001', '--allow-change lr']),
                         (['--seed', '6'], ['--seed: checkpoint 5, now 6']),
                         (['--global-batch-size', '16'], ['--global-batch-size: checkpoint 32, now 16']),
                         (['--allow-change', 'depth'], ['--allow-change depth', 'never change'])]:
        capsys.readouterr()
        code = run_main(argv + ['--resume', 'auto', '--epochs', '1'] + extra)
        assert_one_paragraph_error(code, capsys.readouterr().err, *words)
    capsys.readouterr()
    assert_one_paragraph_error(run_main(argv + ['--resume', 'auto']), capsys.readouterr().err,
                               '--epochs: checkpoint 1, now 3', '--allow-change epochs')
    ## a SIGTERM-style checkpoint in the middle of an epoch: the batch size cannot change there, even on purpose
    ck = torch.load(out / 'last.pt', weights_only=True)
    ck.update(step=1, loss_sum=torch.tensor(2.0))
    torch.save(ck, out / 'mid.pt')
    capsys.readouterr()
    code = run_main(argv + ['--resume', out / 'mid.pt', '--epochs', '1', '--global-batch-size', '16',
                            '--allow-change', 'global-batch-size'])
    assert_one_paragraph_error(code, capsys.readouterr().err, 'middle of epoch 1', 'global_batch_size')
    os.remove(out / 'mid.pt')
    assert run_main(argv + ['--resume', 'auto', '--allow-change', 'epochs']) == 0  # more epochs, on purpose
    assert [ln['epoch'] for ln in log_lines(out)] == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ kill -9

def traced_main(argv, kill_at=None, events=None):
    """train.main with a tracer on the functions that write the run's record: every line they execute is an
    event (function, line, file being written); at event number kill_at the process SIGKILLs itself."""
    codes = {train.atomic_write.__code__: 'atomic_write', train.write_record.__code__: 'write_record'}
    n = [0]

    def local(frame, event, _):
        if event == 'line':
            n[0] += 1
            if events is not None:
                events.append((codes[frame.f_code], frame.f_lineno, os.path.basename(frame.f_locals.get('path', ''))))
            if n[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return local
    sys.settrace(lambda frame, event, _: local if frame.f_code in codes else None)
    try:
        return run_main(argv)
    finally:
        sys.settrace(None)


def killed_at(argv, k):
    """Run in a forked child (torch already imported) that SIGKILLs itself at event k."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            with open(os.devnull, 'w') as null:
                os.dup2(null.fileno(), 1)
                os.dup2(null.fileno(), 2)
            traced_main(argv, kill_at=k)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f'event {k}: the run was not killed'


def record(out, summary):
    """What the run's record says: weights, log lines (timings left out), best.pt's epoch and weights, summary
    (the printed line, if any) and summary.json (timings left out)."""
    best = torch.load(out / 'best.pt', weights_only=True)
    summary_file = {k: v for k, v in json.load(open(out / 'summary.json')).items()
                    if k not in ('time_s', 'device_hours', 'img_per_s')}
    return dict(weights=weights(out / 'last.pt'), log=log_lines(out), best_epoch=best['best_epoch'],
                best_weights=best['model'], summary=summary, summary_file=summary_file)


def same_record(a, b):
    assert a['log'] == b['log'] and a['best_epoch'] == b['best_epoch'] and a['summary_file'] == b['summary_file']
    assert a['summary'] in ([], b['summary'])  # a run killed after its last checkpoint resumes to "finished"
    for k in ('weights', 'best_weights'):
        assert a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k


def summary_line(out_text):
    return [{k: v for k, v in json.loads(ln).items() if k != 'output_dir'} for ln in out_text.splitlines()
            if ln.startswith('{"summary"')]


def test_kill_9_anywhere_then_resume_gives_the_record_of_a_run_never_killed(tmp_path, capsys):
    """The reference run records every line its record-writing code executes. Then, for every distinct (line,
    file) of those writes - in config.json, last.pt, best.pt, log.jsonl and summary.json, first and last time each
    runs - a run is SIGKILLed right there and resumed with --resume auto (after the last checkpoint too: a run
    without its summary.json, or with a torn log.jsonl, is resumed, which completes its record); a torn last log line
    is simulated too. Each resumed record equals the reference: weights, log.jsonl, best.pt (epoch and weights),
    summary.json; no temporary file left."""
    ref = tmp_path / 'ref'
    events = []
    capsys.readouterr()
    assert traced_main(RUN + ['--output-dir', ref], events=events) == 0
    want = record(ref, summary_line(capsys.readouterr().out))
    assert want['best_epoch'] >= 0 and len(want['log']) == 3
    points = {}
    for k, key in enumerate(events, start=1):
        points.setdefault(key, []).append(k)
    kills = sorted({ks[0] for ks in points.values()} | {ks[-1] for ks in points.values()})
    assert {f for _, _, f in events} >= {'config.json', 'last.pt', 'best.pt', 'summary.json'} and len(kills) >= 25
    for k in kills:
        out = tmp_path / f'kill{k}'
        argv = RUN + ['--output-dir', out]
        killed_at(argv, k)
        if k == kills[-1] and (out / 'log.jsonl').exists():  # a torn line, as a kill inside the write leaves it
            data = (out / 'log.jsonl').read_bytes()
            (out / 'log.jsonl').write_bytes(data[:-7])
        capsys.readouterr()
        assert run_main(argv + ['--resume', 'auto']) == 0, k
        same_record(record(out, summary_line(capsys.readouterr().out)), want)
        assert not [f for f in os.listdir(out) if '.tmp' in f], (k, os.listdir(out))


def test_a_full_disk_ends_with_a_message_and_the_last_checkpoint_intact(tmp_path, capsys):
    """The file-size limit (ulimit -f) stands in for a full disk: the next checkpoint cannot be written."""
    out = tmp_path / 'run'
    assert run_main(RUN + ['--epochs', '1', '--output-dir', out]) == 0
    before = (out / 'last.pt').read_bytes()
    limit = len(before) - 1000

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    r = subprocess.run([sys.executable, TRAIN] + [str(a) for a in RUN] + ['--output-dir', str(out), '--resume', 'auto',
                       '--allow-change', 'epochs'], cwd=tmp_path, env=env1(), capture_output=True, text=True,
                       timeout=300, preexec_fn=small_files)
    assert_one_paragraph_error(r.returncode, r.stderr, 'could not write', 'last.pt', 'File too large', 'intact',
                               '--resume auto')
    assert (out / 'last.pt').read_bytes() == before and not [f for f in os.listdir(out) if '.tmp' in f]


# ------------------------------------------------------------------------------------------------ issue 17: the edges

def test_a_warmup_longer_than_the_run_and_a_small_deit_lr_run(tmp_path):
    """Only what cannot run is refused: the recipe's 10 warm-up epochs in a 1-epoch run, and DeiT's rule scaling a
    batch of 8's lr (7.8e-6) below --min-lr 1e-5, run as timm's scheduler runs them."""
    assert run_main(SYN + ['--synthetic-size', '64', '--global-batch-size', '32', '--epochs', '1', '--cooldown-epochs',
                           '0', '--warmup-epochs', '10', '--output-dir', tmp_path / 'a']) == 0
    cfg = train.resolve_config(train.build_parser().parse_args(['--model', 'deit_tiny', '--global-batch-size', '8']), 1)
    lrs = [train.lr_at(e, cfg) for e in range(cfg['total_epochs'])]
    assert cfg['lr'] < cfg['min_lr'] and all(map(math.isfinite, lrs)) and lrs[6] == pytest.approx(cfg['lr'], rel=1e-3)


def image_folder(root, per_class, classes=('a', 'b')):
    from PIL import Image
    for split, n in (('train', per_class), ('val', 1)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new('RGB', (24, 20), (40 * i % 255, 90, 30)).save(root / split / c / f'{i}.png')


DEIT_TINY = TINY + ['--model', 'deit_tiny', '--img-size', '16', '--data', 'imagenet', '--min-lr', '1e-6']


def test_a_small_folder_with_repeated_augmentation_says_what_helps(tmp_path, capsys):
    """10 images and repeated augmentation (which keeps n // 256 * 256 an epoch): the message names
    --no-repeated-aug, not a smaller batch (which cannot help); nothing is left behind, so the corrected command
    runs in the same folder."""
    image_folder(tmp_path / 'in', 5)
    argv = DEIT_TINY + ['--data-path', tmp_path / 'in', '--global-batch-size', '2', '--epochs', '1',
                        '--output-dir', tmp_path / 'out']
    capsys.readouterr()
    assert_one_paragraph_error(run_main(argv), capsys.readouterr().err, '--no-repeated-aug', '10 images')
    assert not (tmp_path / 'out').exists()                                       # no lone train.lock
    assert run_main(argv + ['--no-repeated-aug']) == 0


def test_an_image_folders_classes_set_the_head_and_are_checked(tmp_path, capsys):
    """3 class folders: a 3-way head (--num-classes only to override, never below 3), the class list in config.json;
    resuming or evaluating on a folder with other classes is refused instead of shifting labels."""
    image_folder(tmp_path / 'in', 4, classes=('cat', 'dog', 'owl'))
    argv = DEIT_TINY + ['--no-repeated-aug', '--global-batch-size', '4', '--epochs', '1']
    out = tmp_path / 'out'
    assert run_main(argv + ['--data-path', tmp_path / 'in', '--output-dir', out]) == 0
    cfg = json.load(open(out / 'config.json'))
    assert cfg['classes'] == ['cat', 'dog', 'owl'] and cfg['model_kwargs']['num_classes'] == 3
    image_folder(tmp_path / 'other', 4, classes=('cat', 'dog', 'yak'))
    for extra, words in [(['--resume', 'auto', '--epochs', '2', '--allow-change', 'epochs', '--output-dir', out],
                          ["the image folder's classes", '3 folders']),
                         (['--eval-only', '--resume', out / 'best.pt'], ['other classes', str(tmp_path / 'other')])]:
        capsys.readouterr()
        code = run_main((argv if '--eval-only' not in extra else []) + extra + ['--data-path', tmp_path / 'other'])
        assert_one_paragraph_error(code, capsys.readouterr().err, *words)
    capsys.readouterr()
    code = run_main(argv + ['--data-path', tmp_path / 'in', '--num-classes', '2', '--output-dir', tmp_path / 'o2'])
    assert_one_paragraph_error(code, capsys.readouterr().err, '--num-classes 2', '3 classes')
    assert run_main(argv + ['--data-path', tmp_path / 'in', '--num-classes', '5', '--output-dir', tmp_path / 'o3']) == 0
    assert json.load(open(tmp_path / 'o3' / 'config.json'))['model_kwargs']['num_classes'] == 5


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, capsys):
    """--overwrite whose run fails before its first checkpoint (its batch is larger than its data: no step) leaves the
    old run exactly as it was; one that trains replaces it: its own config, log and best.pt, none of the old run's."""
    out = tmp_path / 'run'
    argv = RUN + ['--epochs', '1', '--output-dir', out]
    assert run_main(argv) == 0
    before = {f: (out / f).read_bytes() for f in train.RUN_FILES}
    capsys.readouterr()
    code = run_main(argv + ['--overwrite', '--global-batch-size', '128'])
    assert_one_paragraph_error(code, capsys.readouterr().err, 'gives no step')
    assert before == {f: (out / f).read_bytes() for f in train.RUN_FILES}
    assert run_main(argv + ['--overwrite', '--seed', '7', '--epochs', '2']) == 0
    assert json.load(open(out / 'config.json'))['seed'] == 7 and [ln['epoch'] for ln in log_lines(out)] == [0, 1]
    best = torch.load(out / 'best.pt', weights_only=True)
    assert best['config']['seed'] == 7 and json.load(open(out / 'summary.json'))['seed'] == 7


def test_resume_auto_refuses_a_run_whose_checkpoints_are_gone(tmp_path, capsys):
    out = tmp_path / 'run'
    argv = RUN + ['--epochs', '1', '--output-dir', out]
    assert run_main(argv) == 0
    (out / 'last.pt').unlink()
    (out / 'best.pt').unlink()
    left = {f: (out / f).read_bytes() for f in ('config.json', 'log.jsonl')}
    capsys.readouterr()
    assert_one_paragraph_error(run_main(argv + ['--resume', 'auto']), capsys.readouterr().err, 'no last.pt',
                               'log.jsonl', 'checkpoints are gone')
    assert left == {f: (out / f).read_bytes() for f in left}


def test_a_run_that_trained_nothing_lets_the_retry_in(tmp_path, capsys):
    """A run killed before its first checkpoint left config.json and train.lock: the same command again (without
    --resume or --overwrite) is not refused, nothing was trained."""
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'config.json').write_text('{}')
    (out / 'train.lock').write_text('pid 1')
    assert run_main(RUN + ['--epochs', '1', '--output-dir', out]) == 0 and len(log_lines(out)) == 1


def test_a_failed_log_write_is_one_paragraph(tmp_path):
    (tmp_path / 'log.jsonl').mkdir()                                              # the log replaced by a folder
    ckpt = dict(epoch=1, log=[{'epoch': 0}])
    with pytest.raises(train.UserError, match=r'could not write .*log.jsonl: Is a directory .* --resume auto'):
        train.write_record(str(tmp_path), ckpt, False, False)
    assert (tmp_path / 'last.pt').exists() and not [f for f in os.listdir(tmp_path) if '.tmp' in f]


def test_the_commands_that_made_a_run_are_kept(tmp_path):
    out = tmp_path / 'run'
    argv = RUN + ['--output-dir', out]
    assert run_main(argv + ['--epochs', '1']) == 0
    assert run_main(argv + ['--epochs', '2', '--allow-change', 'epochs', '--resume', 'auto']) == 0
    history = json.load(open(out / 'config.json'))['provenance_history']
    assert len(history) == 2 and '--epochs 1' in history[0]['command'] and '--resume auto' in history[1]['command']
    assert torch.load(out / 'last.pt', weights_only=True)['config']['provenance_history'] == history


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.path.join(os.environ['PAYLOAD_DIR'], 'ran'),))


def test_a_crafted_cifar_file_runs_no_code(tmp_path, capsys, monkeypatch):
    """A pickle that calls os.mkdir when loaded, in place of CIFAR-100's train file: refused, naming the call, and
    the call never runs. The official files' contents (numpy arrays, any pickle protocol) still load."""
    import pickle
    from test_train import _write_cifar
    _write_cifar(tmp_path / 'data')
    monkeypatch.setenv('PAYLOAD_DIR', str(tmp_path))
    with open(tmp_path / 'data' / 'cifar-100-python' / 'train', 'wb') as f:
        pickle.dump({b'data': _Payload()}, f)
    capsys.readouterr()
    code = run_main(TINY + ['--data', 'cifar100', '--data-path', tmp_path / 'data', '--no-download',
                            '--output-dir', tmp_path / 'o'])
    assert_one_paragraph_error(code, capsys.readouterr().err, 'posix.mkdir', 'not a valid CIFAR-100')
    assert not (tmp_path / 'ran').exists()
    import io
    import numpy as np
    for protocol in (2, 4, 5):
        data = pickle.dumps({b'data': np.zeros((2, 3072), np.uint8), b'fine_labels': [1, 2]}, protocol=protocol)
        assert augment.CifarUnpickler(io.BytesIO(data), encoding='bytes').load()[b'data'].shape == (2, 3072)


def test_eval_only_goes_through_the_same_checks(tmp_path, capsys):
    out = tmp_path / 'run'
    assert run_main(RUN + ['--epochs', '1', '--output-dir', out]) == 0
    for extra, words in [(['--workers', '100000'], ['--workers 100000', 'CPUs']), (['--workers', '-1'], ['--workers -1']),
                         (['--global-batch-size', '0'], ['--global-batch-size 0', '>= 1'])]:
        capsys.readouterr()
        code = run_main(['--eval-only', '--resume', out / 'best.pt'] + extra)
        assert_one_paragraph_error(code, capsys.readouterr().err, *words)


def test_hostile_images_become_images_or_one_paragraph(tmp_path, monkeypatch):
    """A 16-bit grayscale PNG is read scaled to 8 bits (not all white); a decompression bomb and a symlink loop in a
    class folder end in one paragraph naming the file or folder."""
    import numpy as np
    from PIL import Image
    image_folder(tmp_path / 'in', 2)
    ramp = (np.arange(20 * 24).reshape(20, 24) * 137).astype(np.uint16)              # 0..65,623, as 16 bits
    Image.fromarray(ramp).save(tmp_path / 'in' / 'train' / 'a' / '16bit.png')
    cfg = train.resolve_config(train.build_parser().parse_args(DEIT_TINY + ['--data-path', str(tmp_path / 'in'),
                                                                            '--no-random-crop']), 1)
    train_set, _ = train.load_imagenet(dict(cfg, eval_crop_pct=1.0))
    k = [p for p, _ in train_set.samples].index(str(tmp_path / 'in' / 'train' / 'a' / '16bit.png'))
    x, _ = train_set[(k, 0)]
    assert x.float().std() > 20 and (x == 255).float().mean() < 0.1, x
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)                            # 24 x 20 = 480 > 2 x 100
    with pytest.raises(augment.ImageError, match=r'16bit.png .*DecompressionBombError'):
        train_set[(k, 0)]
    monkeypatch.undo()
    (tmp_path / 'in' / 'train' / 'b' / 'loop').symlink_to(tmp_path / 'in' / 'train' / 'b')
    with pytest.raises(train.UserError, match=r'train/b/loop leads back to a folder above it'):
        train.load_imagenet(cfg)


@pytest.mark.parametrize('change', ['epoch', 'step', 'log'])
def test_a_hand_edited_checkpoint_is_refused_by_name(tmp_path, capsys, change):
    out = tmp_path / 'run'
    assert run_main(RUN + ['--epochs', '1', '--output-dir', out]) == 0
    ckpt = torch.load(out / 'last.pt', weights_only=True)
    ckpt.update({'epoch': dict(epoch=-1), 'step': dict(step=10 ** 9), 'log': dict(log={'not': 'a list'})}[change])
    torch.save(ckpt, out / 'edited.pt')
    capsys.readouterr()
    code = run_main(RUN + ['--epochs', '1', '--output-dir', tmp_path / 'new', '--resume', out / 'edited.pt'])
    assert_one_paragraph_error(code, capsys.readouterr().err, 'edited.pt is inconsistent', change)


def test_a_dangling_symlink_as_output_dir_is_one_paragraph(tmp_path, capsys):
    (tmp_path / 'link').symlink_to(tmp_path / 'gone')
    capsys.readouterr()
    assert_one_paragraph_error(run_main(RUN + ['--output-dir', tmp_path / 'link']), capsys.readouterr().err,
                               'is a symlink to', 'does not exist')


def test_each_process_gets_a_gpu_it_can_see(monkeypatch):
    """Local rank r on GPU r; one visible GPU per process (CUDA_VISIBLE_DEVICES set per process, as SLURM does) is
    GPU 0; more processes than visible GPUs is one paragraph. (torch.cuda's answers are given, as a machine with
    these GPUs would give them: the choice is what is tested.)"""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert train.pick_device(1, 2) == torch.device('cuda', 1)
    with pytest.raises(train.UserError, match=r'runs 4 processes .* sees 2 GPUs'):
        train.pick_device(3, 4)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert train.pick_device(3, 4) == torch.device('cuda', 0)


def test_other_local_ranks_wait_for_the_cifar_download(tmp_path):
    """Local rank 1 waits (without a collective) until rank 0's download has moved the whole folder in."""
    import threading
    threading.Timer(1.0, lambda: (tmp_path / 'cifar-100-python').mkdir()).start()
    t0 = time.time()
    augment.fetch_cifar100(str(tmp_path), local_rank=1)
    assert 0.9 < time.time() - t0 < 30


def test_image_folder_workers_start_with_forkserver(tmp_path):
    """Python 3.14 starts DataLoader workers with forkserver, which pickles the dataset: it must pickle."""
    image_folder(tmp_path / 'in', 2)
    cfg = train.resolve_config(train.build_parser().parse_args(DEIT_TINY + ['--data-path', str(tmp_path / 'in')]), 1)
    data, _ = train.load_imagenet(cfg)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=[(0, 1), (1, 2)], num_workers=1,
                                         multiprocessing_context='forkserver', collate_fn=augment._whole_batch)
    (x, y), = list(loader)
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 0]

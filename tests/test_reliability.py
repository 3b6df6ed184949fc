"""No run is lost or silently wrong (issue 12), CPU only: every mistyped flag is refused before any work; a run killed
with SIGKILL anywhere, inside every checkpoint and log write included, resumes to the record of a run never
killed; a full disk ends in a message with the last checkpoint intact; a second run never clobbers the first."""
import json
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
import train  # noqa: E402
from test_train import SYN, TRAIN, assert_one_paragraph_error, env1, log_lines, run_main, weights  # noqa: E402

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
        (['--warmup-lr', '-1'], ['--warmup-lr -1.0']), (['--min-lr', '1'], ['--min-lr 1.0', '--lr = 0.0006']),
        (['--epochs', '0'], ['--epochs 0', '>= 1']), (['--epochs', '-1'], ['--epochs -1']),
        (['--cooldown-epochs', '-1'], ['--cooldown-epochs -1']), (['--warmup-epochs', '9'], ['--warmup-epochs 9']),
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
    runs - a run is SIGKILLed right there and resumed with --resume auto (after the last checkpoint: the finished
    path, which repairs what the kill left); a torn last log line is simulated too. Each resumed record equals the
    reference: weights, log.jsonl, best.pt (epoch and weights), summary.json; no temporary file left."""
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

"""Tests of benchmark.py's bookkeeping (what its table claims), not of any speed: speed is measured by running it.
One smoke run of the real command line checks that the table has the rows and columns the README shows; the flag
tests check that every bad value is refused by parse_args, before anything is built or timed."""
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import benchmark  # noqa: E402


def test_ratio_is_throughput_of_the_row_over_the_baseline_paired_by_round():
    # seconds per round: the row takes half the baseline's time in rounds 1 and 2 (ratio 2), double in round 3
    row, base = [1.0, 1.0, 4.0], [2.0, 2.0, 2.0]
    assert benchmark.median_ratio(row, base) == 2.0                 # > 1: the row is faster
    # pairing by round: a machine that slows down for everyone (round 2) changes no ratio
    assert benchmark.median_ratio([1.0, 10.0, 1.0], [1.1, 11.0, 1.1]) == 1.1


def test_ratio_interval_brackets_the_median_and_narrows_with_rounds():
    row = [1.0 + 0.1 * ((7 * k) % 11) / 10 for k in range(40)]       # spread out, deterministic
    base = [1.0] * 40
    lo, hi = benchmark.ratio_interval(row, base)
    med = benchmark.median_ratio(row, base)
    assert lo <= med <= hi and lo < hi
    lo10, hi10 = benchmark.ratio_interval(row[:10], base[:10])
    assert hi10 - lo10 > hi - lo                                     # fewer rounds, a wider interval
    assert benchmark.ratio_interval(row[:4], base[:4]) is None       # too few rounds to say anything
    same = benchmark.ratio_interval([2.0] * 8, [2.0] * 8)
    assert same == (1.0, 1.0)


def test_quick_run_prints_the_table():
    env = dict(os.environ, OMP_NUM_THREADS='1')
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmark.py'), '--quick', '--device', 'cpu',
                          '--models', 'vit_lite_7_4', '--pe', 'vit', 'mpvg', '--mem', 'off', '--no-timm'],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [line.split('|')[1:-1] for line in out.stdout.splitlines() if line.startswith('| vit_lite_7_4')]
    assert [r[1].strip() for r in rows] == ['vit', 'mpvg']
    assert rows[0][3].strip() == '3.740M' and rows[1][3].strip() == '3.743M'   # 3,740,004 and 3,743,076 (README), rounded
    assert rows[0][7].strip() == '1.00'                                          # vit against itself
    assert float(rows[1][4].replace(',', '')) > 0                                # a throughput was measured
    assert '**Command:** `python benchmark.py --quick' in out.stdout


# ------------------------------------------------------------------------------------------------ flags

def reject(capsys, argv):
    """parse_args(argv) must exit with argparse's code 2 and a one-line error, without a traceback; the message."""
    with pytest.raises(SystemExit) as exit_:
        benchmark.parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    return err.strip().splitlines()[-1]


BAD_FLAGS = {
    # argv (after --device cpu): what the message must name
    'repeats 0 (was 30 rounds)': (['--repeats', '0'], ['--repeats 0', '>= 1']),
    'steps 0 (was 1 step)':      (['--steps', '0'], ['--steps 0', '>= 1']),
    'steps negative':            (['--steps', '-3'], ['--steps -3', '>= 1']),
    'warmup negative':           (['--warmup', '-1'], ['--warmup -1', '>= 0']),
    'threads 0':                 (['--threads', '0'], ['--threads 0', '>= 1']),
    'threads beyond the CPUs':   (['--threads', '100000'], ['--threads 100000', 'CPUs']),
    'batch size absurd':         (['--batch-size', '1000000000'], ['--batch-size 1000000000', '65536']),
    'workers negative':          (['--workers', '-1'], ['--workers -1', '>= 0']),
    'steps not a number':        (['--steps', 'abc'], ['--steps', 'abc']),
    'batch size not a number':   (['--batch-size', 'deit_tiny=abc'], ['--batch-size deit_tiny=abc', "'abc'", '>= 1']),
    'batch size 0':              (['--batch-size', '0'], ['--batch-size 0', '>= 1']),
    'model batch size 0':        (['--batch-size', 'deit_tiny=0'], ['--batch-size deit_tiny=0', '>= 1']),
    'batch size, no model':      (['--batch-size', '=0'], ['--batch-size =0', 'deit_tiny']),
    'batch size, unknown model': (['--batch-size', 'resnet=8'], ['--batch-size resnet=8', "'resnet'", 'deit_tiny']),
    'abbreviated flag':          (['--rep', '3'], ['--rep']),
}


@pytest.mark.parametrize('what', list(BAD_FLAGS))
def test_bad_flag_exits_2_naming_it(what, capsys):
    argv, must_appear = BAD_FLAGS[what]
    msg = reject(capsys, ['--device', 'cpu'] + argv)
    for s in must_appear:
        assert s in msg, f'{s!r} missing from: {msg}'


def test_several_bad_flags_are_reported_together(capsys):
    msg = reject(capsys, ['--device', 'cpu', '--repeats', '0', '--threads', '0', '--batch-size', 'deit_tiny=x'])
    for s in ['--repeats 0', '--threads 0', 'deit_tiny=x']:
        assert s in msg, f'{s!r} missing from: {msg}'


def test_explicit_values_are_kept_and_defaults_fill_only_left_out_flags():
    a = benchmark.parse_args(['--device', 'cpu', '--warmup', '0', '--steps', '3', '--repeats', '7', '--quick',
                              '--batch-size', '5', 'vit_lite_7_4=9', '--models', 'vit_lite_7_4', 'deit_tiny'])
    assert (a.warmup, a.steps, a.repeats) == (0, 3, 7)            # --quick does not override explicit flags
    assert a.batch_sizes == {'vit_lite_7_4': 9, 'deit_tiny': 5}   # later entries win
    d = benchmark.parse_args(['--device', 'cpu'])                 # the CPU defaults the help text gives
    assert (d.warmup, d.steps, d.repeats, d.threads, d.json) == (2, 1, 30, None, None)
    assert d.batch_sizes == {'vit_lite_7_4': 64, 'deit_tiny': 16}


@pytest.mark.parametrize('where', ['missing folder', 'folder', 'under a file', 'empty'])
def test_unwritable_json_path_is_refused_at_start(where, tmp_path, capsys):
    (tmp_path / 'a_file').write_text('x')
    path = {'missing folder': tmp_path / 'nope' / 'out.json', 'folder': tmp_path,
            'under a file': tmp_path / 'a_file' / 'out.json', 'empty': ''}[where]
    msg = reject(capsys, ['--device', 'cpu', '--json', str(path)])
    assert '--json' in msg and repr(str(path)) in msg and 'writable folder' in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file']   # nothing created


def test_json_path_the_system_refuses_is_refused_with_its_reason(tmp_path, capsys, monkeypatch):
    # what a read-only folder gives a non-root user (CI runs as root, where chmod cannot make one)
    def refuse(path, mode='r', *args, **kwargs):
        raise PermissionError(13, 'Permission denied', path)
    monkeypatch.setattr(benchmark, 'open', refuse, raising=False)
    msg = reject(capsys, ['--device', 'cpu', '--json', str(tmp_path / 'out.json')])
    assert '--json' in msg and 'out.json' in msg and 'Permission denied' in msg, msg


def test_writable_json_path_is_accepted_and_left_as_it_was(tmp_path):
    new, old = tmp_path / 'new.json', tmp_path / 'old.json'
    old.write_text('{"kept": 1}')
    assert benchmark.parse_args(['--device', 'cpu', '--json', str(new)]).json == str(new)
    assert not new.exists(), 'the check must not leave an empty file behind'
    benchmark.parse_args(['--device', 'cpu', '--json', str(old)])
    assert old.read_text() == '{"kept": 1}', 'the check must not truncate an existing file'


def test_bad_flag_from_the_command_line_exits_fast_without_traceback(tmp_path):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmark.py'), '--device', 'cpu', '--repeats', '0',
                          '--json', str(tmp_path / 'nope' / 'b.json')], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr
    assert '--repeats 0' in out.stderr and '--json' in out.stderr and out.stdout == ''
    assert time.perf_counter() - t0 < 60                          # the import of torch, and nothing built or run


def test_data_pipeline_quick_run_measures_both_dataset_shapes():
    """--data-pipeline runs train.py's own data path for the in-memory (CIFAR) and image-folder (ImageNet) shapes."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmark.py'), '--data-pipeline', '--quick', '--device',
                          'cpu', '--workers', '1'], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith('| CIFAR') or ln.startswith('| ImageNet')]
    assert [r.split('|')[2].strip() for r in rows] == ['vit_lite_7_4', 'deit_tiny'], out.stdout
    assert all(float(r.split('|')[4]) > 0 and float(r.split('|')[5]) > 0 for r in rows), out.stdout


def test_a_json_file_that_fails_at_the_end_is_one_line_and_the_table_is_printed():
    """/dev/full takes the open at the start and fails the write at the end (a full disk): one error line, exit 1,
    after the table."""
    if not os.path.exists('/dev/full'):
        pytest.skip('no /dev/full on this system')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmark.py'), '--device', 'cpu', '--quick', '--models',
                        'vit_lite_7_4', '--pe', 'vit', '--no-timm', '--mem', 'off', '--json', '/dev/full'],
                       capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 1 and 'Traceback' not in r.stderr and '| vit_lite_7_4 |' in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith('error: --json /dev/full: could not write')

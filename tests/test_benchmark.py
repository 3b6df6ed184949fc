"""Tests of benchmark.py's bookkeeping (what its table claims), not of any speed: speed is measured by running it.
One smoke run of the real command line checks that the table has the rows and columns the README shows."""
import os
import subprocess
import sys

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
    assert rows[0][3].strip() == '3.740M' and rows[1][3].strip() == '3.743M'   # PAPER.md §3 counts, rounded
    assert rows[0][7].strip() == '1.00'                                          # vit against itself
    assert float(rows[1][4].replace(',', '')) > 0                                # a throughput was measured
    assert '**Command:** `python benchmark.py --quick' in out.stdout

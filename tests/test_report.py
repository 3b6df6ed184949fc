"""From a sweep to the paper's table (issue 18), CPU only: the runs are real run folders that train.py writes here
(tiny models on generated data), read by report.py; the sweep's rerun is train.py's own "finished" path."""
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpvg  # noqa: E402
import report  # noqa: E402
import train  # noqa: E402
from test_reliability import traced_main, killed_at  # noqa: E402
from test_train import SYN, TINY, _write_cifar, env1, run_main  # noqa: E402

RUN = SYN + ['--synthetic-size', '128', '--global-batch-size', '32', '--epochs', '2']  # 4 steps, 32 val images


def report_main(argv):
    """report.main in this process -> exit code."""
    with pytest.raises(SystemExit) as e:
        report.main([str(a) for a in argv])
    return e.value.code or 0


def best_and_final(folder):
    """A run's best and last val top-1, read here from the log.jsonl train.py wrote."""
    with open(os.path.join(folder, 'log.jsonl')) as f:
        top1 = [json.loads(ln)['val_top1'] for ln in f if ln.strip()]
    return max(top1), top1[-1]


def csv_rows(prefix):
    with open(f'{prefix}.csv') as f:
        return list(csv.DictReader(f))


def snapshot(folder):
    """Every file of a folder: (bytes, mtime in ns)."""
    return {f: ((folder / f).read_bytes(), (folder / f).stat().st_mtime_ns) for f in sorted(os.listdir(folder))}


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
    """The sweep of the README made tiny: {vit, mpvg} x seeds {0, 1} of 2 epochs, an mpvg run of 3 epochs, in
    clean/; in messy/: an mpvg seed-2 run killed (SIGKILL) after its first epoch of 2, a folder that is no run,
    and (made by the test that corrupts it) a third vit seed. Each command is the README's: --resume auto."""
    root = tmp_path_factory.mktemp('sweep')
    for pe in ('vit', 'mpvg'):
        for seed in (0, 1):
            assert run_main(RUN + ['--pe', pe, '--seed', seed, '--output-dir', root / 'clean' / f'{pe}_seed{seed}',
                                   '--resume', 'auto']) == 0
    odd = RUN[:-1] + ['3', '--pe', 'mpvg', '--seed', 0, '--output-dir', root / 'clean' / 'mpvg_3ep_seed0']
    assert run_main(odd + ['--resume', 'auto']) == 0
    ## killed where the second epoch's last.pt write begins: last.pt and log.jsonl hold epoch 0 only
    argv = RUN + ['--pe', 'mpvg', '--seed', 2, '--output-dir', root / 'messy' / 'mpvg_seed2']
    events = []
    assert traced_main(RUN + ['--pe', 'mpvg', '--seed', 2, '--output-dir', root / 'ref'], events=events) == 0
    starts = [k for k, (fn, line, f) in enumerate(events, 1) if f == 'last.pt' and (fn, line) == events[0][:2]]
    killed_at(argv, starts[1])
    shutil.rmtree(root / 'ref')
    (root / 'messy' / 'notes').mkdir()
    (root / 'messy' / 'notes' / 'todo.txt').write_text('seeds 3 and 4 next week\n')
    return root


def test_a_row_per_variant_with_n_seeds_and_the_odd_run_apart(sweep, tmp_path, capsys):
    """The issue's check: 4 runs (vit, mpvg x 2 seeds) + an mpvg run of another length -> a row per variant with
    n = 2 and the mean of the runs' best top-1, and the odd run in a row of its own."""
    clean, out = sweep / 'clean', tmp_path / 'r'
    capsys.readouterr()
    assert report_main([clean, '--out', out]) == 0
    text = capsys.readouterr().out
    rows = csv_rows(out)
    assert len(rows) == 3
    by = {(r['variant'], 'epochs=3' in r['recipe']): r for r in rows}
    assert set(by) == {('vit', False), ('mpvg', False), ('mpvg', True)}
    for (pe, odd), r in by.items():
        folders = [clean / 'mpvg_3ep_seed0'] if odd else [clean / f'{pe}_seed{s}' for s in (0, 1)]
        assert r['runs'].split(';') == [str(f) for f in folders]
        assert int(r['n']) == len(folders) and r['seeds'] == ('0' if odd else '0,1')
        best, final = zip(*map(best_and_final, folders))
        assert float(r['best_top1_mean']) == pytest.approx(statistics.fmean(best), abs=1e-6)
        assert float(r['final_top1_mean']) == pytest.approx(statistics.fmean(final), abs=1e-6)
        if odd:
            assert r['best_top1_std'] == ''  # one run: no spread to give
        else:
            assert float(r['best_top1_std']) == pytest.approx(statistics.stdev(best), abs=1e-6)
        assert r['paper_top1'] == '' and r['diff'] == '' and r['unfinished'] == ''  # synthetic data: no paper number
        assert 'epochs=2' in r['recipe'] or odd
        assert f'{statistics.fmean(best):.2f}' in text
    ## the same table in Markdown (a header, a rule and 3 rows) and a chart
    md = (tmp_path / 'r.md').read_text()
    assert 'as the paper reports' in md and sum(ln.startswith('| vit_lite_7_4') for ln in md.splitlines()) == 3
    assert (tmp_path / 'r.png').stat().st_size > 0


def test_unfinished_not_a_run_and_a_corrupt_log(sweep, tmp_path, capsys):
    """A killed run is listed with its epochs, not averaged; a folder that is no run is skipped with a note; a
    corrupt log.jsonl is named in one line and the rest of the table is still printed (exit code 1)."""
    corrupt = sweep / 'messy' / 'vit_seed2'
    assert run_main(RUN + ['--pe', 'vit', '--seed', 2, '--output-dir', corrupt]) == 0
    ## control: while its log is whole, the third vit seed counts
    assert report_main([sweep, '--out', tmp_path / 'ok']) == 0
    (vit,) = [r for r in csv_rows(tmp_path / 'ok') if r['variant'] == 'vit']
    assert vit['n'] == '3' and vit['seeds'] == '0,1,2'
    lines = (corrupt / 'log.jsonl').read_text().splitlines()
    (corrupt / 'log.jsonl').write_text(lines[0] + '\n' + lines[1][:25] + '\x00garbage\n')
    capsys.readouterr()
    assert report_main([sweep, '--out', tmp_path / 'r']) == 1
    out, err = capsys.readouterr()
    errors = [ln for ln in err.splitlines() if ln.startswith('error:')]
    assert len(errors) == 1 and str(corrupt / 'log.jsonl') in errors[0] and 'line 2' in errors[0], err
    assert 'Traceback' not in err
    assert f'note: {sweep / "messy" / "notes"}: skipped, not a run folder' in err
    rows = csv_rows(tmp_path / 'r')
    assert len(rows) == 3 and all(r['variant'] in out for r in rows)  # the table is still printed
    (vit,) = [r for r in rows if r['variant'] == 'vit']
    assert vit['n'] == '2' and str(corrupt) not in vit['runs']
    (mpvg2,) = [r for r in rows if r['variant'] == 'mpvg' and 'epochs=2' in r['recipe']]
    killed = sweep / 'messy' / 'mpvg_seed2'
    assert mpvg2['unfinished'] == f'seed 2: 1/2 epochs ({killed})' and mpvg2['n'] == '2'
    best = [best_and_final(sweep / 'clean' / f'mpvg_seed{s}')[0] for s in (0, 1)]
    assert float(mpvg2['best_top1_mean']) == pytest.approx(statistics.fmean(best), abs=1e-6)  # not averaged in
    assert 'Not in the table' in (tmp_path / 'r.md').read_text() and 'line 2' in (tmp_path / 'r.md').read_text()
    ## the same line cut short without its newline, as a kill inside its write leaves it (before summary.json):
    ## an unfinished run
    (corrupt / 'log.jsonl').write_text(lines[0] + '\n' + lines[1][:25])
    os.remove(corrupt / 'summary.json')
    assert report_main([sweep, '--out', tmp_path / 'r']) == 0
    (vit,) = [r for r in csv_rows(tmp_path / 'r') if r['variant'] == 'vit']
    assert vit['n'] == '2' and vit['unfinished'] == f'seed 2: 1/2 epochs, last log line torn by a kill ({corrupt})'


def test_rerunning_a_finished_sweep_changes_nothing(sweep, capsys):
    """The README's loop run again: each finished run prints one line and exits 0; no file in its folder changes
    (bytes, mtime), train.lock included."""
    clean = sweep / 'clean'
    for name in sorted(os.listdir(clean)):
        pe, seed = name.split('_')[0], int(name[-1])
        argv = (RUN[:-1] + ['3'] if '3ep' in name else RUN) + ['--pe', pe, '--seed', seed]
        before = snapshot(clean / name)
        capsys.readouterr()
        assert run_main(argv + ['--output-dir', clean / name, '--resume', 'auto']) == 0
        out = capsys.readouterr().out.strip()
        with open(clean / name / 'log.jsonl') as f:
            top1 = [json.loads(ln)['val_top1'] for ln in f]
        assert out == (f'{clean / name}: finished ({len(top1)} epochs, best top-1 {max(top1):.2f} at epoch '
                       f'{top1.index(max(top1))}), nothing to do')
        assert snapshot(clean / name) == before, name


def test_a_finished_run_needs_no_data_and_gets_its_summary_back(tmp_path, capsys):
    """A finished CIFAR run whose data is gone: --resume auto says finished (nothing loads the data, nothing is
    written). Its summary.json deleted (as a kill right after the last checkpoint leaves it), the run is not finished:
    --resume auto resumes it (that needs its data), trains nothing, and writes the same summary.json back; the
    checkpoints stay untouched. More epochs on purpose is not finished either: it needs the data, and trains on."""
    _write_cifar(tmp_path / 'data')
    out = tmp_path / 'run'
    argv = TINY + ['--data', 'cifar100', '--data-path', tmp_path / 'data', '--no-download', '--global-batch-size',
                   '16', '--epochs', '1', '--output-dir', out, '--resume', 'auto']
    assert run_main(argv) == 0
    summary = json.loads((out / 'summary.json').read_text())
    best, final = best_and_final(out)
    assert (summary['epochs'], summary['best_top1'], summary['final_top1']) == (1, best, final)
    assert summary['model'] == 'vit_lite_7_4' and summary['devices'] and summary['time_s'] >= 0
    shutil.move(tmp_path / 'data', tmp_path / 'gone')
    before = snapshot(out)
    capsys.readouterr()
    assert run_main(argv) == 0 and 'finished (1 epochs' in capsys.readouterr().out
    assert snapshot(out) == before
    os.remove(out / 'summary.json')
    capsys.readouterr()
    assert run_main(argv) == 2 and 'CIFAR-100 not found' in capsys.readouterr().err
    shutil.move(tmp_path / 'gone', tmp_path / 'data')
    assert run_main(argv) == 0
    after = snapshot(out)
    assert after['summary.json'][0] == before['summary.json'][0]
    assert {f: after[f] for f in ('last.pt', 'best.pt')} == {f: before[f] for f in ('last.pt', 'best.pt')}
    assert after['log.jsonl'][0] == before['log.jsonl'][0]
    assert run_main(argv) == 0 and 'finished (1 epochs' in capsys.readouterr().out
    ## control: a run with epochs left does read its data
    longer = argv + ['--epochs', '2', '--allow-change', 'epochs']
    shutil.move(tmp_path / 'data', tmp_path / 'gone')
    capsys.readouterr()
    assert run_main(longer) == 2 and 'CIFAR-100 not found' in capsys.readouterr().err
    shutil.move(tmp_path / 'gone', tmp_path / 'data')
    assert run_main(longer) == 0
    assert json.loads((out / 'summary.json').read_text())['epochs'] == 2
    with open(out / 'log.jsonl') as f:
        assert [json.loads(ln)['epoch'] for ln in f] == [0, 1]


def test_correlation_of_a_trained_run_on_its_own_validation_images(sweep, tmp_path, capsys):
    """--correlation: best.pt, rebuilt from its config, on validation images spread over the run's own set with its
    eval preprocessing. Recomputed here from the checkpoint, the generated set and the normalization of
    DATASETS['synthetic']; without the normalization (control) the numbers differ."""
    run = sweep / 'clean' / 'mpvg_seed1'
    capsys.readouterr()
    assert report_main(['--correlation', run, '--images', 8, '--out', tmp_path / 'c']) == 0
    assert 'mpvg (vit_lite_7_4' in capsys.readouterr().out
    (res,) = json.loads((tmp_path / 'c.json').read_text())['runs']
    assert res['variant'] == 'mpvg' and res['images'] == 8 and res['corr'][0] is None  # PVG/MPVG: none in layer 0
    ck = torch.load(run / 'best.pt', weights_only=True)
    cfg = ck['config']
    assert res['epoch'] == ck['best_epoch'] and res['checkpoint'] == str(run / 'best.pt')
    model = mpvg.create_model(cfg['model'], pe=cfg['pe'], **cfg['model_kwargs'])
    model.load_state_dict(ck['model'])
    images = train.load_data(cfg)[1].tensors[0][[0, 4, 8, 12, 16, 20, 24, 28]].float()  # 32 images, every 4th
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (train.DATASETS['synthetic']['mean'],
                                                             train.DATASETS['synthetic']['std']))
    want = mpvg.pe_token_correlation(model.eval(), (images / 255 - mean) / std)
    assert res['corr'][1] == pytest.approx(want[1], abs=1e-6) and res['parts'][1]['corr'] == res['corr'][1]
    assert want[1] != pytest.approx(mpvg.pe_token_correlation(model, images / 255)[1], abs=1e-3)
    assert (tmp_path / 'c.png').stat().st_size > 0


def test_the_paper_numbers_of_a_row():
    """Each row's paper number, from resolved train.py configs: the presets, the gap row (Fig. 5a), one spelling of
    a variant for another, none where the architecture is not the paper's; the recipe column names what differs."""
    def row(*flags, best=80.0):
        cfg = train.resolve_config(train.build_parser().parse_args(list(flags)), 1)
        run = dict(folder='x', cfg=cfg, seed=0, finished=True, best=best, final=best, time_s=1.0, device_hours=0.0,
                   devices='1x x86_64', epochs_done=cfg['total_epochs'], total_epochs=cfg['total_epochs'])
        return report.group_row(report.group_key(cfg), [run])
    r = row('--model', 'deit_tiny', '--pe', 'gap', best=72.9)
    assert (r['variant'], r['paper_top1'], r['paper_source'], r['recipe']) == ('gap', 72.40, 'Fig. 5a', 'default')
    assert r['diff'] == pytest.approx(0.5)
    assert row('--model', 'deit_tiny', '--pe', 'pvg', '--last-ln-pe', '0')['variant'] == 'mpvg'
    assert row('--model', 'deit_tiny', '--pe', 'pvg', '--last-ln-pe', '0')['paper_top1'] == 73.51
    assert row('--model', 'deit_tiny', '--pe', 'mpvg', '--last-ln-pe', '5')['paper_top1'] == 73.39
    r = row('--model', 'deit_tiny', '--pe', 'pvg', '--last-ln-pe', '5')  # Table 5's pos_5, spelled from pvg
    assert (r['variant'], r['paper_top1'], r['paper_source']) == ('pvg last_ln_pe=5', 73.39, 'Table 5')
    key = lambda *flags: report.group_key(train.resolve_config(train.build_parser().parse_args(list(flags)), 1))
    assert key('--pe', 'pvg', '--last-ln-pe', '0', '--seed', '1') == key('--pe', 'mpvg')  # one model, one group
    assert key('--pe', 'mpvg', '--epochs', '100') != key('--pe', 'mpvg') != key('--pe', 'mpvg', '--no-hierarchical')
    assert row('--model', 'deit_tiny', '--pe', 'gap', '--last-ln-pe', '0')['paper_top1'] == 72.14
    assert row('--model', 'deit_base', '--pe', 'vit')['paper_top1'] == 81.85
    r = row('--pe', 'lape', '--pool', 'gap')
    assert (r['variant'], r['paper_top1']) == ('lape pool=gap', None)
    r = row('--pe', 'mpvg', '--epochs', '100')
    assert (r['paper_top1'], r['paper_source'], r['recipe']) == (76.87, 'Table 2', 'epochs=100')
    r = row('--pe', 'mpvg', '--embed-dim', '128')
    assert (r['model'], r['paper_top1']) == ('vit_lite_7_4 embed_dim=128', None)


def test_bad_paths_from_the_command_line(tmp_path):
    """No traceback: a path that is not there is named; with nothing to report, exit code 2."""
    (tmp_path / 'empty').mkdir()
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'report.py'), str(tmp_path / 'nope'),
                        str(tmp_path / 'empty'), '--out', str(tmp_path / 'r')], capture_output=True, text=True,
                       env=env1(), timeout=120)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    assert f'{tmp_path / "nope"}: no such folder' in r.stderr and 'no readable run folder' in r.stderr
    assert f'{tmp_path / "empty"}: skipped, not a run folder' in r.stderr
    assert not os.path.exists(tmp_path / 'r.md')


def test_correlation_of_a_folder_without_checkpoint(tmp_path, capsys):
    assert report_main(['--correlation', tmp_path]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and str(tmp_path / 'best.pt') in err and 'Traceback' not in err

"""
The paper's tables from train.py's run folders, and its Fig. 2 / Fig. 4 from a checkpoint (MPVG, AAAI 2025).

    python report.py runs/table2                        # the table: one row per model, data, variant and recipe
    python report.py runs/ --out runs/report            # also writes runs/report.md, .csv and .png
    python report.py --correlation runs/table2/mpvg_seed0 runs/table2/pvg_seed0     # Fig. 2 / 4 per layer

The table reads every run folder (a folder holding config.json) at or below the given paths: config.json,
log.jsonl and summary.json. Runs are grouped by model (with any architecture override), data, PE variant (the
effective knobs, so `--pe pvg --last-ln-pe 0` is `mpvg`) and every recipe value of config.json except the seed;
the command, provenance, paths, process count and the like never group. So runs of different recipes or lengths
are never averaged. Per group: n finished runs (seeds), mean +- sample std over them of each run's best-epoch
top-1 (what the paper reports: the best epoch of the raw model), the same for the final epoch, the paper's number
for that row and the difference. A run is finished when log.jsonl has all of its epochs (or summary.json holds
them); an unfinished run is listed with its epoch count and never averaged. Writes the table as Markdown and CSV
and, when matplotlib is installed, a bar chart laid out like the paper's Fig. 1. Exit code 0, 1 when a run's
record could not be read (named on stderr; the rest of the table is still written), 2 when nothing was found.

--correlation: for each run, its best.pt (or --checkpoint last) rebuilt from its config, a batch of its own
validation set with its own eval preprocessing, and per layer the correlation between the token embedding after
LN and the PE added there (mpvg.pe_token_correlation, the paper's Fig. 2 / Fig. 4 statistic, with its split of
mpvg.pe_token_correlation_parts); written as JSON and, with matplotlib, as a figure.

Needs torch (and train.py / mpvg.py beside it); matplotlib only for the figures.
"""
import argparse
import ast
import csv
import dataclasses
import json
import os
import statistics
import sys
import textwrap

import torch

import mpvg
import train

## The paper's top-1 accuracy (%), as printed (4x RTX 4090, 8 for DeiT-B; one run each, no seeds or error bars).
## Keys: (model, data) -> {variant: (top-1, where in the paper)}. A variant is a preset name, or a preset plus the
## knobs that differ from it (variant_name below), so the ablations have rows of their own.
PAPER = {
    ('deit_tiny', 'imagenet'): {
        'vit': (72.14, 'Table 1'), 'lape': (72.94, 'Table 1'), 'pvg': (73.17, 'Table 1'), 'mpvg': (73.51, 'Table 1'),
        'gap': (72.40, 'Fig. 5a'),                                 # GAP only: no class token, no layer-wise PE
        'gap last_ln_pe=0': (72.14, 'Fig. 5b'),                    # GAP + PE at the Last LN, no layer-wise PE
        'mpvg last_ln_pe=11': (73.30, 'Table 5'), 'mpvg last_ln_pe=8': (73.38, 'Table 5'),
        'mpvg last_ln_pe=5': (73.39, 'Table 5'),                   # which PE the Last LN gets (pos_0 is mpvg)
        'mpvg layerwise_from=0': (73.31, 'Table 6'), 'mpvg hierarchical=False': (73.48, 'Table 6'),
        'mpvg pe_at_input=False': (73.28, 'Table 6')},
    ('deit_small', 'imagenet'): {'vit': (79.81, 'Table 1'), 'lape': (80.39, 'Table 1'), 'pvg': (80.38, 'Table 1'),
                                 'mpvg': (80.61, 'Table 1')},
    ('deit_base', 'imagenet'): {'vit': (81.85, 'Table 1'), 'lape': (82.15, 'Table 1'), 'pvg': (82.21, 'Table 1'),
                                'mpvg': (82.42, 'Table 1')},
    ('vit_lite_7_4', 'cifar100'): {'vit': (74.90, 'Table 2'), 'lape': (75.52, 'Table 2'), 'pvg': (76.67, 'Table 2'),
                                   'mpvg': (76.87, 'Table 2')},
}
## Fig. 2: the correlation between LN_l(x_l) and the PE added in layer l, DeiT-Ti, layer-wise PE + GAP.
PAPER_FIG2 = {'model': 'deit_tiny', 'variant': 'lape pool=gap', 'layers': [1, 4, 7, 9, 11],
              'corr': [-0.37, -0.67, -0.82, -0.85, -0.95]}
## Fig. 1's order: the default, GAP, layer-wise, layer-wise + GAP (the conflict), then PVG and MPVG.
VARIANT_ORDER = ['vit', 'gap', 'lape', 'lape pool=gap', 'pvg', 'mpvg']

## config.json keys that never group runs: who ran it where and how (not what was trained), and values derived
## from others (total_epochs, lr_base, recipe, the resolved sizes). The model, data and PE knobs group through
## their own columns; every other key (all recipe values, and any key a later train.py adds) groups.
NOT_RECIPE = {'seed', 'output_dir', 'provenance', 'resume', 'overwrite', 'eval_only', 'workers', 'log_interval',
              'no_progress', 'data_path', 'download', 'world_size', 'per_process_batch_size', 'num_params',
              'steps_per_epoch', 'train_size', 'val_size', 'compile', 'img_size_resolved', 'total_epochs',
              'no_aug', 'recipe', 'lr_scaled', 'lr_base', 'num_classes', 'run_id', 'provenance_history', 'model',
              'pe', 'data', 'model_kwargs',
              *train.ARCH_FLAGS, *mpvg.PE_KNOBS}


class Unreadable(Exception):
    """A run folder whose record cannot be read; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------------------------------------------
# reading run folders

def find_runs(paths, notes):
    """Every run folder (one holding config.json) at or below the paths; what is skipped, and why, goes to notes."""
    runs, seen = [], set()
    for top in paths:
        if not os.path.isdir(top):
            notes.append(f'{top}: {"not a folder" if os.path.exists(top) else "no such folder"}, skipped')
            continue
        for folder, subdirs, files in os.walk(top):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
            if 'config.json' in files:
                subdirs[:] = []  # a run folder holds no runs
                if os.path.realpath(folder) not in seen:
                    seen.add(os.path.realpath(folder))
                    runs.append(folder)
            elif set(files) & set(train.RUN_FILES + ('train.lock',)):
                held = sorted(set(files) & set(train.RUN_FILES + ('train.lock',)))
                notes.append(f'{folder}: skipped, no config.json (it holds {", ".join(held)}): a run killed before '
                             f'it wrote one')
            elif not subdirs:
                notes.append(f'{folder}: skipped, not a run folder (no config.json)')
    return runs


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise Unreadable(f'{path}: not readable JSON ({type(e).__name__}: {e})') from None


def read_log(path):
    """log.jsonl -> (its epoch lines, whether its last line is torn). A last line cut short (no newline: a kill during
    its write, which --resume auto repairs) ends the lines; any other bad line raises Unreadable, naming the file."""
    lines = []
    if not os.path.exists(path):
        return lines, False
    with open(path, 'rb') as f:
        raws = f.read().split(b'\n')
    for number, raw in enumerate(raws, start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            line = dict(line, val_top1=float(line['val_top1']), epoch=int(line['epoch']))
        except (ValueError, TypeError, KeyError) as e:
            if number == len(raws):  # after the last newline: a torn write
                return lines, True
            raise Unreadable(f'{path}: line {number} is not an epoch line of train.py ({type(e).__name__}: '
                             f'{str(e)[:80]}); the run is left out. If its folder still has last.pt, its train.py '
                             f'command with --resume auto rebuilds log.jsonl') from None
        if line['epoch'] != len(lines):
            raise Unreadable(f'{path}: line {number} is epoch {line["epoch"]}, expected {len(lines)} (lines missing '
                             f'or repeated); the run is left out')
        lines.append(line)
    return lines, False


def read_summary(path, total):
    """summary.json if it is whole and holds all `total` epochs (one left from before a longer resume does not)."""
    try:
        summary = read_json(path)
        ok = summary['epochs'] == total and all(isinstance(summary[k], (int, float)) for k in SUMMARY_KEYS)
    except (Unreadable, TypeError, KeyError):
        return None
    return summary if ok else None


SUMMARY_KEYS = ('best_top1', 'best_epoch', 'final_top1', 'time_s')


def read_run(folder):
    """One run: its config and whether it is finished, with its best and final top-1 if it is."""
    cfg = read_json(os.path.join(folder, 'config.json'))
    need = ('model', 'pe', 'data', 'model_kwargs', 'seed', 'total_epochs')
    if not isinstance(cfg, dict) or set(need) - set(cfg) or not isinstance(cfg['model_kwargs'], dict):
        raise Unreadable(f'{folder}/config.json: not a config of train.py (it needs {", ".join(need)})')
    (log, torn), total = read_log(os.path.join(folder, 'log.jsonl')), cfg['total_epochs']
    if len(log) > total:
        raise Unreadable(f'{folder}/log.jsonl: {len(log)} epochs, but config.json says the run has {total}')
    summary = read_summary(os.path.join(folder, 'summary.json'), total)
    prov = cfg.get('provenance') or {}
    run = dict(folder=folder, cfg=cfg, seed=cfg['seed'], epochs_done=len(log), total_epochs=total, torn=torn,
               finished=len(log) == total or summary is not None, devices=device_names(prov.get('devices') or []))
    if len(log) == total:
        top1 = [ln['val_top1'] for ln in log]
        run.update(best=max(top1), best_epoch=top1.index(max(top1)), final=top1[-1],
                   time_s=sum(float(ln.get('epoch_time_s', 0)) for ln in log))
    elif summary is not None:  # log.jsonl short of epochs (cut by hand?): summary.json holds the result
        run.update(best=float(summary['best_top1']), best_epoch=summary['best_epoch'],
                   final=float(summary['final_top1']), time_s=float(summary['time_s']), epochs_done=total)
    if run['finished']:
        run['device_hours'] = run['time_s'] * int(cfg.get('world_size', 1)) / 3600
    return run


def device_names(devices):
    """['NVIDIA H200'] * 4 -> '4x NVIDIA H200' (a CPU run's device is its machine type, e.g. 'x86_64')."""
    counts = {d: devices.count(d) for d in dict.fromkeys(devices)}
    return ', '.join(f'{n}x {d}' for d, n in counts.items()) or '?'


# ----------------------------------------------------------------------------------------------------------------
# grouping

def pe_knobs(model, pe, overrides):
    """The effective PE knobs (mpvg.PEConfig) of a preset with knob overrides; None if mpvg.py cannot build it."""
    try:
        return mpvg.make_config(model, pe=pe, **{k: v for k, v in overrides.items() if k in mpvg.PE_KNOBS}).pe
    except ValueError:
        return None


def variant_name(cfg):
    """The PE variant a run trained, named from its effective knobs: a preset name, or the nearest preset plus the
    knobs that differ ('lape pool=gap', 'mpvg last_ln_pe=5'); on a tie, the preset the run named."""
    pe = pe_knobs(cfg['model'], cfg['pe'], cfg['model_kwargs'])
    if pe is None:  # a model this mpvg.py cannot build: the name as given
        return ' '.join([cfg['pe']] + [f'{k}={v}' for k, v in sorted(cfg['model_kwargs'].items())
                                       if k in mpvg.PE_KNOBS])
    diffs = {name: [f'{k}={getattr(pe, k)}' for k in mpvg.PE_KNOBS if getattr(pe, k) != getattr(preset, k)]
             for name, preset in mpvg.PE_PRESETS.items()}
    fewest = [n for n in diffs if len(diffs[n]) == min(map(len, diffs.values()))]
    name = cfg['pe'] if cfg['pe'] in fewest else fewest[0]
    return ' '.join([name] + diffs[name])


def paper_number(model, data, pe):
    """(top-1, where) of the paper's row with these effective knobs, whatever the spelling; (None, None) if none."""
    for label, number in PAPER.get((model, data), {}).items():
        preset, *knobs = label.split()
        overrides = {k: ast.literal_eval(v) for k, v in (kv.split('=') for kv in knobs)}
        if pe is not None and pe_knobs(model, preset, overrides) == pe:
            return number
    return None, None


def show_value(v):
    return ','.join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


_defaults = {}


def default_config(model, data):
    """train.py's resolved config for `--model M --data D` and nothing else: the paper's recipe of the model."""
    if (model, data) not in _defaults:
        _defaults[model, data] = {}
        if model in mpvg.MODELS and data in train.DATASETS:
            args = train.build_parser().parse_args(['--model', model, '--data', data])
            _defaults[model, data] = train.resolve_config(args, world_size=1)
    return _defaults[model, data]


def group_key(cfg):
    """What makes two runs the same experiment: everything but the seed and how / where it ran (NOT_RECIPE)."""
    arch = {k: v for k, v in cfg['model_kwargs'].items() if k not in mpvg.PE_KNOBS}
    recipe = {k: v for k, v in cfg.items() if k not in NOT_RECIPE}
    if recipe.get('allow_change'):  # resumed with other values on purpose: part of it trained another recipe
        recipe['allow_change'] = sorted(a.lstrip('-').replace('-', '_') for a in recipe['allow_change'])
    pe = pe_knobs(cfg['model'], cfg['pe'], cfg['model_kwargs'])
    return (cfg['model'], json.dumps(arch, sort_keys=True), cfg['data'],
            variant_name(cfg) if pe is None else json.dumps(dataclasses.asdict(pe), sort_keys=True),
            json.dumps(recipe, sort_keys=True))


def group_rows(runs):
    """One row per group of runs (group_key), in a stable order: model, data, recipe, variants in Fig. 1's order."""
    groups = {}
    for run in runs:
        groups.setdefault(group_key(run['cfg']), []).append(run)
    rows = [group_row(key, sorted(members, key=lambda r: (r['seed'], r['folder']))) for key, members in groups.items()]
    models = list(mpvg.MODELS)
    model_rank = lambda m: models.index(m.split()[0]) if m.split()[0] in models else len(models)
    variant_rank = lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else len(VARIANT_ORDER)
    rows.sort(key=lambda r: (model_rank(r['model']), r['model'], r['data'], r['recipe'], variant_rank(r['variant']),
                             r['variant']))
    return rows


def group_row(key, members):
    """A group's row: its finished runs averaged, the unfinished ones listed, the paper's number where it has one."""
    model, arch, data, _, recipe = key
    arch, recipe, default = json.loads(arch), json.loads(recipe), default_config(model, data)
    if arch.get('num_classes') == train.DATASETS.get(data, {}).get('num_classes'):
        del arch['num_classes']  # the data set's own, not an override
    changed = {k: v for k, v in sorted(recipe.items()) if k not in default or default[k] != v}
    cfg = members[0]['cfg']
    variant, pe = variant_name(cfg), pe_knobs(model, cfg['pe'], cfg['model_kwargs'])
    paper, source = (None, None) if arch else paper_number(model, data, pe)  # the paper's architectures only
    done = [r for r in members if r['finished']]
    best, final = [r['best'] for r in done], [r['final'] for r in done]
    mean = lambda v: statistics.fmean(v) if v else None
    std = lambda v: statistics.stdev(v) if len(v) > 1 else None  # sample std (n - 1), as seeds are a sample
    return dict(
        model=' '.join([model] + [f'{k}={v}' for k, v in arch.items()]), data=data, variant=variant,
        recipe=' '.join(f'{k}={show_value(v)}' for k, v in changed.items()) or 'default',
        n=len(done), seeds=','.join(str(r['seed']) for r in done),
        best_top1_mean=mean(best), best_top1_std=std(best), final_top1_mean=mean(final), final_top1_std=std(final),
        paper_top1=paper, paper_source=source, diff=None if paper is None or not best else mean(best) - paper,
        time_h_mean=mean([r['time_s'] / 3600 for r in done]),
        device_hours_mean=mean([r['device_hours'] for r in done]),
        devices='; '.join(dict.fromkeys(r['devices'] for r in done)),
        unfinished='; '.join(f'seed {r["seed"]}: {r["epochs_done"]}/{r["total_epochs"]} epochs'
                             + (', last log line torn by a kill' if r['torn'] else '') + f' ({r["folder"]})'
                             for r in members if not r['finished']),
        runs=';'.join(r['folder'] for r in done), best_top1_runs=best)


# ----------------------------------------------------------------------------------------------------------------
# output: text, Markdown, CSV, the chart

COLUMNS = [('model', 'model'), ('data', 'data'), ('variant', 'variant'), ('recipe', 'recipe (not default)'),
           ('n', 'n'), ('seeds', 'seeds'), ('best', 'best top-1'), ('final', 'final top-1'), ('paper', 'paper'),
           ('diff', 'diff'), ('time', 'time/run'), ('unfinished', 'unfinished')]
EXPLAIN = ('best top-1: mean +- sample std over the n finished runs (seeds) of each run\'s best epoch, as the paper '
           'reports (the best epoch of the raw model); final top-1: the last epoch; paper: the paper\'s number for '
           'the row (one run, no seeds given), diff = mean best - paper; recipe: the values that differ from '
           'train.py\'s default, the paper\'s recipe of the model; time/run: wall time of the epochs (training + '
           'evaluation) on the devices named; unfinished: runs not averaged, with the epochs they have.')


def cells(row):
    pm = lambda m, s: '-' if m is None else f'{m:.2f}' + ('' if s is None else f' +- {s:.2f}')
    h = row['time_h_mean']
    time = '-' if h is None else (f'{h:.1f} h' if h >= 1 else f'{h * 60:.1f} min' if h >= 1 / 60 else
                                  f'{h * 3600:.1f} s') + f' on {row["devices"]}'
    return dict(model=row['model'], data=row['data'], variant=row['variant'], recipe=row['recipe'], n=str(row['n']),
                seeds=row['seeds'] or '-', best=pm(row['best_top1_mean'], row['best_top1_std']),
                final=pm(row['final_top1_mean'], row['final_top1_std']),
                paper='-' if row['paper_top1'] is None else f'{row["paper_top1"]:.2f} ({row["paper_source"]})',
                diff='-' if row['diff'] is None else f'{row["diff"]:+.2f}', time=time,
                unfinished=row['unfinished'] or '-')


def text_table(rows):
    table = [[title for _, title in COLUMNS]] + [[cells(r)[k] for k, _ in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return '\n'.join('  '.join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table)


def markdown(rows, notes):
    md = ['# Results', '', EXPLAIN.replace('+-', '±'), '',
          '| ' + ' | '.join(title for _, title in COLUMNS) + ' |',
          '|' + '|'.join('---:' if k in ('n', 'best', 'final', 'paper', 'diff') else '---' for k, _ in COLUMNS) + '|']
    md += ['| ' + ' | '.join(cells(r)[k].replace('+-', '±').replace('|', '\\|') for k, _ in COLUMNS) + ' |'
           for r in rows]
    if notes:
        md += ['', 'Not in the table:', ''] + [f'- {n}' for n in notes]
    return '\n'.join(md) + '\n'


CSV_FIELDS = ['model', 'data', 'variant', 'recipe', 'n', 'seeds', 'best_top1_mean', 'best_top1_std', 'final_top1_mean',
              'final_top1_std', 'paper_top1', 'paper_source', 'diff', 'time_h_mean', 'device_hours_mean', 'devices',
              'unfinished', 'runs']


def write_csv(path, rows):
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction='ignore')
        w.writeheader()
        for r in rows:
            w.writerow({k: '' if r[k] is None else round(r[k], 6) if isinstance(r[k], float) else r[k]
                        for k in CSV_FIELDS})


def bar_chart(path, rows):
    """The paper's Fig. 1 layout: per model (and data, recipe) a bar per variant, top-1 on a zoomed axis. Bars:
    mean best top-1 with +- std; dots: each seed; a black tick: the paper's number."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = {}
    for r in rows:
        if r['n']:
            panels.setdefault((r['model'], r['data'], r['recipe']), []).append(r)
    if not panels:
        return False
    widths = [len(rs) + 1.5 for rs in panels.values()]
    fig, axes = plt.subplots(1, len(panels), figsize=(0.9 * sum(widths) + 0.5, 3.6), squeeze=False,
                             gridspec_kw=dict(width_ratios=widths))
    for ax, width, ((model, data, recipe), rs) in zip(axes[0], widths, panels.items()):
        x = range(len(rs))
        means = [r['best_top1_mean'] for r in rs]
        ax.bar(x, means, yerr=[r['best_top1_std'] or 0 for r in rs], color='#9db4d6', edgecolor='#2f4b7c',
               capsize=3, label='ours: mean best top-1 (+- std)')
        for i, r in enumerate(rs):
            ax.plot([i] * len(r['best_top1_runs']), r['best_top1_runs'], 'o', color='#2f4b7c', ms=3)
            if r['paper_top1'] is not None:
                ax.plot([i - 0.4, i + 0.4], [r['paper_top1']] * 2, color='black', lw=2,
                        label='paper' if not any(q['paper_top1'] is not None for q in rs[:i]) else None)
            ax.text(i + 0.05, r['best_top1_mean'], f'{r["best_top1_mean"]:.2f}', ha='left', va='bottom', fontsize=8)
        values = means + [r['paper_top1'] for r in rs if r['paper_top1'] is not None] + \
            [v for r in rs for v in r['best_top1_runs']]
        lo, hi = min(values), max(values)
        pad = max(0.5, 0.25 * (hi - lo))
        ax.set_ylim(max(0.0, lo - 2 * pad), min(100.0, hi + 2 * pad))
        ax.set_xticks(list(x), [r['variant'].replace(' ', '\n') + f'\nn={r["n"]}' for r in rs], fontsize=8)
        ax.set_ylabel('top-1 (%)')
        title = f'{model} on {data}' + ('' if recipe == 'default' else f', {recipe}')
        ax.set_title(textwrap.fill(title, int(14 * width)), fontsize=7)
        ax.legend(fontsize=6, loc='lower left')
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def table_report(args):
    notes, problems = [], []
    runs = []
    for folder in find_runs(args.paths, notes):
        try:
            runs.append(read_run(folder))
        except Unreadable as e:
            problems.append(str(e))
    for p in problems:
        print(f'error: {p}', file=sys.stderr)
    for n in notes:
        print(f'note: {n}', file=sys.stderr)
    if not runs:
        print(f'error: no readable run folder (one holding config.json) at or below {" ".join(args.paths)}.',
              file=sys.stderr)
        return 2
    rows = group_rows(runs)
    print(text_table(rows))
    print('\n' + EXPLAIN)
    out = args.out or 'report'
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + '.md', 'w') as f:
        f.write(markdown(rows, problems + notes))
    write_csv(out + '.csv', rows)
    written = [out + '.md', out + '.csv']
    try:
        if bar_chart(out + '.png', rows):
            written.append(out + '.png')
    except ImportError:
        print('note: matplotlib is not installed: no chart (pip install matplotlib)', file=sys.stderr)
    print(f'wrote {", ".join(written)}')
    return 1 if problems else 0


# ----------------------------------------------------------------------------------------------------------------
# Fig. 2 / Fig. 4: per-layer correlation between the token embedding after LN and the PE, from a checkpoint

def eval_preprocess(cfg, x):
    """The run's own eval preprocessing of a uint8 batch (B, 3, H, W) -> normalized float (B, 3, S, S), exactly as
    train.py's evaluate(): the in-memory sets as they are (resized if the model's size differs), image folders
    already Resize + CenterCrop'ed by their loader, then the data set's mean / std."""
    return train.make_augment(cfg, in_memory=cfg['data'] != 'imagenet').eval(x)


def load_run_model(run, which):
    """(model in eval mode, checkpoint, its path) from <run>/<which>.pt, or from a .pt file given directly."""
    path = run if run.endswith('.pt') else os.path.join(run, f'{which}.pt')
    if not os.path.isfile(path):
        raise train.UserError(f'{path}: no such checkpoint (a run folder holds best.pt and last.pt after its first '
                              f'epoch).')
    ckpt = train.load_checkpoint(path)
    try:
        cfg = ckpt['config']
        model = mpvg.create_model(cfg['model'], pe=cfg['pe'], **cfg['model_kwargs'])
        model.load_state_dict(ckpt['model'])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # written by another version of train.py / mpvg.py
        raise train.UserError(f'{path}: its model cannot be rebuilt by this mpvg.py ({type(e).__name__}: '
                              f'{(str(e).splitlines() or [""])[0][:200]}).') from None
    return model.eval(), ckpt, path


def validation_batch(cfg, images, device):
    """`images` validation images spread evenly over the run's own validation set (image folders are sorted by
    class), with its eval preprocessing: (B, 3, S, S)."""
    _, val_set = train.load_data(cfg)
    n = len(val_set)
    indices = sorted({i * n // min(images, n) for i in range(min(images, n))})
    loader = train.make_loader(val_set, cfg, device, indices=indices)
    return torch.cat([eval_preprocess(cfg, x.to(device)) for x, _ in loader])


def correlation_report(args):
    device = torch.device(args.device)
    results = []
    for run in args.paths:
        model, ckpt, path = load_run_model(run, args.checkpoint)
        cfg = dict(ckpt['config'], world_size=1, per_process_batch_size=min(args.images, 256), workers=0)
        if args.data_path:
            cfg['data_path'] = args.data_path
        x = validation_batch(cfg, args.images, device)
        parts = mpvg.pe_token_correlation_parts(model.to(device), x)
        results.append(dict(run=run, checkpoint=path, epoch=ckpt['epoch'] - 1, model=cfg['model'],
                            data=cfg['data'], variant=variant_name(cfg), seed=cfg['seed'], images=len(x),
                            corr=[None if p is None else p['corr'] for p in parts], parts=parts))
        shown = ' '.join('-' if p is None else f'{p["corr"]:+.2f}' for p in parts)
        print(f'{run}: {results[-1]["variant"]} ({cfg["model"]}, epoch {results[-1]["epoch"]}, {len(x)} images), '
              f'per layer: {shown}')
        if all(p is None for p in parts):
            print(f'  ({results[-1]["variant"]} adds no PE inside its layers: nothing to correlate)')
    out = args.out or 'correlation'
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + '.json', 'w') as f:
        json.dump(dict(statistic='per layer l: Pearson correlation over the T x D entries between LN_l(x_l) '
                                 'averaged over the images and the PE added in layer l (mpvg.pe_token_correlation); '
                                 'parts: its per-channel / position-dependent split (our analysis, not the paper\'s)',
                       paper_fig2=PAPER_FIG2, runs=results), f, indent=1)
    written = [out + '.json']
    try:
        correlation_figure(out + '.png', results)
        written.append(out + '.png')
    except ImportError:
        print('note: matplotlib is not installed: no figure (pip install matplotlib)', file=sys.stderr)
    print(f'wrote {", ".join(written)}')
    return 0


def correlation_figure(path, results):
    """Fig. 4's layout: correlation per layer, a line per run; the paper's Fig. 2 values beside DeiT-Ti runs."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in results:
        pts = [(layer, c) for layer, c in enumerate(r['corr']) if c is not None]
        if pts:
            ax.plot(*zip(*pts), 'o-', ms=3, label=f'{os.path.basename(os.path.normpath(r["run"]))}: {r["model"]} '
                                                  f'{r["variant"]} seed {r["seed"]}')
    depth = max([len(r['corr']) for r in results] + [12 if any(r['model'] == PAPER_FIG2['model'] for r in results)
                                                      else 1])
    ax.set_xticks(range(depth))
    ax.set_xlim(-0.5, depth - 0.5)
    if any(r['model'] == PAPER_FIG2['model'] for r in results):
        ax.plot(PAPER_FIG2['layers'], PAPER_FIG2['corr'], 'ks--', ms=4,
                label='paper Fig. 2 (DeiT-Ti, layer-wise + GAP)')
    ax.axhline(0, color='grey', lw=0.5)
    ax.set_xlabel('layer l')
    ax.set_ylabel('corr(LN_l(x_l), PE_l)')
    ax.set_ylim(-1, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# main

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f'error: {message}. See python report.py --help.\n')


def build_parser():
    p = Parser(description='The paper\'s table from train.py run folders (grouped by model, data, variant and '
                                 'recipe; mean +- std over seeds of the best-epoch top-1, as the paper reports), or '
                                 'with --correlation its Fig. 2 / Fig. 4 from checkpoints.',
                     epilog='Exit code: 0; 1 when a run\'s record could not be read (named on stderr, the rest is '
                            'still written); 2 when nothing was found or the input is wrong.',
                     allow_abbrev=False)
    p.add_argument('paths', nargs='+', metavar='RUN_DIR', help='run folders, or folders holding them (searched '
                   'recursively); with --correlation: run folders or .pt files')
    p.add_argument('--out', help='output path prefix: PREFIX.md, PREFIX.csv, PREFIX.png (default: report); with '
                   '--correlation PREFIX.json and PREFIX.png (default: correlation)')
    g = p.add_argument_group('--correlation (Fig. 2 / Fig. 4)')
    g.add_argument('--correlation', action='store_true', help='per-layer correlation between LN_l(x_l) and the PE of '
                   'layer l, on the run\'s own validation images')
    g.add_argument('--checkpoint', choices=['best', 'last'], default='best', help='which checkpoint of each run '
                   '(default best: the epoch the table reports)')
    g.add_argument('--images', type=int, default=256, help='validation images, spread over the set (default 256)')
    g.add_argument('--data-path', help='where the run\'s data set is now (default: its config\'s --data-path)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.images < 1:
            raise train.UserError(f'--images {args.images} is invalid: must be an int >= 1.')
        if args.device.startswith('cuda') and not torch.cuda.is_available():
            raise train.UserError(f'--device {args.device}: no CUDA device here; use --device cpu.')
        code = correlation_report(args) if args.correlation else table_report(args)
    except train.UserError as e:
        print(f'error: {e}', file=sys.stderr)
        code = 2
    except BrokenPipeError:  # stdout piped into `head`
        code = 0
    except OSError as e:  # --out in a folder that cannot be written
        print(f'error: cannot write {e.filename}: {e.strerror}. Pick another --out.', file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == '__main__':
    main()

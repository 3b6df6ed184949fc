"""Correctness tests for mpvg.py: the model of MPVG (Lee, Ham, Kim, AAAI 2025) and of the variants it builds on.

Every expected value here is an independent statement, never a number produced by mpvg.py and pasted back:

- parameter counts are the exact counts of the paper's models, derived from their official code (timm's DeiT,
  Compact-Transformers' `vit_7_4_32`, LaPE's one `pe_norm` per block); the paper's Tables 1-2 print them rounded
  (e.g. ViT-Lite-7/4: 3.740 / 3.744 / 3.742 / 3.743 M for vit / lape / pvg / mpvg);
- logits are recomputed by `reference_forward` below, a plain loop over layers written from the paper's
  Eqs. (1)-(11) and Fig. 3, with the layers of the official code, with F.layer_norm / F.linear / an explicit softmax, reading only the model's *weights*
  (its state dict), never calling the model's modules;
- timm's `deit_tiny_patch16_224` is an outside implementation of the `vit` preset;
- the MPVG inference identity (ours, not the paper's: under GAP the Last-LN PE term of Eq. (11) is an
  input-independent bias) is checked against a PVG model whose head bias we shift by hand.

Before any logits comparison every LayerNorm (LN_l, LN''_l, the Last LN and every PE norm LN'_l) gets its own
random weight and bias, so a LayerNorm that is shared, misplaced, skipped or fed the wrong input changes the
logits. `test_reference_has_teeth` proves that: deliberately wrong references (non-hierarchical chain, two PE
norms swapped, one PE norm shared by all layers, ...) disagree with the model.

Groups of tests (the numbers mark the sections below):
  1 parameter counts      2 reference forward + teeth     3 MPVG inference identity    4 gradients
  5 fused vs written-out attention   6 timm / LaPE checkpoints   7 PE chain once per forward
  8 import with torch only   9 bad input -> ValueError (before any module is built)   10 probe / correlation
  11 no_weight_decay

Run: python -m pytest -q tests/test_mpvg.py   (CPU, tiny models; about a minute on 2 cores)
"""
import ast
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mpvg  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# The facts from the paper and the official code, written down independently of mpvg.py
# ---------------------------------------------------------------------------------------------------------------

KNOBS = ('pool', 'pe_at_input', 'layerwise_from', 'hierarchical', 'last_ln_pe')

# Each preset is a value of the five orthogonal knobs (the README's table): where the PE enters in the paper's
# Fig. 3a-d (vit, lape, pvg, mpvg) and Fig. 5a (gap: GAP only).
PRESETS = {
    'vit':  dict(pool='cls', pe_at_input=True,  layerwise_from=None, hierarchical=True, last_ln_pe=None),
    'gap':  dict(pool='gap', pe_at_input=True,  layerwise_from=None, hierarchical=True, last_ln_pe=None),
    'lape': dict(pool='cls', pe_at_input=False, layerwise_from=0,    hierarchical=True, last_ln_pe=None),
    'pvg':  dict(pool='gap', pe_at_input=True,  layerwise_from=1,    hierarchical=True, last_ln_pe=None),
    'mpvg': dict(pool='gap', pe_at_input=True,  layerwise_from=1,    hierarchical=True, last_ln_pe=0),
}

# Block family and LayerNorm eps of each model: timm's DeiT (pre-norm, 1e-6); Compact-Transformers' ViT-Lite
# layer (x + attn(pre_norm(x)), then norm1 of the residual stream, then x + mlp(x); 1e-5).
FAMILY = {'vit_lite_7_4': 'cct', 'deit_tiny': 'prenorm', 'deit_small': 'prenorm', 'deit_base': 'prenorm'}
LN_EPS = {'cct': 1e-5, 'prenorm': 1e-6}

# Exact parameter counts (the paper's Tables 1-2 print them rounded: 3.740/3.744/3.742/3.743 M for ViT-Lite,
# 5.717/5.721/5.721/5.721 M for DeiT-Ti, 22.050/22.059/22.058/22.059 M for DeiT-S, 86.567/86.586/86.583/86.584 M
# for DeiT-B).
PARAM_COUNTS = {
    'vit_lite_7_4': {'vit': 3_740_004, 'lape': 3_743_588, 'pvg': 3_742_564, 'mpvg': 3_743_076},
    'deit_tiny':    {'vit': 5_717_416, 'lape': 5_722_024, 'pvg': 5_721_256, 'mpvg': 5_721_640},
    'deit_small':   {'vit': 22_050_664, 'lape': 22_059_880, 'pvg': 22_058_344, 'mpvg': 22_059_112},
    'deit_base':    {'vit': 86_567_656, 'lape': 86_586_088, 'pvg': 86_583_016, 'mpvg': 86_584_552},
}

# Tiny versions of one model per block family (2 CPU cores): every architecture field the reference needs is
# given here, so the reference never reads it from the model.
TINY = {
    'deit_tiny':    dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3),   # pre-norm block
    'vit_lite_7_4': dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=4),   # CCT layer
}
NAMES = list(TINY)

# The presets and the paper's ablations, each as (preset, knob overrides).  depth is 4: layers 0..3.
CASES = {
    'vit': ('vit', {}),
    'gap': ('gap', {}),
    'lape': ('lape', {}),
    'pvg': ('pvg', {}),
    'mpvg': ('mpvg', {}),
    'fig1_lape_with_gap': ('lape', dict(pool='gap')),                 # Fig. 1: layer-wise + GAP
    'gap_layerwise_from0': ('gap', dict(layerwise_from=0)),           # GAP + x+PE + PE LN in every layer
    'tab6_pe_ln_in_layer0': ('mpvg', dict(layerwise_from=0)),         # Table 6 "PE LN in layer 0 too"
    'tab6_non_hierarchical': ('mpvg', dict(hierarchical=False)),      # Table 6 "non-hierarchical"
    'lape_non_hierarchical': ('lape', dict(hierarchical=False)),
    'tab6_no_x_plus_pe': ('mpvg', dict(pe_at_input=False)),           # Table 6 "no x+PE"
    'tab5_last_ln_pe1': ('mpvg', dict(last_ln_pe=1)),                 # Table 5: pos_k at the Last LN
    'tab5_last_ln_pe2': ('mpvg', dict(last_ln_pe=2)),
    'tab5_last_ln_pe3': ('mpvg', dict(last_ln_pe=3)),                 # the last layer's PE
    'fig5b_gap_last_ln_pe_only': ('gap', dict(last_ln_pe=0)),         # Fig. 5b: no layer-wise PE
    'pvg_from2_last_ln_pe2': ('pvg', dict(layerwise_from=2, last_ln_pe=2)),
}

ATOL = RTOL = 1e-5


def knobs_of(case):
    """The knob values a case must produce: the preset's row of the table with the overrides applied."""
    preset, overrides = CASES[case]
    return {**PRESETS[preset], **overrides}


def randomize_(model, seed=0):
    """Give every parameter a distinct random value (in place) so that every weight matters for the logits.

    LayerNorm weights ~ 1 + 0.5 N(0,1), LayerNorm and Linear biases and the class token ~ 0.3 N(0,1),
    matrices ~ N(0, 1/fan_in). pos_embed keeps its initialisation, so the LayerNorm eps of the PE norms matters.
    Returns the names of the LayerNorm weights that were randomized.
    """
    g = torch.Generator().manual_seed(seed)
    norms = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == 'pos_embed':
                continue
            if re.search(r'(^|\.)(norm\d*|pe_norm)\.weight$', name):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
                norms.append(name)
            elif p.dim() == 1 or name == 'cls_token':
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return norms


def build(name, case_or_pe, seed=0, **extra):
    """A tiny model of `name` for a CASES key (or preset name), randomized, in eval mode."""
    preset, overrides = CASES[case_or_pe]
    model = mpvg.create_model(name, pe=preset, **TINY[name], **overrides, **extra)
    randomize_(model, seed)
    return model.eval()


def images(name, batch=2, seed=1):
    s = TINY[name]['img_size']
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(seed))


def expected_pe_norms(knobs, depth):
    """Names of the PE LayerNorm modules a model with these knobs must have (Eqs. (6)-(11), LaPE's layout)."""
    names = []
    if knobs['layerwise_from'] is not None:
        names += [f'blocks.{l}.pe_norm' for l in range(knobs['layerwise_from'], depth)]
    if knobs['last_ln_pe'] is not None:
        names.append('pe_norm')  # MPVG's separate Last-LN PE norm LN' (Eq. 11)
    return names


# ---------------------------------------------------------------------------------------------------------------
# The reference forward pass, from the paper's Eqs. (1)-(11) (numbers in the comments) and the official layers
# ---------------------------------------------------------------------------------------------------------------

def reference_forward(sd, x, *, family, num_heads, patch_size, depth, knobs, pe_norm_key=None):
    """Recompute the logits from the equations, using only the tensors of the state dict `sd`.

    family: 'prenorm' (DeiT, Eqs. 2-3) or 'cct' (Compact-Transformers' ViT-Lite layer).
    knobs:  the five PE knobs (PRESETS above).
    pe_norm_key: layer l -> state-dict prefix of the PE LayerNorm LN'_l (default 'blocks.<l>.pe_norm');
                 the negative checks pass a wrong mapping.
    Returns dict(logits, tokens=[LN_l(x_l)], pe=[PE added in layer l or None], last=LN(x_{L+1}), y).
    """
    eps = LN_EPS[family]
    pe_norm_key = pe_norm_key or (lambda l: f'blocks.{l}.pe_norm')

    def ln(t, prefix):                                          # LayerNorm over the feature dim D
        return F.layer_norm(t, t.shape[-1:], sd[prefix + '.weight'], sd[prefix + '.bias'], eps)

    def msa(h, b):                                              # multi-head self-attention, written out
        B, T, D = h.shape
        H, d = num_heads, D // num_heads
        qkv = F.linear(h, sd[b + 'attn.qkv.weight'], sd.get(b + 'attn.qkv.bias'))    # (B, T, 3D)
        q, k, v = qkv.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4)                 # 3 x (B, H, T, d)
        s = q @ k.transpose(-2, -1) / math.sqrt(d)                                  # (B, H, T, T)
        a = torch.exp(s - s.amax(-1, keepdim=True))
        a = a / a.sum(-1, keepdim=True)                                             # softmax over keys
        o = (a @ v).transpose(1, 2).reshape(B, T, D)                                # heads merged
        return F.linear(o, sd[b + 'attn.proj.weight'], sd[b + 'attn.proj.bias'])

    def mlp(h, b):                                              # fc1 -> exact GELU -> fc2
        h = F.gelu(F.linear(h, sd[b + 'mlp.fc1.weight'], sd[b + 'mlp.fc1.bias']))
        return F.linear(h, sd[b + 'mlp.fc2.weight'], sd[b + 'mlp.fc2.bias'])

    # patches p_1..p_N: a Conv2d with kernel = stride = patch size, flattened to (B, N, D)
    p = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=patch_size)
    p = p.flatten(2).transpose(1, 2)
    pos0 = sd['pos_embed']                                      # pos_0: (1, T, D)

    # Eq. (1)/(5): [x_cls; p_1..p_N]   or   Eq. (8): [p_1..p_N] (no class token under GAP)
    xl = torch.cat([sd['cls_token'].expand(len(x), -1, -1), p], 1) if knobs['pool'] == 'cls' else p
    if knobs['pe_at_input']:
        xl = xl + pos0                                          # Eq. (1)/(8): "x + PE"

    # The PE chain (input independent): Eq. (7)/(10) pos_l = LN'_l(pos_{l-1}), starting from pos_0;
    # non-hierarchical (Table 6): LN'_l(pos_0) in every layer.
    first = knobs['layerwise_from']
    pe, prev = [None] * depth, pos0
    for l in range(depth):
        if first is not None and l >= first:
            pe[l] = ln(prev if knobs['hierarchical'] else pos0, pe_norm_key(l))
            prev = pe[l]

    tokens = []
    for l in range(depth):
        b = f'blocks.{l}.'
        h = ln(xl, b + 'norm1')                                 # LN_l(x_l)
        tokens.append(h)
        if pe[l] is not None:
            h = h + pe[l]                                       # Eq. (6)/(9): LN_l(x_l) + LN'_l(pos)
        xl = xl + msa(h, b)                                     # Eq. (2); the PE never enters the residual
        if family == 'prenorm':
            xl = xl + mlp(ln(xl, b + 'norm2'), b)               # Eq. (3)
        else:                                                   # CCT layer (§3): the residual stream itself
            xl = ln(xl, b + 'norm2')                            # is normalized, then an MLP without LN
            xl = xl + mlp(xl, b)

    last = ln(xl, 'norm')                                       # Eq. (4): Last LN
    y = last
    if knobs['last_ln_pe'] == 0:
        y = y + ln(pos0, 'pe_norm')                             # Eq. (11): + LN'(pos_0), LN' on the RAW pos_0
    elif knobs['last_ln_pe'] is not None:
        y = y + ln(pe[knobs['last_ln_pe']], 'pe_norm')          # Table 5: + LN'(pos_k)
    feat = y[:, 0] if knobs['pool'] == 'cls' else y.mean(1)    # class token, or GAP (Eq. 11)
    logits = F.linear(feat, sd['head.weight'], sd['head.bias'])
    return dict(logits=logits, tokens=tokens, pe=pe, last=last, y=y)


def reference(model, name, x, knobs, **kw):
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    t = TINY[name]
    return reference_forward(sd, x, family=FAMILY[name], num_heads=t['num_heads'], patch_size=t['patch_size'],
                             depth=t['depth'], knobs=knobs, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Presets, structure, parameter counts (1)
# ---------------------------------------------------------------------------------------------------------------

def test_presets_are_the_paper_table():
    assert tuple(mpvg.PE_KNOBS) == KNOBS
    assert set(mpvg.PE_PRESETS) == set(PRESETS)
    for preset, knobs in PRESETS.items():
        got = {k: getattr(mpvg.PE_PRESETS[preset], k) for k in KNOBS}
        assert got == knobs, preset
    assert set(mpvg.MODELS) == set(PARAM_COUNTS)


@pytest.mark.parametrize('name', list(PARAM_COUNTS))
@pytest.mark.parametrize('pe', ['vit', 'lape', 'pvg', 'mpvg'])
def test_parameter_count_is_exactly_the_paper_table(name, pe, monkeypatch):
    # only shapes matter here: make torch.nn.init a no-op so that building DeiT-B takes milliseconds, not seconds
    for f in [f for f in dir(torch.nn.init) if f.endswith('_') and not f.startswith('_')]:
        monkeypatch.setattr(torch.nn.init, f, lambda tensor, *args, **kwargs: tensor)
    model = mpvg.create_model(name, pe=pe)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name][pe]


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('case', list(CASES))
def test_structure_follows_knobs(name, case):
    """pe_norm only where a PE is normalized, class token only with 'cls', pos_embed has T rows."""
    knobs, depth = knobs_of(case), TINY[name]['depth']
    model = mpvg.create_model(name, pe=CASES[case][0], **TINY[name], **CASES[case][1])
    assert {k: getattr(model.cfg.pe, k) for k in KNOBS} == knobs
    params = dict(model.named_parameters())
    pe_norms = {n.rsplit('.', 1)[0] for n in params if re.search(r'(^|\.)pe_norm\.', n)}
    assert pe_norms == set(expected_pe_norms(knobs, depth))
    assert ('cls_token' in params) == (knobs['pool'] == 'cls')
    n = (TINY[name]['img_size'] // TINY[name]['patch_size']) ** 2
    T = n + 1 if knobs['pool'] == 'cls' else n
    assert tuple(params['pos_embed'].shape) == (1, T, TINY[name]['embed_dim'])


def test_initialisation_follows_paper():
    """The official inits: DeiT (timm) PE std 0.02; ViT-Lite (Compact-Transformers) class token zeros, PE std 0.2, LayerNorms 1/0, Linear biases 0."""
    torch.manual_seed(0)
    deit = mpvg.create_model('deit_tiny', pe='vit')
    lite = mpvg.create_model('vit_lite_7_4', pe='vit')
    assert deit.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert lite.pos_embed.std().item() == pytest.approx(0.2, rel=0.1)
    assert torch.count_nonzero(lite.cls_token) == 0
    assert deit.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    for model in (deit, lite):
        for n, p in model.named_parameters():
            if re.search(r'(^|\.)(norm\d*|pe_norm)\.weight$', n):
                assert torch.all(p == 1), n
            elif n.endswith('.bias') and not n.startswith('patch_embed'):
                assert torch.all(p == 0), n


# ---------------------------------------------------------------------------------------------------------------
# The forward pass equals the equations (2)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('case', list(CASES))
def test_forward_matches_reference(name, case):
    model, x, knobs = build(name, case), images(name), knobs_of(case)
    ref = reference(model, name, x, knobs)
    with torch.no_grad():
        logits = model(x)
        y = model.forward_features(x)
        pes = model.layer_pes()
    torch.testing.assert_close(logits, ref['logits'], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(y, ref['y'], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(model.forward_head(y), logits, atol=ATOL, rtol=RTOL)
    assert len(pes) == TINY[name]['depth']
    for l, (got, want) in enumerate(zip(pes, ref['pe'])):
        if want is None:
            assert got is None, f'layer {l} adds no PE'
        else:
            assert got is not None and got.shape[0] == 1, f'layer {l}'
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_pe_may_be_a_peconfig_instance():
    knobs = dict(pool='gap', pe_at_input=False, layerwise_from=2, hierarchical=False, last_ln_pe=3)
    model = mpvg.create_model('deit_tiny', pe=mpvg.PEConfig(**knobs), **TINY['deit_tiny'])
    assert {k: getattr(model.cfg.pe, k) for k in KNOBS} == knobs
    randomize_(model)
    x = images('deit_tiny')
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(model, 'deit_tiny', x, knobs)['logits'],
                                   atol=ATOL, rtol=RTOL)


def _differs(a, b, margin=1e-3):
    return (a - b).abs().max().item() > margin


@pytest.mark.parametrize('name', NAMES)
def test_reference_has_teeth(name):
    """The comparison above can fail: each deliberately wrong variant of the equations gives other logits."""
    x = images(name)
    # a model with layer-wise PE in layers 1..3 and the Last-LN PE (MPVG)
    model, knobs = build(name, 'mpvg'), knobs_of('mpvg')
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, reference(model, name, x, knobs)['logits'], atol=ATOL, rtol=RTOL)
    wrong = {
        'non-hierarchical chain': reference(model, name, x, {**knobs, 'hierarchical': False}),
        'pe_norm of layers 1 and 2 swapped': reference(
            model, name, x, knobs, pe_norm_key=lambda l: f'blocks.{ {1: 2, 2: 1}.get(l, l) }.pe_norm'),
        'one pe_norm shared by all layers': reference(
            model, name, x, knobs, pe_norm_key=lambda l: 'blocks.1.pe_norm'),
        'Last-LN PE from the end of the chain': reference(model, name, x, {**knobs, 'last_ln_pe': 3}),
        'no Last-LN PE (PVG)': reference(model, name, x, {**knobs, 'last_ln_pe': None}),
        'no x+PE': reference(model, name, x, {**knobs, 'pe_at_input': False}),
        'layer-wise PE from layer 2': reference(model, name, x, {**knobs, 'layerwise_from': 2}),
        'other block family': reference_forward(
            {k: v.detach() for k, v in model.state_dict().items()}, x,
            family='cct' if FAMILY[name] == 'prenorm' else 'prenorm', num_heads=TINY[name]['num_heads'],
            patch_size=TINY[name]['patch_size'], depth=TINY[name]['depth'], knobs=knobs),
    }
    for what, ref in wrong.items():
        assert _differs(logits, ref['logits']), f'the test cannot see a model with {what}'
    # the same for LaPE with a class token: the chain is only visible through the per-layer norms
    model, knobs = build(name, 'lape'), knobs_of('lape')
    with torch.no_grad():
        logits = model(x)
    assert _differs(logits, reference(model, name, x, {**knobs, 'hierarchical': False})['logits'])
    assert _differs(logits, reference(model, name, x, knobs,
                                      pe_norm_key=lambda l: f'blocks.{ {0: 1, 1: 0}.get(l, l) }.pe_norm')['logits'])


# ---------------------------------------------------------------------------------------------------------------
# MPVG at inference = PVG with a shifted head bias (3)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('overrides', [{}, dict(hierarchical=False), dict(layerwise_from=0)], ids=str)
def test_mpvg_inference_identity(name, overrides):
    mpvg_model = mpvg.create_model(name, pe='mpvg', **TINY[name], **overrides)
    randomize_(mpvg_model)
    mpvg_model.eval()
    sd = mpvg_model.state_dict()
    pvg_model = mpvg.create_model(name, pe='pvg', **TINY[name], **overrides).eval()
    pvg_model.load_state_dict({k: v for k, v in sd.items() if not k.startswith('pe_norm.')}, strict=True)
    # Eq. (11): y = LN(x) + LN'(pos_0); under GAP mean_tokens(LN'(pos_0)) is a constant vector c,
    # so head(mean(y)) = W mean(LN(x)) + (b + W c).
    c = F.layer_norm(sd['pos_embed'], sd['pos_embed'].shape[-1:], sd['pe_norm.weight'], sd['pe_norm.bias'],
                     LN_EPS[FAMILY[name]]).mean(dim=(0, 1))
    with torch.no_grad():
        pvg_model.head.bias += sd['head.weight'] @ c
        x = images(name, batch=3)
        a, b = mpvg_model(x), pvg_model(x)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert _differs(sd['head.weight'] @ c, torch.zeros_like(c[:1])), 'the shift is not trivially zero'


# ---------------------------------------------------------------------------------------------------------------
# Every parameter gets a gradient (4)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('case', list(CASES))
def test_every_parameter_gets_a_finite_gradient(name, case):
    torch.manual_seed(0)
    x = images(name)
    for drop_path_rate in (0.1, 0.0):
        model = mpvg.create_model(name, pe=CASES[case][0], **TINY[name], **CASES[case][1],
                                  drop_path_rate=drop_path_rate).train()
        logits = model(x)
        (logits * torch.randn_like(logits)).sum().backward()
        for n, p in model.named_parameters():
            assert p.grad is not None, f'{n} gets no gradient (DDP would need find_unused_parameters)'
            assert torch.isfinite(p.grad).all(), n
            if drop_path_rate == 0.0:   # no block can be dropped: every parameter must influence the loss
                assert p.grad.abs().sum() > 0, f'{n} has an all-zero gradient'


def test_stochastic_depth_drops_whole_samples_and_keeps_the_expectation():
    """The residual with drop-path (Huang et al. 2016, timm's drop_path): in training each sample's branch is
    either dropped (output x) or kept and scaled by 1/(1-p); in eval the output is x + branch."""
    p, B = 0.3, 4000
    res = mpvg.DropPath(p)
    torch.manual_seed(0)
    x, branch = torch.randn(B, 3, 5), torch.randn(B, 3, 5)
    out = res.train()(x, branch)
    dropped = torch.isclose(out, x, rtol=0, atol=1e-6).flatten(1).all(1)
    kept = torch.isclose(out, x + branch / (1 - p), rtol=1e-6, atol=1e-6).flatten(1).all(1)
    assert bool((dropped ^ kept).all()), 'each sample is either wholly dropped or wholly kept'
    assert abs(dropped.float().mean().item() - p) < 0.03            # ~4.6 sigma at B=4000
    assert torch.equal(res.eval()(x, branch), x + branch)
    assert torch.equal(mpvg.DropPath(0.0).train()(x, branch), x + branch)
    # the gradient reaches the branch only through the kept samples, scaled
    branch.requires_grad_(True)
    res.train()(x, branch).sum().backward()
    g = branch.grad.flatten(1)
    zero = (g == 0).all(1)
    assert abs(zero.float().mean().item() - p) < 0.03
    assert torch.allclose(g[~zero], torch.full_like(g[~zero], 1 / (1 - p)))


# ---------------------------------------------------------------------------------------------------------------
# Fused attention = the written-out softmax(QK^T / sqrt(d)) V (5)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('case', ['vit', 'lape', 'mpvg'])
def test_fused_and_written_out_attention_agree(name, case, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*a, **k):
        calls.append(1)
        return sdpa(*a, **k)
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', counting_sdpa)

    depth, x = TINY[name]['depth'], images(name)
    fused = build(name, case, fused_attn=True)
    attns = [m for n, m in fused.named_modules() if n.endswith('.attn')]
    assert len(attns) == depth and all(m.fused_attn is True for m in attns)
    with torch.no_grad():
        calls.clear()
        a = fused(x)
        assert len(calls) == depth, 'fused_attn=True must use F.scaled_dot_product_attention'
        for m in attns:
            m.fused_attn = False                    # toggle the attribute on the same weights
        calls.clear()
        b = fused(x)
        assert len(calls) == 0, 'fused_attn=False must use the written-out attention'
        written = mpvg.create_model(name, pe=CASES[case][0], **TINY[name], **CASES[case][1], fused_attn=False)
        written.load_state_dict(fused.state_dict(), strict=True)
        c = written.eval()(x)
        assert len(calls) == 0
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(c, b, atol=0, rtol=0)
    torch.testing.assert_close(b, reference(fused, name, x, knobs_of(case))['logits'], atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------------------------
# timm and LaPE checkpoints (6)
# ---------------------------------------------------------------------------------------------------------------

def _timm_deit_tiny(**kw):
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    ref = timm.create_model('deit_tiny_patch16_224', pretrained=False, **kw)
    randomize_(ref, seed=3)
    return ref.eval()


def test_timm_deit_tiny_224_state_dict_loads_strict_and_gives_same_logits():
    ref = _timm_deit_tiny()
    model = mpvg.create_model('deit_tiny', pe='vit').eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(x), model(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize('pe', ['vit', 'lape'])
def test_timm_small_config_and_lape_official_checkpoint_layout(pe):
    """timm deit_tiny at 32²/patch 8/depth 2; for 'lape' the key layout of LaPE's official DeiT code:
    {'model': timm keys + blocks.<i>.pe_norm.{weight,bias}}, checked against the reference forward."""
    kw = dict(img_size=32, patch_size=8, depth=2)
    ref = _timm_deit_tiny(**kw)
    sd = dict(ref.state_dict())
    g = torch.Generator().manual_seed(5)
    if pe == 'lape':
        for i in range(kw['depth']):
            sd[f'blocks.{i}.pe_norm.weight'] = 1 + 0.5 * torch.randn(192, generator=g)
            sd[f'blocks.{i}.pe_norm.bias'] = 0.3 * torch.randn(192, generator=g)
    checkpoint = {'model': sd}
    model = mpvg.create_model('deit_tiny', pe=pe, **kw).eval()
    model.load_state_dict(checkpoint['model'], strict=True)
    x = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        got = model(x)
        if pe == 'vit':
            torch.testing.assert_close(got, ref(x), atol=ATOL, rtol=RTOL)
    want = reference_forward(sd, x, family='prenorm', num_heads=3, patch_size=8, depth=2, knobs=PRESETS[pe])
    torch.testing.assert_close(got, want['logits'], atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------------------------
# The PE chain runs once per forward on the (1, T, D) table (7)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('case', ['lape', 'pvg', 'mpvg', 'tab6_non_hierarchical', 'tab5_last_ln_pe2',
                                  'fig5b_gap_last_ln_pe_only'])
def test_pe_chain_computed_once_per_forward_not_per_sample(name, case):
    model = build(name, case)
    pe_norms = dict(model.named_modules())
    expected = expected_pe_norms(knobs_of(case), TINY[name]['depth'])
    assert expected and all(n in pe_norms for n in expected)
    seen = {n: [] for n in expected}
    for n in expected:
        pe_norms[n].register_forward_hook(lambda m, inp, out, n=n: seen[n].append(tuple(inp[0].shape)))
    with torch.no_grad():
        model(images(name, batch=4))
    T, D = model.pos_embed.shape[1:]
    for n, shapes in seen.items():
        assert shapes == [(1, T, D)], f'{n} was called with inputs {shapes}; expected once on the (1, T, D) table'


# ---------------------------------------------------------------------------------------------------------------
# import mpvg needs torch only (8)
# ---------------------------------------------------------------------------------------------------------------

def test_import_needs_only_torch():
    code = textwrap.dedent('''
        import importlib.abc, sys
        BLOCKED = {'numpy', 'timm', 'torchvision', 'tqdm'}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.partition('.')[0] in BLOCKED:
                    raise ModuleNotFoundError('blocked by the test: ' + name, name=name)
        sys.meta_path.insert(0, Block())
        try:
            import tqdm
            raise SystemExit('the import blocker does not work')
        except ImportError:
            pass
        import mpvg
        model = mpvg.create_model('deit_tiny', pe='mpvg', img_size=32, patch_size=8, depth=2)
        assert not BLOCKED & {m.partition('.')[0] for m in sys.modules}
        print('ok')
    ''')
    r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith('ok'), r.stdout + r.stderr


def test_module_imports_only_torch_and_the_standard_library():
    tree = ast.parse((REPO / 'mpvg.py').read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.partition('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.partition('.')[0])
    assert imported - set(sys.stdlib_module_names) - {'torch', '__future__'} == set()


# ---------------------------------------------------------------------------------------------------------------
# Bad input -> ValueError naming the bad value and the valid ones (9)
# ---------------------------------------------------------------------------------------------------------------

D4 = TINY['deit_tiny']   # depth 4: layers 0..3
BAD = {
    'unknown model':            (('deit_huge', 'mpvg'), {}, ['deit_huge', 'deit_tiny']),
    'unknown preset':           (('deit_tiny', 'lapee'), D4, ['lapee', 'mpvg']),
    'unknown override':         (('deit_tiny', 'mpvg'), {**D4, 'not_a_knob': 1}, ['not_a_knob', 'depth']),
    'unknown pool':             (('deit_tiny', 'mpvg'), {**D4, 'pool': 'avg'}, ['avg', 'gap']),
    'non-hier. w/o layer-wise': (('deit_tiny', 'vit'), {**D4, 'hierarchical': False},
                                 ['hierarchical', 'layerwise_from']),
    'layerwise_from >= depth':  (('deit_tiny', 'pvg'), {**D4, 'layerwise_from': 7}, ['7', 'layerwise_from']),
    'layerwise_from < 0':       (('deit_tiny', 'pvg'), {**D4, 'layerwise_from': -1}, ['-1', 'layerwise_from']),
    'last_ln_pe >= depth':      (('deit_tiny', 'mpvg'), {**D4, 'last_ln_pe': 9}, ['9', 'last_ln_pe']),
    'last_ln_pe < 0':           (('deit_tiny', 'mpvg'), {**D4, 'last_ln_pe': -2}, ['-2', 'last_ln_pe']),
    'last_ln_pe below first':   (('deit_tiny', 'pvg'), {**D4, 'layerwise_from': 3, 'last_ln_pe': 2},
                                 ['last_ln_pe', '2', '3']),   # 3: the only layer that adds a PE
    'last_ln_pe k w/o layer-wise': (('deit_tiny', 'gap'), {**D4, 'last_ln_pe': 2}, ['last_ln_pe', '2', '0']),
}


@pytest.mark.parametrize('what', list(BAD))
def test_bad_input_raises_value_error_naming_it(what):
    args, kwargs, must_appear = BAD[what]
    with pytest.raises(ValueError) as err:
        mpvg.create_model(*args, **kwargs)
    for s in must_appear:
        assert s in str(err.value), f'{s!r} missing from: {err.value}'


# Impossible values of every ViTConfig field (and the two integer PE knobs), one at a time on the tiny DeiT.
# The first five used to fail inside torch, at the first forward, or not at all.
NAN, INF = float('nan'), float('inf')
BAD_VALUES = [
    ('num_heads', 0), ('patch_size', 0), ('drop_path_rate', 1.5), ('norm_eps', -1), ('qkv_bias', 'no'),
    ('img_size', 0), ('img_size', -32), ('img_size', 32.0), ('img_size', True),
    ('patch_size', -8), ('patch_size', 8.0), ('patch_size', None),
    ('in_chans', 0), ('in_chans', '3'),
    ('num_classes', -1), ('num_classes', -10), ('num_classes', False), ('num_classes', 10.0),
    ('embed_dim', 0), ('embed_dim', 48.5), ('embed_dim', True),
    ('depth', 0), ('depth', -1), ('depth', True), ('depth', 4.0), ('depth', None),
    ('num_heads', -3), ('num_heads', True), ('num_heads', 3.0),
    ('mlp_ratio', 0), ('mlp_ratio', -4.0), ('mlp_ratio', NAN), ('mlp_ratio', INF), ('mlp_ratio', '4'),
    ('mlp_ratio', True),
    ('qkv_bias', 0), ('qkv_bias', 1), ('qkv_bias', None),
    ('fused_attn', 'yes'), ('fused_attn', 1),
    ('norm_eps', 0), ('norm_eps', 0.0), ('norm_eps', NAN), ('norm_eps', INF), ('norm_eps', '1e-6'),
    ('family', 'vit'), ('family', 'DeiT'), ('family', None),
    ('drop_path_rate', 1), ('drop_path_rate', 1.0), ('drop_path_rate', -0.1), ('drop_path_rate', NAN),
    ('drop_path_rate', True),
    ('attn_drop_rate', 1.0), ('attn_drop_rate', -0.5), ('attn_drop_rate', INF), ('attn_drop_rate', '0.1'),
    ('layerwise_from', True), ('last_ln_pe', True), ('last_ln_pe', False),
]
# Values that are each fine alone but impossible together: (overrides, what the message must name).
BAD_COMBOS = {
    'image not tiled by patches': (dict(img_size=30, patch_size=8), ['img_size=30', 'patch_size=8']),
    'patch larger than image':    (dict(img_size=8, patch_size=16), ['img_size=8', 'patch_size=16']),
    'heads do not divide dim':    (dict(embed_dim=48, num_heads=5), ['embed_dim=48', 'num_heads=5']),
    'MLP without hidden units':   (dict(embed_dim=48, mlp_ratio=0.02), ['mlp_ratio=0.02', 'embed_dim=48']),
}


@pytest.fixture
def no_modules(monkeypatch):
    """Any nn.Module (so any parameter) built during the test fails it."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f'{type(self).__name__} was built: checking a configuration must allocate nothing')
    monkeypatch.setattr(torch.nn.Module, '__init__', refuse)


def test_no_modules_fixture_has_teeth(no_modules):
    with pytest.raises(AssertionError, match='was built'):
        mpvg.create_model('deit_tiny', pe='mpvg', **D4)


@pytest.mark.parametrize('field, value', BAD_VALUES, ids=[f'{f}={v!r}' for f, v in BAD_VALUES])
@pytest.mark.parametrize('entry', ['make_config', 'create_model'])
def test_impossible_value_raises_value_error_naming_field_and_value(field, value, entry, no_modules):
    # no_modules: create_model must reject the value before it builds the first module
    with pytest.raises(ValueError) as err:
        getattr(mpvg, entry)('deit_tiny', pe='mpvg', **{**D4, field: value})
    assert f'{field}={value!r}' in str(err.value), str(err.value)
    if field not in KNOBS:
        assert 'must be' in str(err.value), f'the message does not say what is valid: {err.value}'


@pytest.mark.parametrize('what', list(BAD_COMBOS))
def test_impossible_combination_raises_value_error_naming_both(what, no_modules):
    overrides, must_appear = BAD_COMBOS[what]
    with pytest.raises(ValueError) as err:
        mpvg.make_config('deit_tiny', pe='mpvg', **{**D4, **overrides})
    for s in must_appear + ['valid']:
        assert s in str(err.value), f'{s!r} missing from: {err.value}'


def test_several_bad_values_are_reported_together():
    with pytest.raises(ValueError) as err:
        mpvg.make_config('deit_tiny', pe='pvg', **{**D4, 'num_heads': 0, 'norm_eps': NAN, 'qkv_bias': 'no',
                                                    'layerwise_from': 9, 'img_size': 30})
    for s in ['num_heads=0', 'norm_eps=nan', "qkv_bias='no'", 'layerwise_from=9', 'img_size=30']:
        assert s in str(err.value), f'{s!r} missing from: {err.value}'


@pytest.mark.parametrize('field, value', [('num_heads', 0), ('family', 'vit'), ('drop_path_rate', 1.0)])
def test_vision_transformer_checks_a_config_built_by_hand(field, value):
    cfg = mpvg.ViTConfig(**{**D4, field: value})
    with pytest.raises(ValueError, match=re.escape(f'{field}={value!r}')):
        mpvg.VisionTransformer(cfg)


@pytest.mark.parametrize('what', list(BAD))
def test_make_config_rejects_what_create_model_rejects_without_building(what, no_modules):
    args, kwargs, must_appear = BAD[what]
    with pytest.raises(ValueError) as err:
        mpvg.make_config(*args, **kwargs)
    for s in must_appear:
        assert s in str(err.value), f'{s!r} missing from: {err.value}'


# The smallest and largest values that can be built (on top of the tiny DeiT, D4), each with its PE preset.
EDGE_VALUES = {
    'one patch per image':        ('mpvg', dict(img_size=8, patch_size=8)),
    'one-pixel patches':          ('mpvg', dict(img_size=4, patch_size=1)),
    'one input channel':          ('mpvg', dict(in_chans=1)),
    'one class':                  ('mpvg', dict(num_classes=1)),
    'one dim per head':           ('mpvg', dict(embed_dim=3, num_heads=3)),
    'one layer':                  ('gap', dict(depth=1)),
    'one layer with layer-wise PE': ('mpvg', dict(depth=1, layerwise_from=0)),
    'one hidden unit in the MLP': ('mpvg', dict(embed_dim=48, mlp_ratio=0.025)),
    'integer mlp_ratio':          ('mpvg', dict(mlp_ratio=2)),
    'rates 0':                    ('mpvg', dict(drop_path_rate=0, attn_drop_rate=0.0)),
    'rates just below 1':         ('mpvg', dict(drop_path_rate=0.99, attn_drop_rate=0.99)),
    'tiny and integer eps':       ('lape', dict(norm_eps=1e-12)),
    'eps 1 (an int)':             ('lape', dict(norm_eps=1)),
    'no qkv bias, written out':   ('vit', dict(qkv_bias=False, fused_attn=False)),
    'CCT layer at DeiT sizes':    ('pvg', dict(family='cct')),
}


@pytest.mark.parametrize('what', list(EDGE_VALUES))
def test_valid_edge_values_are_accepted_and_run(what):
    pe, overrides = EDGE_VALUES[what]
    kw = {**D4, **overrides}
    cfg = mpvg.make_config('deit_tiny', pe=pe, **kw)
    assert {k: getattr(cfg.pe if k in KNOBS else cfg, k) for k in overrides} == overrides
    torch.manual_seed(0)
    model = mpvg.VisionTransformer(cfg).train()
    logits = model(torch.randn(2, kw.get('in_chans', 3), kw['img_size'], kw['img_size']))
    assert logits.shape == (2, kw.get('num_classes', 1000)) and torch.isfinite(logits).all()


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('case', ['vit', 'lape', 'mpvg', 'tab5_last_ln_pe2', 'fig5b_gap_last_ln_pe_only'])
def test_make_config_then_vision_transformer_is_create_model(name, case):
    preset, overrides = CASES[case]
    cfg = mpvg.make_config(name, pe=preset, num_classes=7, **TINY[name], **overrides)
    assert isinstance(cfg, mpvg.ViTConfig) and cfg.num_classes == 7
    torch.manual_seed(0)
    a = mpvg.VisionTransformer(cfg)
    torch.manual_seed(0)
    b = mpvg.create_model(name, pe=preset, num_classes=7, **TINY[name], **overrides)
    assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert [(k, v.shape) for k, v in sa.items()] == [(k, v.shape) for k, v in sb.items()]
    assert all(torch.equal(sa[k], sb[k]) for k in sa), 'same seed, same config: same initial weights'


def test_make_config_of_deit_base_allocates_nothing(no_modules):
    # timm's deit_base_patch16_224: DeiT-B is patch 16 at 224², D 768, depth 12, 12 heads, MLP ratio 4, LayerNorm eps 1e-6
    cfg = mpvg.make_config('deit_base', pe='mpvg')
    assert isinstance(cfg, mpvg.ViTConfig)
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps) \
        == (224, 16, 768, 12, 12, 4.0, 1e-6)
    assert {k: getattr(cfg.pe, k) for k in KNOBS} == PRESETS['mpvg']
    # the presets and model table are not changed by a call with overrides
    mpvg.make_config('deit_base', pe='mpvg', depth=2, layerwise_from=0)
    assert mpvg.make_config('deit_base', pe='mpvg') == cfg


# ---------------------------------------------------------------------------------------------------------------
# probe and pe_token_correlation (10)
# ---------------------------------------------------------------------------------------------------------------

def pearson(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).sum() / (a.norm() * b.norm())).item()


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('case', ['vit', 'lape', 'pvg', 'mpvg', 'tab5_last_ln_pe2'])
def test_probe_matches_reference_and_leaves_forward_alone(name, case):
    model, x, knobs = build(name, case), images(name, batch=3), knobs_of(case)
    ref = reference(model, name, x, knobs)
    with torch.no_grad():
        before = model(x)
        out = mpvg.probe(model, x)
        after = model(x)
    assert torch.equal(before, after), 'probe changed what forward returns'
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()), 'probe left hooks'
    torch.testing.assert_close(out['logits'], before, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out['logits'], ref['logits'], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out['last'], ref['last'], atol=ATOL, rtol=RTOL)
    assert len(out['tokens']) == len(out['pe']) == TINY[name]['depth']
    for l in range(TINY[name]['depth']):
        torch.testing.assert_close(out['tokens'][l], ref['tokens'][l], atol=ATOL, rtol=RTOL)
        if ref['pe'][l] is None:
            assert out['pe'][l] is None
        else:
            torch.testing.assert_close(out['pe'][l], ref['pe'][l], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('case', ['vit', 'lape', 'mpvg', 'tab6_non_hierarchical'])
def test_pe_token_correlation_is_pearson_of_batch_mean_tokens_and_pe(name, case):
    model, x, knobs = build(name, case), images(name, batch=3), knobs_of(case)
    ref = reference(model, name, x, knobs)
    with torch.no_grad():
        before = model(x)
        corr = mpvg.pe_token_correlation(model, x)
        assert torch.equal(before, model(x))
    assert len(corr) == TINY[name]['depth']
    for l, c in enumerate(corr):
        if ref['pe'][l] is None:
            assert c is None, f'layer {l} adds no PE'
        else:
            assert isinstance(c, float) and -1 <= c <= 1
            assert c == pytest.approx(pearson(ref['tokens'][l].mean(0), ref['pe'][l]), abs=1e-5), f'layer {l}'


def split_by_hand(M):
    """(T, D) map -> (per-channel part, position-dependent part), from the definition: loops over the channels."""
    T, D = M.shape
    per_channel = torch.empty(T, D, dtype=torch.float64)
    for d in range(D):
        per_channel[:, d] = sum(float(M[t, d]) for t in range(T)) / T    # channel d's mean over the tokens, every row
    return per_channel, M.double() - per_channel


def sum_of_squares(M, about):
    return float(((M - about) ** 2).sum())


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('case', ['lape', 'fig1_lape_with_gap', 'mpvg', 'tab6_non_hierarchical'])
def test_pe_token_correlation_parts_split_the_correlation_by_hand(name, case):
    model, x, knobs = build(name, case), images(name, batch=3), knobs_of(case)
    ref = reference(model, name, x, knobs)
    T, D = ref['tokens'][0].shape[1:]
    with torch.no_grad():
        before = model(x)
        parts = mpvg.pe_token_correlation_parts(model, x)
        assert torch.equal(before, model(x))
        corr = mpvg.pe_token_correlation(model, x)
    assert len(parts) == TINY[name]['depth']
    for l, got in enumerate(parts):
        if ref['pe'][l] is None:
            assert got is None, f'layer {l} adds no PE'
            continue
        A, B = ref['tokens'][l].mean(0).reshape(T, D), ref['pe'][l].reshape(T, D)
        A_ch, A_pos = split_by_hand(A)
        B_ch, B_pos = split_by_hand(B)
        share_A = sum_of_squares(A_ch, float(A.double().mean())) / sum_of_squares(A.double(), float(A.double().mean()))
        share_B = sum_of_squares(B_ch, float(B.double().mean())) / sum_of_squares(B.double(), float(B.double().mean()))
        expected = {'corr': pearson(A, B), 'corr_channel': pearson(A_ch, B_ch), 'corr_position': pearson(A_pos, B_pos),
                    'share_channel_tokens': share_A, 'share_channel_pe': share_B}
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-5), f'layer {l}: {key}'
        assert got['corr'] == corr[l], 'corr must be pe_token_correlation\'s value'
        # the parts are non-trivial here (random LayerNorm biases give the PE a per-channel part) ...
        assert 0.01 < share_A < 0.99 and 0.01 < share_B < 0.99, (share_A, share_B)
        # ... and they add up: the correlation is the share-weighted sum of the two parts' correlations
        s_A, s_B = got['share_channel_tokens'], got['share_channel_pe']
        recombined = (got['corr_channel'] * math.sqrt(s_A * s_B)
                      + got['corr_position'] * math.sqrt((1 - s_A) * (1 - s_B)))
        assert got['corr'] == pytest.approx(recombined, abs=1e-9), f'layer {l}'


# ---------------------------------------------------------------------------------------------------------------
# no_weight_decay (11)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('pe', list(PRESETS))
def test_no_weight_decay_names_are_parameters(name, pe):
    model = mpvg.create_model(name, pe=pe, **TINY[name])
    names = set(model.no_weight_decay())
    assert names <= dict(model.named_parameters()).keys()
    assert names == ({'pos_embed', 'cls_token'} if PRESETS[pe]['pool'] == 'cls' else {'pos_embed'})

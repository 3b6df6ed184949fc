"""mpvg.py as a backbone, with timm's conventions, for all five PE variants.

- `num_classes=0` (pooled features, `num_features` wide), `reset_classifier`, `forward_head(..., pre_logits=True)`;
- `forward_intermediates`: against timm's VisionTransformer for `pe='vit'`, against the reference forward of
  tests/test_mpvg.py (written from the paper's equations) for every variant;
- `checkpoint_filter_fn`: a timm / official DeiT state dict into every variant (missing_keys: exactly the PE
  LayerNorms), and a checkpoint of another img_size, its position embedding resampled as timm's
  `resample_abs_pos_embed` does, checked against timm itself (DeiT) and that function (ViT-Lite, no timm model).

The expected values come from timm, from the reference forward, or from the definitions written out here.
Run: python -m pytest -q tests/test_backbone.py   (CPU; full-size DeiT-Ti where the issue names its shapes)
"""
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mpvg  # noqa: E402
from test_mpvg import (ATOL, NAMES, PARAM_COUNTS, PRESETS, RTOL, TINY, _timm_deit_tiny,  # noqa: E402
                       build, expected_pe_norms, images, knobs_of, randomize_, reference)

timm = pytest.importorskip('timm')
from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.models.vision_transformer import checkpoint_filter_fn as timm_checkpoint_filter_fn  # noqa: E402

D_TI, DEPTH_TI, GRID_TI = 192, 12, 14        # DeiT-Ti: width 192, 12 layers, 224 / 16 = 14 patches a side
HEAD_1000 = D_TI * 1000 + 1000               # the 1000-class head's weight and bias


def pe_norm_keys(pe, depth=DEPTH_TI):
    return {f'{m}.{t}' for m in expected_pe_norms(PRESETS[pe], depth) for t in ('weight', 'bias')}


def deit_images(batch=2, size=224, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# num_classes=0, reset_classifier, forward_intermediates on DeiT-Ti, for every variant
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('pe', list(PRESETS))
def test_deit_tiny_backbone_shapes_in_every_variant(pe):
    torch.manual_seed(0)
    full = mpvg.create_model('deit_tiny', pe=pe).eval()
    randomize_(full)
    backbone = mpvg.create_model('deit_tiny', pe=pe, num_classes=0).eval()
    assert backbone.num_features == D_TI and backbone.num_classes == 0
    assert not any(n.startswith('head.') for n, _ in backbone.named_parameters())
    # the parameter table (vit/lape/pvg/mpvg); gap is vit without the class token and its PE row
    count = PARAM_COUNTS['deit_tiny'].get(pe, PARAM_COUNTS['deit_tiny']['vit'] - 2 * D_TI)
    assert sum(p.numel() for p in full.parameters()) == count
    assert sum(p.numel() for p in backbone.parameters()) == count - HEAD_1000
    missing, unexpected = backbone.load_state_dict(mpvg.checkpoint_filter_fn(full.state_dict(), backbone),
                                                   strict=False)
    assert missing == [] and unexpected == [], 'the 1000-class head is dropped, everything else placed'

    x = deit_images()
    with torch.no_grad():
        feats = backbone(x)
        assert feats.shape == (2, D_TI)
        assert torch.equal(feats, full.forward_head(full.forward_features(x), pre_logits=True))
        torch.testing.assert_close(full.head(feats), full(x), atol=ATOL, rtol=RTOL)
        maps = backbone.forward_intermediates(x, intermediates_only=True)
        assert len(maps) == DEPTH_TI and all(m.shape == (2, D_TI, GRID_TI, GRID_TI) for m in maps)

    cfg = backbone.cfg
    backbone.reset_classifier(7)
    assert backbone.num_classes == 7 and cfg.num_classes == 0, 'the config is replaced, not changed in place'
    assert isinstance(backbone.head, torch.nn.Linear) and not backbone.head.training
    assert torch.all(backbone.head.bias == 0) and backbone.head.weight.std().item() == pytest.approx(0.02, rel=0.2)
    with torch.no_grad():
        assert backbone(x).shape == (2, 7)
    backbone.reset_classifier(0)
    assert isinstance(backbone.head, torch.nn.Identity)
    with torch.no_grad():
        assert torch.equal(backbone(x), feats)


def test_reset_classifier_keeps_dtype_and_mode_and_checks_its_argument():
    model = mpvg.create_model('deit_tiny', pe='mpvg', **TINY['deit_tiny']).double().train()
    model.reset_classifier(5)
    assert model.head.weight.dtype == torch.float64 and model.head.training
    assert model(images('deit_tiny').double()).shape == (2, 5)
    for bad in (-1, True, 2.0, '5'):
        with pytest.raises(ValueError, match=re.escape(f'num_classes={bad!r}') + '.*int >= 0'):
            model.reset_classifier(bad)
    assert model.num_classes == 5


def test_num_classes_zero_is_a_valid_config_and_negative_is_not():
    assert mpvg.make_config('vit_lite_7_4', pe='pvg', num_classes=0).num_classes == 0
    with pytest.raises(ValueError, match=r'num_classes=-1 is invalid: must be an int >= 0'):
        mpvg.make_config('vit_lite_7_4', pe='pvg', num_classes=-1)


def test_forward_intermediates_of_vit_equal_timm():
    ref = _timm_deit_tiny()
    model = mpvg.create_model('deit_tiny', pe='vit').eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = deit_images()
    calls = [dict(), dict(indices=4, norm=True), dict(indices=[2, -1], output_fmt='NLC'),
             dict(indices=[0, 5], norm=True, output_fmt='NLC')]
    with torch.no_grad():
        for kw in calls:
            want_final, want = ref.forward_intermediates(x, **kw)
            got_final, got = model.forward_intermediates(x, **kw)
            torch.testing.assert_close(got_final, want_final, atol=ATOL, rtol=RTOL)
            assert len(got) == len(want), kw
            for g, w in zip(got, want):
                assert g.shape == w.shape, kw
                torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL)
        # control: the comparison sees a map of the neighbouring layer
        assert not torch.allclose(model.forward_intermediates(x, [4], intermediates_only=True)[0],
                                  ref.forward_intermediates(x, [5], intermediates_only=True)[0], atol=1e-3)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('case', ['vit', 'gap', 'lape', 'pvg', 'mpvg', 'tab5_last_ln_pe2'])
def test_forward_intermediates_are_the_layer_outputs_of_the_equations(name, case):
    """Map l is x_{l+1}: through LN_{l+1} it is the reference's LN_{l+1}(x_{l+1}); the last one through the Last LN is
    LN(x_{L+1}); the patch tokens only, in row-major patch order in NCHW; the final features are y of Eq. (4)/(11)."""
    model, x, knobs = build(name, case), images(name, batch=3), knobs_of(case)
    ref = reference(model, name, x, knobs)
    sd, L = model.state_dict(), TINY[name]['depth']
    eps = model.norm.eps
    k = 1 if knobs['pool'] == 'cls' else 0                              # the class token is row 0
    g = TINY[name]['img_size'] // TINY[name]['patch_size']
    with torch.no_grad():
        y, nlc = model.forward_intermediates(x, output_fmt='NLC')
        nchw = model.forward_intermediates(x, intermediates_only=True)
        last = model.forward_intermediates(x, indices=1, norm=True, output_fmt='NLC', intermediates_only=True)
    torch.testing.assert_close(y, ref['y'], atol=ATOL, rtol=RTOL)
    assert len(nlc) == len(nchw) == L
    for l in range(L - 1):
        w, b = sd[f'blocks.{l + 1}.norm1.weight'], sd[f'blocks.{l + 1}.norm1.bias']
        torch.testing.assert_close(F.layer_norm(nlc[l], w.shape, w, b, eps), ref['tokens'][l + 1][:, k:],
                                   atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(last[0], ref['last'][:, k:], atol=ATOL, rtol=RTOL)
    for l in range(L):
        assert nchw[l].shape == (3, TINY[name]['embed_dim'], g, g)
        for i in range(g):
            for j in range(g):
                assert torch.equal(nchw[l][:, :, i, j], nlc[l][:, i * g + j]), (l, i, j)


def test_forward_intermediates_picks_the_layers_asked_for_and_checks_its_arguments():
    model, x = build('deit_tiny', 'mpvg'), images('deit_tiny')
    L = TINY['deit_tiny']['depth']
    with torch.no_grad():
        every = model.forward_intermediates(x, intermediates_only=True)
        for indices, layers in [(None, range(L)), (2, [L - 2, L - 1]), ([0, -1], [0, L - 1]), ((1,), [1])]:
            got = model.forward_intermediates(x, indices, intermediates_only=True)
            assert len(got) == len(layers) and all(torch.equal(a, every[l]) for a, l in zip(got, layers)), indices
        assert not torch.equal(every[0], every[1])
    # checked before any work: x=None would fail in the forward pass, not with this message
    for bad in (0, L + 1, -1, [L], [-L - 1], [], [1.0], 2.0, 'a'):
        with pytest.raises(ValueError, match=re.escape(f'indices={bad!r}') + '.*valid'):
            model.forward_intermediates(None, bad)
    with pytest.raises(ValueError, match=r"output_fmt='NHWC'.*'NCHW', 'NLC'"):
        model.forward_intermediates(None, output_fmt='NHWC')


def test_input_of_another_size_raises_value_error_naming_both_sizes():
    model = mpvg.create_model('deit_tiny', pe='mpvg', **TINY['deit_tiny'])
    with pytest.raises(ValueError) as err:
        model(torch.randn(1, 3, 40, 40))
    for s in ('40x40', 'img_size=32', '32x32', 'checkpoint_filter_fn'):
        assert s in str(err.value), f'{s!r} missing from: {err.value}'
    with pytest.raises(ValueError, match='32x48'):
        model(torch.randn(1, 3, 32, 48))


# ---------------------------------------------------------------------------------------------------------------
# checkpoint_filter_fn: a timm / DeiT state dict into every variant
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('pe', list(PRESETS))
def test_timm_deit_tiny_state_dict_into_every_variant(pe):
    ref = _timm_deit_tiny()
    sd = ref.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    torch.manual_seed(1)
    model = mpvg.create_model('deit_tiny', pe=pe).eval()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    filtered = mpvg.checkpoint_filter_fn(sd, model)
    assert filtered.keys() == mpvg.checkpoint_filter_fn({'model': sd, 'epoch': 299}, model).keys()  # DeiT's file
    missing, unexpected = model.load_state_dict(filtered, strict=False)
    assert set(missing) == pe_norm_keys(pe) and len(missing) == len(pe_norm_keys(pe)) and unexpected == []
    assert len(missing) == {'vit': 0, 'gap': 0, 'lape': 24, 'pvg': 22, 'mpvg': 24}[pe]   # 2 tensors per LN'
    cls = PRESETS[pe]['pool'] == 'cls'
    for k, v in model.state_dict().items():
        if k in missing:
            assert torch.equal(v, init[k]), f'{k} must stay at its initialisation'
        elif k == 'pos_embed':
            assert torch.equal(v, sd[k] if cls else sd[k][:, 1:]), 'GAP: the class token\'s PE row is dropped'
        else:
            assert torch.equal(v, sd[k]), k
    assert ('cls_token' in model.state_dict()) == cls
    assert all(torch.equal(sd[k], before[k]) for k in sd), 'the filter must not change its input'
    if pe == 'vit':
        x = deit_images()
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), atol=ATOL, rtol=RTOL)


def test_timm_head_is_dropped_when_num_classes_differs():
    sd = _timm_deit_tiny().state_dict()
    torch.manual_seed(2)
    model = mpvg.create_model('deit_tiny', pe='mpvg', num_classes=10)
    head = model.head.weight.clone()
    missing, unexpected = model.load_state_dict(mpvg.checkpoint_filter_fn(sd, model), strict=False)
    assert set(missing) == pe_norm_keys('mpvg') | {'head.weight', 'head.bias'} and unexpected == []
    assert torch.equal(model.head.weight, head)


def test_checkpoints_it_cannot_adapt_raise_value_error():
    gap = build('deit_tiny', 'mpvg')
    cls_model = mpvg.create_model('deit_tiny', pe='lape', **TINY['deit_tiny'])
    with pytest.raises(ValueError, match="no cls_token.*pool='cls'"):
        mpvg.checkpoint_filter_fn(gap.state_dict(), cls_model)
    distilled = {**cls_model.state_dict(), 'dist_token': torch.zeros(1, 1, 48)}
    distilled['pos_embed'] = torch.zeros(1, 2 + 16, 48)               # DeiT-distilled: class + distillation token
    with pytest.raises(ValueError, match='17 patch rows.*not a square'):
        mpvg.checkpoint_filter_fn(distilled, gap)


# ---------------------------------------------------------------------------------------------------------------
# checkpoint_filter_fn: another img_size, pos_embed resampled as timm does
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('size', [256, 160])   # up and down (antialias matters only down)
def test_vit_checkpoint_of_224_into_another_size_equals_timm(size):
    sd = _timm_deit_tiny().state_dict()
    ref = timm.create_model('deit_tiny_patch16_224', pretrained=False, img_size=size).eval()
    ref.load_state_dict(timm_checkpoint_filter_fn(sd, ref), strict=True)
    model = mpvg.create_model('deit_tiny', pe='vit', img_size=size).eval()
    model.load_state_dict(mpvg.checkpoint_filter_fn(sd, model), strict=True)
    assert model.pos_embed.shape == (1, 1 + (size // 16) ** 2, D_TI)
    assert torch.equal(model.pos_embed, ref.pos_embed)
    x = deit_images(batch=1, size=size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=ATOL, rtol=RTOL)
    # control: a resampling that is only a little different (bilinear) is seen by the comparison
    grid = size // 16
    bilinear = resample_abs_pos_embed(sd['pos_embed'], (grid, grid), num_prefix_tokens=1, interpolation='bilinear')
    assert not torch.allclose(model.pos_embed, bilinear, atol=1e-4)


@pytest.mark.parametrize('pe', ['gap', 'lape', 'pvg', 'mpvg'])
def test_checkpoint_of_224_into_256_in_every_variant(pe):
    """From timm's DeiT-Ti (class token) and from our own 224 model of the same variant into a 256 model."""
    sd_timm = _timm_deit_tiny().state_dict()
    own = mpvg.create_model('deit_tiny', pe=pe)
    randomize_(own)
    model = mpvg.create_model('deit_tiny', pe=pe, img_size=256).eval()
    k = 1 if PRESETS[pe]['pool'] == 'cls' else 0
    for sd, prefix in ((sd_timm, 1), (own.state_dict(), k)):
        filtered = mpvg.checkpoint_filter_fn(sd, model)
        want = resample_abs_pos_embed(sd['pos_embed'], (16, 16), num_prefix_tokens=prefix)[:, prefix - k:]
        assert torch.equal(filtered['pos_embed'], want)
    missing, unexpected = model.load_state_dict(filtered, strict=False)   # from our own: every key fits
    assert missing == [] and unexpected == []
    with torch.no_grad():
        out = model(deit_images(batch=1, size=256))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize('pe', list(PRESETS))
def test_vit_lite_checkpoint_of_another_size(pe):
    """ViT-Lite has no timm model: our own 32x32 checkpoint into a 48x48 model, pos_embed as timm's function
    resamples it; at the same size the filter hands back the very same tensors."""
    torch.manual_seed(0)
    small = mpvg.create_model('vit_lite_7_4', pe=pe)
    randomize_(small)
    sd = small.state_dict()
    same = mpvg.checkpoint_filter_fn(sd, mpvg.create_model('vit_lite_7_4', pe=pe))
    assert same.keys() == sd.keys() and all(same[k] is sd[k] for k in sd), 'same size: the identity'
    big = mpvg.create_model('vit_lite_7_4', pe=pe, img_size=48).eval()
    filtered = mpvg.checkpoint_filter_fn(sd, big)
    big.load_state_dict(filtered, strict=True)
    k = 1 if PRESETS[pe]['pool'] == 'cls' else 0
    assert big.pos_embed.shape == (1, k + 12 * 12, 256)
    assert torch.equal(big.pos_embed, resample_abs_pos_embed(sd['pos_embed'], (12, 12), num_prefix_tokens=k))
    assert all(torch.equal(filtered[n], sd[n]) for n in sd if n != 'pos_embed')
    with torch.no_grad():
        out = big(torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 100) and torch.isfinite(out).all()

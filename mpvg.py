"""MPVG: Maximizing the Position Embedding for Vision Transformers with Global Average Pooling.

A from-scratch Vision Transformer (torch only) whose position-embedding (PE) scheme is a switch:

    vit   standard ViT/DeiT: PE added once to the tokens, class token           (Fig. 3a)
    gap   as vit, but no class token: global average pooling (GAP)           (Fig. 5a)
    lape  layer-wise PE with its own LayerNorm in every layer, class token   (Fig. 3b; Yu et al., ICCV 2023)
    pvg   layer-wise PE from layer 1 on, PE also added before layer 0, GAP   (Fig. 3c)
    mpvg  pvg + the raw PE, through its own LayerNorm, added at the Last LN  (Fig. 3d)

Paper: W. Lee, B. Ham, S. Kim, AAAI 2025, arXiv 2502.02919. No official MPVG code is public; LaPE's is
(github.com/Ingrid725/LaPE) and `lape` follows it. Each preset is a few orthogonal knobs (`PEConfig`), so
every ablation of the paper is one line:

    create_model('deit_tiny', pe='mpvg', hierarchical=False)   # Table 6, "non-hierarchical"
    create_model('deit_tiny', pe='mpvg', last_ln_pe=8)         # Table 5, pos_8 at the Last LN
    create_model('deit_tiny', pe='gap', last_ln_pe=0)          # Fig. 5b, GAP + PE at the Last LN only

Where the equations live (numbers as in the paper's method section; the code lines carry them too):

    Eq. (1)  x_0 = [x_cls; p_1..p_N] + pos                 VisionTransformer.forward_features
    Eq. (2)  x'_l = MSA(LN_l(x_l)) + x_l                    Block.forward
    Eq. (3)  x_{l+1} = MLP(LN''_l(x'_l)) + x'_l             Block.forward
    Eq. (4)  y = LN(x_{L+1})  ("Last LN")                   VisionTransformer.forward_features
    Eq. (5)  x_0 = [x_cls; p_1..p_N]  (LaPE: no x + PE)     VisionTransformer.forward_features
    Eq. (6)  x'_l = MSA(LN_l(x_l) + LN'_l(pos_l)) + x_l     Block.forward
    Eq. (7)  pos_{l+1} = LN'_l(pos_l)  (hierarchical)       VisionTransformer.layer_pes
    Eq. (8)  x_0 = [p_1..p_N] + pos_0  (PVG: no cls token)  VisionTransformer.forward_features
    Eq. (9)  x'_l = MSA(LN_l(x_l) + LN'_l(pos_{l-1})) + x_l Block.forward
    Eq. (10) pos_l = LN'_l(pos_{l-1})                       VisionTransformer.layer_pes
    Eq. (11) y = LN(x_{L+1}) + LN'(pos_0)  (MPVG)           VisionTransformer.forward_features

Models: `vit_lite_7_4` (CIFAR, 32x32, the Compact-Transformers layer) and `deit_tiny/small/base` (224x224,
timm names and init, so a timm `deit_*_patch16_224` state dict loads with strict=True into `pe='vit'`).

As a backbone, every variant has timm's API: `num_classes=0` (the pooled features, `num_features` wide),
`reset_classifier`, `forward_features` / `forward_head`, `forward_intermediates` (one feature map per layer, for
detection and segmentation heads), and `checkpoint_filter_fn`, which adapts a timm or DeiT state dict, or one of
another img_size, to any variant.

Two kinds of comments: `##` lines teach (strip them and the code still reads), `#` lines are functional.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PEConfig", "PE_PRESETS", "PE_KNOBS", "ViTConfig", "MODELS", "VisionTransformer", "validate_config",
           "make_config", "create_model", "checkpoint_filter_fn", "probe", "pe_token_correlation",
           "pe_token_correlation_parts"]


# ----------------------------------------------------------------------------------------------------
# The switch: five presets of five orthogonal knobs (the paper's Fig. 3a-d, and Fig. 5a for `gap`; the
# ablations of its Tables 5-6, Fig. 1 and Fig. 5b are other values of the same knobs)
# ----------------------------------------------------------------------------------------------------

POOLS = ("cls", "gap")


@dataclass(frozen=True)
class PEConfig:
    """Where the position embedding goes. The forward pass reads these knobs, never the preset name."""

    pool: str = "gap"                  # 'cls': logits from the class token; 'gap': no class token, mean of tokens
    pe_at_input: bool = True           # Eq. (1)/(8): pos_0 added to the tokens before layer 0 ("x + PE")
    layerwise_from: int | None = 1     # first layer that adds LN'_l(PE) to its MSA input; None: no layer-wise PE
    hierarchical: bool = True          # Eq. (7)/(10): pos_l = LN'_l(pos_{l-1}); False: pos_l = LN'_l(pos_0)
    last_ln_pe: int | None = 0         # added after the Last LN through its own LN': 0 = raw pos_0 (Eq. 11),
                                       # k >= 1 = pos_k, the PE layer k adds (Table 5); None = nothing

    def validate(self, depth: int) -> None:
        """Raise ValueError, naming the bad value and the valid ones, for a combination that cannot be built."""
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r} is not a pooling; valid: {', '.join(map(repr, POOLS))}")
        for knob in ("pe_at_input", "hierarchical"):
            if not isinstance(getattr(self, knob), bool):
                raise ValueError(f"{knob}={getattr(self, knob)!r} must be True or False")
        first = self.layerwise_from
        if first is not None and not (_is_int(first) and 0 <= first < depth):
            raise ValueError(f"layerwise_from={first!r} is not a layer of a depth-{depth} model; "
                             f"valid: None or 0..{depth - 1}")
        if first is None and not self.hierarchical:
            raise ValueError("hierarchical=False only changes the layer-wise PE chain, and layerwise_from=None "
                             f"has none; valid: hierarchical=True, or set layerwise_from to 0..{depth - 1}")
        k = self.last_ln_pe
        if k is not None and not _is_int(k):
            raise ValueError(f"last_ln_pe={k!r} must be None or a layer index")
        if k is not None and k != 0:
            layers = [] if first is None else list(range(max(first, 1), depth))
            if k not in layers:
                valid = ", ".join(map(str, layers)) or "none: this config has no layer-wise PE"
                raise ValueError(f"last_ln_pe={k!r} names no PE of this model: valid are None, 0 (raw pos_0), "
                                 f"or a layer k >= 1 that adds a layer-wise PE ({valid})")


PE_PRESETS: dict[str, PEConfig] = {
    "vit":  PEConfig(pool="cls", pe_at_input=True,  layerwise_from=None, last_ln_pe=None),
    "gap":  PEConfig(pool="gap", pe_at_input=True,  layerwise_from=None, last_ln_pe=None),
    "lape": PEConfig(pool="cls", pe_at_input=False, layerwise_from=0,    last_ln_pe=None),
    "pvg":  PEConfig(pool="gap", pe_at_input=True,  layerwise_from=1,    last_ln_pe=None),
    "mpvg": PEConfig(pool="gap", pe_at_input=True,  layerwise_from=1,    last_ln_pe=0),
}
PE_KNOBS = tuple(f.name for f in dataclasses.fields(PEConfig))


# ----------------------------------------------------------------------------------------------------
# Model configurations: the backbones of the paper's Table 1 (DeiT-Ti/S/B, ImageNet-1K) and Table 2
# (ViT-Lite-7/4, CIFAR-100), with the sizes and init of their official code (timm's DeiT, Compact-Transformers)
# ----------------------------------------------------------------------------------------------------

FAMILIES = ("deit", "cct")


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    family: str = "deit"               # 'deit': pre-norm block + timm/DeiT init; 'cct': ViT-Lite layer + CCT init
    drop_path_rate: float = 0.1        # stochastic depth, linear in depth from 0 to this
    attn_drop_rate: float = 0.0        # dropout on the attention probabilities
    fused_attn: bool = True            # F.scaled_dot_product_attention; False: the written-out softmax(QK^T/sqrt(d))V
    pe: PEConfig = dataclasses.field(default_factory=lambda: PE_PRESETS["mpvg"])


## Exact parameter counts of vit / lape / pvg / mpvg (the paper's tables print them rounded), e.g. DeiT-Ti
## 5,717,416 / 5,722,024 / 5,721,256 / 5,721,640: all four models in the README; tests/test_mpvg.py checks them.
MODELS: dict[str, dict] = {
    ## Compact-Transformers `vit_7_4_32` (SHI-Labs): 32x32 CIFAR images, 4x4 patches -> 64 tokens.
    "vit_lite_7_4": dict(img_size=32, patch_size=4, num_classes=100, embed_dim=256, depth=7, num_heads=4,
                         mlp_ratio=2.0, qkv_bias=False, norm_eps=1e-5, family="cct",
                         drop_path_rate=0.1, attn_drop_rate=0.1),
    ## timm `deit_{tiny,small,base}_patch16_224`: 224x224 ImageNet images, 16x16 patches -> 196 tokens.
    "deit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "deit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "deit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


# ----------------------------------------------------------------------------------------------------
# Building blocks, in the order the data flows through them
# ----------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Split the image into non-overlapping patches and project each to D dims (one strided conv)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.img_size = img_size
        self.grid_size = (img_size // patch_size,) * 2             # (H/p, W/p), timm's name
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.shape[-2:] != (self.img_size, self.img_size):
            ## pos_embed has one row per patch of an img_size image, so no other size can be added to it.
            H, W = x.shape[-2:]
            raise ValueError(f"input images are {H}x{W} pixels, but this model was built for img_size="
                             f"{self.img_size}; valid: {self.img_size}x{self.img_size} images, or, for square images "
                             f"of another size S, a model built with img_size=S that loads these weights through "
                             f"checkpoint_filter_fn (which resamples the position embedding to the new patch grid)")
        x = self.proj(x)                       # (B, C, H, W) -> (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)    # (B, D, H/p, W/p) -> (B, N, D), patches p_1..p_N (a view)


class Attention(nn.Module):
    """Multi-head self-attention, MSA in Eq. (2), (6), (9)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, fused: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.fused_attn = fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3D) -> (B, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # each (B, h, T, d)
        p = self.attn_drop if self.training else 0.0
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            ## Written out for teaching; the test suite checks it agrees with the fused kernel.
            attn = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)    # (B, h, T, T)
            attn = F.dropout(attn.softmax(dim=-1), p)
            x = attn @ v                                                   # (B, h, T, d)
        x = x.transpose(1, 2).reshape(B, T, D)                             # (B, h, T, d) -> (B, T, D)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """A residual connection with stochastic depth: x + branch, each sample's branch dropped with probability p."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x, branch):
        if self.p == 0.0 or not self.training:
            return x + branch
        keep = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(1.0 - self.p)  # (B,1,1)
        ## x + branch * keep / (1 - p), scaled so that its expectation is x + branch. addcmul makes one pass over
        ## the tokens where timm's `x + drop_path(branch)` makes two (a multiply, then the add).
        return torch.addcmul(x, branch, keep.div_(1.0 - self.p))


class Block(nn.Module):
    """One transformer layer l. `pe` is the layer-wise PE LN'_l(.) this layer adds (None: no PE here).

    family 'deit' (pre-norm, Eq. 2-3):    x' = x + MSA(LN_l(x) [+ pe]);  x_{l+1} = x' + MLP(LN''_l(x'))
    family 'cct'  (Compact-Transformers): x' = LN''_l(x + MSA(LN_l(x) [+ pe]));  x_{l+1} = x' + MLP(x')
    """

    def __init__(self, cfg: ViTConfig, drop_path: float, has_pe_norm: bool):
        super().__init__()
        D = cfg.embed_dim
        self.post_norm_residual = cfg.family == "cct"
        self.norm1 = nn.LayerNorm(D, eps=cfg.norm_eps)            # LN_l (CCT's `pre_norm`)
        self.attn = Attention(D, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.fused_attn)
        self.norm2 = nn.LayerNorm(D, eps=cfg.norm_eps)            # LN''_l (CCT's `norm1`)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio))
        self.residual = DropPath(drop_path)                       # x + branch, with stochastic depth
        ## LN'_l: this layer's OWN norm for the PE (LaPE's `pe_norm`); its output is also handed on to the
        ## next layer (Eq. 7/10), but the chain is computed once per forward in VisionTransformer.layer_pes.
        self.pe_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if has_pe_norm else None

    def forward(self, x, pe=None):
        h = self.norm1(x)                                          # LN_l(x_l)
        if pe is not None:
            h = h + pe                                             # Eq. (6)/(9): LN_l(x_l) + LN'_l(pos); (1,T,D) broadcast
        x = self.residual(x, self.attn(h))                         # Eq. (2): x'_l = MSA(...) + x_l
        if self.post_norm_residual:
            ## CCT's layer normalizes the residual stream itself and has no LN before the MLP.
            x = self.norm2(x)
            return self.residual(x, self.mlp(x))
        return self.residual(x, self.mlp(self.norm2(x)))           # Eq. (3): x_{l+1} = MLP(LN''_l(x'_l)) + x'_l


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------

class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        ## Every check of the configuration is in validate_config (with the factory below), so that make_config
        ## runs them all without building anything.
        validate_config(cfg)
        self.cfg = cfg
        pe, D, L = cfg.pe, cfg.embed_dim, cfg.depth

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        N = self.patch_embed.num_patches
        self.num_prefix_tokens = int(pe.pool == "cls")             # timm's name: tokens before the patches
        self.num_tokens = N + self.num_prefix_tokens               # T: the class token takes a row of the PE too
        self.num_features = D                                      # timm's name: the width of the pooled features
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if pe.pool == "cls" else None
        uses_pos = pe.pe_at_input or pe.layerwise_from is not None or pe.last_ln_pe is not None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, D)) if uses_pos else None

        dpr = [cfg.drop_path_rate * l / max(L - 1, 1) for l in range(L)]  # stochastic depth, linear in depth
        first = L if pe.layerwise_from is None else pe.layerwise_from
        self.blocks = nn.ModuleList(Block(cfg, dpr[l], has_pe_norm=l >= first) for l in range(L))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)              # the Last LN, Eq. (4)
        self.pe_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if pe.last_ln_pe is not None else None  # LN' of Eq. (11)
        ## num_classes=0, as in timm: no classifier, forward returns the pooled features (B, num_features).
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        cct = self.cfg.family == "cct"
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.2 if cct else 0.02)
        if self.cls_token is not None and not cct:                 # CCT's class token starts at zero
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if cct:                                                    # CCT's Tokenizer; DeiT keeps torch's conv init
            nn.init.kaiming_normal_(self.patch_embed.proj.weight)

    def layer_pes(self) -> list[torch.Tensor | None]:
        """The PE each layer adds to its MSA input, Eq. (7)/(10), computed once on the (1, T, D) table.

        Returns a list of length depth; entry l is LN'_l(previous PE) of shape (1, T, D), or None.
        This is N*D work per forward, not B*N*D: the chain never sees the batch.
        """
        pe, pos = self.cfg.pe, self.pos_embed
        pes: list[torch.Tensor | None] = [None] * self.cfg.depth
        if pe.layerwise_from is None:
            return pes
        prev = pos                                                  # pos_0 = pos
        for l in range(pe.layerwise_from, self.cfg.depth):
            src = prev if pe.hierarchical else pos
            pes[l] = prev = self.blocks[l].pe_norm(src)             # Eq. (7)/(10): pos_l = LN'_l(pos_{l-1})
        return pes

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def forward_features(self, x, taps: list | None = None):
        """Eq. (1)-(11) up to the pooling: (B, C, H, W) -> y (B, T, D).

        taps: a list to which each layer's output x_{l+1} (B, T, D) is appended (for forward_intermediates).
        """
        pe = self.cfg.pe
        x = self.patch_embed(x)                                     # (B, 3, H, W) -> (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, D) -> (B, 1+N, D)
        else:
            ## The patches are a transposed view of the conv output. Copied once here, or the residual stream
            ## would keep that (B, D, N) memory layout and every LayerNorm would copy it. (The cat above copies.)
            x = x.contiguous()
        if pe.pe_at_input:
            x = x + self.pos_embed                                  # Eq. (1)/(8); LaPE skips it, Eq. (5)
        pes = self.layer_pes()
        for block, pe_l in zip(self.blocks, pes):
            x = block(x, pe_l)                                      # Eq. (2)-(3), (6), (9)
            if taps is not None:
                taps.append(x)
        y = self.norm(x)                                            # Eq. (4): the Last LN
        if pe.last_ln_pe is not None:
            pos_k = self.pos_embed if pe.last_ln_pe == 0 else pes[pe.last_ln_pe]
            y = y + self.pe_norm(pos_k)                             # Eq. (11): y = LN(x_{L+1}) + LN'(pos_0)
        return y

    def forward_head(self, y, pre_logits: bool = False):
        """y (B, T, D) -> logits (B, num_classes), or with pre_logits=True the pooled features (B, D)."""
        y = y[:, 0] if self.cfg.pe.pool == "cls" else y.mean(dim=1)  # class token, or GAP over the tokens
        ## deviation: timm's GAP ViTs pool first and normalize after (fc_norm); the paper (Eq. 11) normalizes
        ## each token at the Last LN and then averages, which is what this does.
        return y if pre_logits else self.head(y)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """timm's: a new head for num_classes (0: none, forward returns the pooled features), initialised afresh."""
        ok, valid = _ARCH_RULES["num_classes"]
        if not ok(num_classes):
            raise ValueError(f"num_classes={num_classes!r} is invalid: must be {valid}")
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)   # a copy: cfg may be shared
        head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            nn.init.trunc_normal_(head.weight, std=0.02)            # as _init_weights
            nn.init.zeros_(head.bias)
        self.head = head.to(self.patch_embed.proj.weight).train(self.training)  # the model's device and dtype

    def forward_intermediates(self, x, indices=None, norm: bool = False, intermediates_only: bool = False,
                              output_fmt: str = "NCHW"):
        """timm's: the output tokens of the chosen layers as feature maps, what detection and segmentation heads take.

        indices: None = every layer, an int n = the last n layers, a list = those layers (negative: from the end).
        Each map is a layer's output x_{l+1} without the class token, (B, D, H/p, W/p) for output_fmt 'NCHW' or
        (B, N, D) for 'NLC'; norm=True passes it through the Last LN first (only: Eq. 11's LN'(pos_0) is a term of
        the final features alone). Returns the maps, or (forward_features(x), maps) unless intermediates_only.
        """
        L = len(self.blocks)
        if indices is None or _is_int(indices):
            n = L if indices is None else indices
            take = list(range(L - n, L))                            # the last n layers
        elif isinstance(indices, (list, tuple)):
            take = [i + L if _is_int(i) and i < 0 else i for i in indices]
        else:
            take = []
        if not take or not all(_is_int(i) and 0 <= i < L for i in take):
            raise ValueError(f"indices={indices!r} names no layers of this depth-{L} model; valid: None (all), an "
                             f"int n in 1..{L} (the last n layers), or a list of layers in {-L}..{L - 1}")
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r} is invalid; valid: 'NCHW', 'NLC'")
        taps = []
        y = self.forward_features(x, taps)                          # taps[l]: the output of layer l
        maps = []
        for l in take:
            t = self.norm(taps[l]) if norm else taps[l]
            t = t[:, self.num_prefix_tokens:]                       # (B, T, D) -> (B, N, D): the class token dropped
            if output_fmt == "NCHW":
                B, N, D = t.shape
                t = t.reshape(B, *self.patch_embed.grid_size, D)    # (B, N, D) -> (B, H/p, W/p, D)
                t = t.permute(0, 3, 1, 2).contiguous()              # (B, H/p, W/p, D) -> (B, D, H/p, W/p)
            maps.append(t)
        return maps if intermediates_only else (y, maps)

    def no_weight_decay(self) -> set[str]:
        """timm/DeiT convention: parameters the DeiT recipe does not decay (besides 1-D ones and biases)."""
        return {name for name in ("pos_embed", "cls_token") if getattr(self, name) is not None}


# ----------------------------------------------------------------------------------------------------
# Configuration checks and the factory
# ----------------------------------------------------------------------------------------------------

_ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ViTConfig) if f.name != "pe")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)      # True is an int to Python, not a depth


def _is_number(v) -> bool:
    return _is_int(v) or isinstance(v, float) and math.isfinite(v)   # no NaN, no inf


_INT = (lambda v: _is_int(v) and v >= 1, "an int >= 1")
_POSITIVE = (lambda v: _is_number(v) and v > 0, "a finite number > 0")
_BOOL = (lambda v: isinstance(v, bool), "True or False")
_RATE = "a number in [0, 1)"
## Each architecture field on its own: (test of the value, what is valid). The constraints between fields follow
## in validate_config, which reports every failure at once.
_ARCH_RULES: dict[str, tuple] = {
    "img_size": _INT, "patch_size": _INT, "in_chans": _INT,
    "num_classes": (lambda v: _is_int(v) and v >= 0, "an int >= 0 (0: no head, as timm: the pooled features)"),
    "embed_dim": _INT, "depth": _INT, "num_heads": _INT,
    "mlp_ratio": _POSITIVE, "norm_eps": _POSITIVE,
    "qkv_bias": _BOOL, "fused_attn": _BOOL,
    "family": (lambda v: isinstance(v, str) and v in FAMILIES, "one of " + ", ".join(map(repr, FAMILIES))),
    ## 1 is excluded: the last layer's drop-path rate is drop_path_rate, and at 1 that layer would be dropped for
    ## every sample and its 1/(1 - p) rescaling would divide by zero (NaN); an attention dropout of 1 drops every
    ## attention weight, so no token would see any other.
    "drop_path_rate": (lambda v: _is_number(v) and 0 <= v < 1, _RATE + " (1 would always drop the last layer)"),
    "attn_drop_rate": (lambda v: _is_number(v) and 0 <= v < 1, _RATE + " (1 would drop every attention weight)"),
}
assert set(_ARCH_RULES) == set(_ARCH_FIELDS), "every ViTConfig field needs a rule"


def validate_config(cfg: ViTConfig) -> None:
    """Raise ValueError for a configuration no model can be built from, naming each bad value and what is valid.

    Every check that building the model relies on lives here (VisionTransformer calls it first), and it allocates
    nothing, so make_config, and a training script through it, can reject bad flags before any real work.
    """
    bad = [f for f, (ok, _) in _ARCH_RULES.items() if not ok(getattr(cfg, f))]
    problems = [f"{f}={getattr(cfg, f)!r} is invalid: must be {_ARCH_RULES[f][1]}" for f in bad]
    fine = set(bad).isdisjoint                                 # the cross-field checks need valid fields
    if fine(("img_size", "patch_size")) and cfg.img_size % cfg.patch_size:
        problems.append(f"img_size={cfg.img_size} is not a multiple of patch_size={cfg.patch_size}: the patches "
                        f"must tile the image; valid: an img_size divisible by patch_size")
    if fine(("embed_dim", "num_heads")) and cfg.embed_dim % cfg.num_heads:
        problems.append(f"embed_dim={cfg.embed_dim} is not divisible by num_heads={cfg.num_heads}: each head gets "
                        f"embed_dim / num_heads dims; valid: a num_heads that divides embed_dim")
    if fine(("embed_dim", "mlp_ratio")) and cfg.embed_dim * cfg.mlp_ratio < 1:  # Mlp has int(that)
        problems.append(f"mlp_ratio={cfg.mlp_ratio!r} with embed_dim={cfg.embed_dim} gives an MLP of "
                        f"int(embed_dim * mlp_ratio) = 0 hidden units; valid: embed_dim * mlp_ratio >= 1")
    if not isinstance(cfg.pe, PEConfig):
        problems.append(f"pe={cfg.pe!r} is invalid: must be a PEConfig")
    elif fine(("depth",)):                                     # the PE knobs are checked against the depth
        try:
            cfg.pe.validate(cfg.depth)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))


def make_config(name: str, pe: str | PEConfig = "mpvg", num_classes: int | None = None,
                **overrides) -> ViTConfig:
    """The checked configuration of `name` with the PE scheme `pe` (a preset name or a PEConfig), no weights.

    overrides: any ViTConfig field (timm names: img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio,
    qkv_bias, drop_path_rate, attn_drop_rate, ...) and any PE knob (pool, pe_at_input, layerwise_from,
    hierarchical, last_ln_pe), which replaces that knob of the preset.
    Raises ValueError, naming the bad values and the valid ones, for anything create_model could not build.
    """
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    if isinstance(pe, str):
        if pe not in PE_PRESETS:
            raise ValueError(f"unknown pe {pe!r}; valid: {', '.join(PE_PRESETS)}")
        pe = PE_PRESETS[pe]
    elif not isinstance(pe, PEConfig):
        raise ValueError(f"pe={pe!r} must be a preset name ({', '.join(PE_PRESETS)}) or a PEConfig")
    unknown = sorted(set(overrides) - set(_ARCH_FIELDS) - set(PE_KNOBS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for create_model; valid: "
                         f"{', '.join(_ARCH_FIELDS + PE_KNOBS)}")
    pe = dataclasses.replace(pe, **{k: v for k, v in overrides.items() if k in PE_KNOBS})
    arch = {**MODELS[name], **{k: v for k, v in overrides.items() if k in _ARCH_FIELDS}}
    if num_classes is not None:
        arch["num_classes"] = num_classes
    cfg = ViTConfig(**arch, pe=pe)
    validate_config(cfg)
    return cfg


def create_model(name: str, pe: str | PEConfig = "mpvg", num_classes: int | None = None,
                 **overrides) -> VisionTransformer:
    """Build `name` with the PE scheme `pe` (a preset name or a PEConfig): VisionTransformer(make_config(...)).

    Arguments as make_config, which checks them all before any weight is allocated.
    """
    return VisionTransformer(make_config(name, pe, num_classes, **overrides))


# ----------------------------------------------------------------------------------------------------
# Checkpoints of another variant or another image size (timm's checkpoint_filter_fn)
# ----------------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict, model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Adapt a state dict to `model` (timm's name), from any variant and img_size of this file's models, timm's
    `deit_*_patch16_224` or an official DeiT / LaPE checkpoint ({'model': state_dict}). Load the result with
    `model.load_state_dict(..., strict=False)`:

    - `cls_token` and the class token's row of `pos_embed` are dropped for a GAP model (Eq. 8: no class token);
    - the patch rows of `pos_embed` are resampled to the model's patch grid when it differs, as timm does;
    - `head` is kept when it has the model's shape and dropped otherwise (num_classes=0 or another number of
      classes), so the model keeps its own freshly initialised head;
    - every other tensor is passed on as it is. The model's weights the checkpoint lacks stay at their
      initialisation and load_state_dict's missing_keys names them: from a DeiT checkpoint, the PE LayerNorms
      (`blocks.<l>.pe_norm`, `pe_norm`), and `head` if it was dropped.
    """
    state_dict = state_dict.get("model", state_dict)           # DeiT / LaPE files: {'model': state_dict, ...}
    own = model.state_dict()
    ## A DeiT checkpoint has no PE LayerNorms LN'_l: at their initialisation (weight 1, bias 0) each one starts as a
    ## plain normalization of the PE, and fine-tuning learns them.
    out = {}
    for k, v in state_dict.items():
        ## A GAP model has no class token, so the token and its PE row (row 0) have nothing to go to.
        if k == "cls_token" and model.cls_token is None:
            continue
        if k.startswith("head.") and (k not in own or own[k].shape != v.shape):
            continue
        if k == "pos_embed" and model.pos_embed is not None:
            v = _resample_pos_embed(v, "cls_token" in state_dict, model)
        out[k] = v
    return out


def _resample_pos_embed(pos, has_cls: bool, model: VisionTransformer) -> torch.Tensor:
    """A checkpoint's pos_embed (1, [1 +] N', D) -> (1, T, D) for `model`: the class token's row kept or dropped, the
    N' patch rows resampled to the model's grid as timm's resample_abs_pos_embed (bicubic, antialias, float32)."""
    if model.cls_token is not None and not has_cls:
        raise ValueError("the checkpoint has no cls_token (a GAP variant), so it has no class token nor PE row for "
                         "it to give a pool='cls' model; valid: a checkpoint with a class token, or a GAP model")
    cls_row, grid = pos[:, :int(has_cls)], pos[:, int(has_cls):]   # (1, 0 or 1, D), (1, N', D)
    old, new = math.isqrt(grid.shape[1]), model.patch_embed.grid_size[0]
    if old * old != grid.shape[1]:
        raise ValueError(f"the checkpoint's pos_embed has {grid.shape[1]} patch rows (after "
                         f"{int(has_cls)} class-token row), not a square patch grid; valid: n*n patch rows after "
                         f"at most one class-token row (a distilled DeiT's extra token is not supported)")
    if old != new:
        ## Each of the D channels of the PE is an old x old image, resized like one (timm: bicubic, antialias).
        D = grid.shape[-1]
        g = grid.float().reshape(1, old, old, D).permute(0, 3, 1, 2)   # (1, N', D) -> (1, D, old, old)
        g = F.interpolate(g, size=(new, new), mode="bicubic", antialias=True)
        grid = g.permute(0, 2, 3, 1).reshape(1, new * new, D).to(pos.dtype)   # (1, D, new, new) -> (1, N, D)
    elif has_cls == (model.cls_token is not None):
        return pos                                             # same grid, same tokens: unchanged
    return torch.cat([cls_row, grid], dim=1) if model.cls_token is not None else grid


# ----------------------------------------------------------------------------------------------------
# Probing for the paper's analysis (Fig. 2, Fig. 4), without touching forward
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def probe(model: VisionTransformer, x) -> dict:
    """Run `model` on x and return, per layer l, the token embedding after LN, LN_l(x_l), and the PE added there.

    Returns {'tokens': [LN_l(x_l) (B, T, D)] * depth, 'pe': model.layer_pes() (entries (1, T, D) or None),
             'last': LN(x_{L+1}) (B, T, D), before the Last-LN PE term, 'logits': (B, classes)}.
    Implemented with forward hooks on the LayerNorms, so the forward pass is exactly the one used in training.
    """
    captured: dict[int, torch.Tensor] = {}
    norms = [block.norm1 for block in model.blocks] + [model.norm]
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o.detach()))
             for k, m in enumerate(norms)]
    try:
        logits = model(x)
        pes = model.layer_pes()
    finally:
        for h in hooks:
            h.remove()
    L = len(model.blocks)
    return {"tokens": [captured[l] for l in range(L)],
            "pe": [None if p is None else p.detach() for p in pes],
            "last": captured[L], "logits": logits}


@torch.no_grad()
def pe_token_correlation(model: VisionTransformer, x) -> list[float | None]:
    """Per layer, the Pearson correlation between the token embedding after LN and the PE added in that layer.

    Fig. 2 / Fig. 4 of the paper (reconstructed: the paper does not print the formula): the token embedding
    LN_l(x_l) is averaged over the images of the batch, giving a (T, D) map like the paper's heatmaps, and
    correlated over all T*D entries with that layer's PE. None for layers that add no PE.
    """
    out = probe(model, x)
    return [None if pe is None else _pearson(tokens.mean(0), pe[0]) for tokens, pe in zip(out["tokens"], out["pe"])]


@torch.no_grad()
def pe_token_correlation_parts(model: VisionTransformer, x) -> list[dict[str, float] | None]:
    """pe_token_correlation split into a per-channel part and a position-dependent part. Our analysis, not the paper's.

    Per layer: A = LN_l(x_l) averaged over the batch, B = the PE added in that layer, both (T, D). Each is the sum of
    its per-channel part, the mean over the tokens of each channel, the same D-vector in every row (token-constant),
    and its position-dependent part, the rest (every channel sums to 0 over the tokens):
        A = A_ch + A_pos,   B = B_ch + B_pos.
    The two parts are orthogonal, so over the T*D entries var(A) = var(A_ch) + var(A_pos), and the correlation is
        corr(A, B) = r_ch * sqrt(s_A * s_B) + r_pos * sqrt((1 - s_A) * (1 - s_B)),
    with r_ch = corr(A_ch, B_ch), r_pos = corr(A_pos, B_pos), s_A = var(A_ch) / var(A), s_B = var(B_ch) / var(B).

    Returns per layer None (no PE there) or a dict of floats: 'corr' (pe_token_correlation's value), 'corr_channel'
    (r_ch), 'corr_position' (r_pos), 'share_channel_tokens' (s_A), 'share_channel_pe' (s_B).
    """
    out = probe(model, x)
    parts: list[dict[str, float] | None] = []
    for tokens, pe in zip(out["tokens"], out["pe"]):
        if pe is None:
            parts.append(None)
            continue
        A, B = tokens.mean(0).double(), pe[0].double()              # (T, D) each
        a_ch, b_ch = A.mean(0), B.mean(0)                           # (D,): per-channel means over the tokens
        A_pos, B_pos = A - a_ch, B - b_ch                           # (T, D) - (D,) broadcast over the tokens
        ## A_ch repeats a_ch in all T rows: its correlation is that of the D-vectors, its spread T times theirs.
        parts.append({"corr": _pearson(A, B), "corr_channel": _pearson(a_ch, b_ch),
                      "corr_position": _pearson(A_pos, B_pos),
                      "share_channel_tokens": _share(a_ch, A), "share_channel_pe": _share(b_ch, B)})
    return parts


def _pearson(a, b) -> float:
    """Pearson correlation of two tensors of the same shape, over all their entries, in float64."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _share(per_channel, full) -> float:
    """Fraction of the sum of squares of `full` (T, D) about its mean held by its per-channel means (D,)."""
    T = full.shape[0]
    return float(T * (per_channel - full.mean()).square().sum() / (full - full.mean()).square().sum())

"""A compact DiT (Peebles & Xie 2023) built from timm's blocks, conditioned by adaLN-Zero.

timm provides the patch embedding, attention and MLP, and MONAI the sinusoidal timestep embedding
(``medclf.models.diffusion``); what they lack is the DiT-specific glue (adaLN modulation, the
un-patchifying final layer), written here.
Conditioning: timestep + optional class label (with a null class for classifier-free dropout) +
optional representation vector (for representation-conditioned pretraining), summed into one
vector that modulates every block and the final layer.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention
from torch import nn

from medclf.models.diffusion import timestep_embedding
from medclf.models.sizes import DIT_SIZES  # noqa: F401  (re-exported: the table lives torch-free)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the (integer or continuous) timestep followed by an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, image_size: int, in_channels: int, patch: int = 4, hidden: int = 384, depth: int = 12,
                 heads: int = 6, num_classes: int = 0, cond_dim: int = 0):
        super().__init__()
        self.in_channels, self.patch = in_channels, patch
        self.x_embed = PatchEmbed(image_size, patch, in_channels, hidden, bias=True)
        n = self.x_embed.num_patches
        self.pos = nn.Parameter(torch.zeros(1, n, hidden))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.t_embed = TimestepEmbedder(hidden)
        # num_classes includes the null class used for classifier-free dropout
        self.y_embed = nn.Embedding(num_classes, hidden) if num_classes else None
        self.r_embed = nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) if cond_dim else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads) for _ in range(depth))
        self.final = FinalLayer(hidden, patch, in_channels)
        for blk in [*self.blocks, self.final]:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        p, c = self.patch, self.in_channels
        h = w = int(n**0.5)
        x = x.reshape(b, h, w, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.x_embed(x) + self.pos  # (B, N, D)
        c = self.t_embed(t)  # (B, D)
        if self.y_embed is not None and y is not None:
            c = c + self.y_embed(y)
        if self.r_embed is not None and cond is not None:
            c = c + self.r_embed(cond)
        for blk in self.blocks:
            tokens = blk(tokens, c)  # (B, N, D)
        return self.unpatchify(self.final(tokens, c))  # (B, C, H, W)


#: name -> (patch, hidden, depth, heads); the CLI's --model-size choices come from here


def build_dit(size: str, image_size: int, in_channels: int, num_classes: int = 0, cond_dim: int = 0) -> DiT:
    patch, hidden, depth, heads = DIT_SIZES[size]
    return DiT(image_size, in_channels, patch, hidden, depth, heads, num_classes=num_classes, cond_dim=cond_dim)

"""A small PyTorch model of the reference DeepFlow, written from docs/architecture.md.

Used only by tests: it produces reference-layout checkpoints for architectures
the golden files do not cover (qk-norm, legacy scaling, SSL projectors, three
branches). ``test_torch_reference_matches_golden`` first shows it reproduces the
reference's own golden outputs on ``tiny2t.pt``, so agreement with it is
agreement with the reference. Its state_dict keys are the reference's.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):

  def __init__(self, width, freq=256):
    super().__init__()
    self.freq = freq
    self.mlp = nn.Sequential(nn.Linear(freq, width), nn.SiLU(), nn.Linear(width, width))

  def forward(self, t):
    half = self.freq // 2
    f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    a = t.float()[:, None] * f[None]
    return self.mlp(torch.cat([torch.cos(a), torch.sin(a)], -1))


class Attention(nn.Module):

  def __init__(self, d, heads, qk_norm):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(d, 3 * d)
    self.proj = nn.Linear(d, d)
    hd = d // heads
    self.q_norm = nn.LayerNorm(hd) if qk_norm else nn.Identity()
    self.k_norm = nn.LayerNorm(hd) if qk_norm else nn.Identity()

  def forward(self, x):
    n, t, d = x.shape
    qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    q = q * (d // self.heads)**-0.5
    a = (q @ k.transpose(-2, -1)).softmax(-1)
    return self.proj((a @ v).transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):

  def __init__(self, i, h, o):
    super().__init__()
    self.fc1 = nn.Linear(i, h)
    self.fc2 = nn.Linear(h, o)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):

  def __init__(self, d, heads, qk_norm):
    super().__init__()
    self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(d, heads, qk_norm)
    self.mlp = Mlp(d, 4 * d, d)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

  def forward(self, x, c):
    sm, cm, gm, sp, cp, gp = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + gm.unsqueeze(1) * self.attn(modulate(self.norm1(x), sm, cm))
    return x + gp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sp, cp))


class FinalLayer(nn.Module):

  def __init__(self, d, out):
    super().__init__()
    self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(d, out)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm(x), shift, scale))


class VelocityModulation(nn.Module):

  def __init__(self, d, legacy):
    super().__init__()
    self.legacy = legacy
    self.norm = nn.LayerNorm(2 * d, elementwise_affine=False, eps=1e-6)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(2 * d, 4 * d))
    self.mlp = Mlp(2 * d, 2 * d, d)

  def forward(self, u, e):
    shift, scale = self.adaLN_modulation(e).chunk(2, dim=1)
    if self.legacy:
      scale = scale.clamp(-5, 5)
    return self.mlp(modulate(self.norm(u), shift, scale))


class CrossAttention(nn.Module):

  def __init__(self, d, heads):
    super().__init__()
    self.layer_norm = nn.LayerNorm(d)
    self.multihead_attn = nn.MultiheadAttention(d, heads, batch_first=True)

  def forward(self, s, r):
    q = self.layer_norm(s)
    kv = self.layer_norm(r)
    return q + self.multihead_attn(q, kv, kv, need_weights=True)[0]


class VeRA(nn.Module):

  def __init__(self, d, heads, p, legacy):
    super().__init__()
    self.acc_mlp = nn.Sequential(nn.Linear(d, p), nn.SiLU(), nn.Linear(p, 2 * p), nn.SiLU(),
                                 nn.Linear(2 * p, p), nn.SiLU(), nn.Linear(p, d))
    self.acc_norm = VelocityModulation(d, legacy)
    self.cross_attention = CrossAttention(d, heads)

  def forward(self, v, s, e):
    a = self.acc_mlp(v)
    r = self.acc_norm(torch.cat([v, a], -1), e)
    return a, self.cross_attention(s, r)


def sincos(d, g):
  def one(dim, pos):
    om = 1.0 / 10000**(np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    o = np.einsum("m,d->md", pos.reshape(-1), om)
    return np.concatenate([np.sin(o), np.cos(o)], 1)
  gh, gw = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64),
                       indexing="ij")
  return np.concatenate([one(d // 2, gw), one(d // 2, gh)], 1).astype(np.float32)


class DeepFlowTorch(nn.Module):

  def __init__(self, input_size=8, patch=2, channels=4, d=64, depth=4, heads=4, classes=10,
               df_idxs=(2,), projector_dim=128, ssl_align=False, z_dim=32, legacy=False,
               qk_norm=False):
    super().__init__()
    self.p, self.c, self.df_idxs, self.ssl = patch, channels, list(df_idxs), ssl_align
    self.x_embedder = nn.Module()
    self.x_embedder.proj = nn.Conv2d(channels, d, patch, patch)
    self.t_embedder = TimestepEmbedder(d)
    self.dt_embedder = TimestepEmbedder(2 * d)
    self.y_embedder = nn.Module()
    self.y_embedder.embedding_table = nn.Embedding(classes + 1, d)
    g = input_size // patch
    self.pos_embed = nn.Parameter(torch.from_numpy(sincos(d, g))[None], requires_grad=False)
    self.blocks = nn.ModuleList([Block(d, heads, qk_norm) for _ in range(depth)])
    self.df_blocks = nn.ModuleList([VeRA(d, heads, projector_dim, legacy) for _ in df_idxs])
    self.final_layer = nn.ModuleList([FinalLayer(d, patch * patch * channels) for _ in range(2)])
    self.final_acc_layer = FinalLayer(d, patch * patch * channels)
    if ssl_align:
      self.projectors = nn.ModuleList([
          nn.Sequential(nn.Linear(d, projector_dim), nn.SiLU(),
                        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                        nn.Linear(projector_dim, z_dim)) for _ in df_idxs])

  def unpatchify(self, x):
    n, t, _ = x.shape
    g = int(round(t**0.5))
    x = x.reshape(n, g, g, self.p, self.p, self.c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, self.c, g * self.p, g * self.p)

  def forward(self, x, ts, y):
    s = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
    ey = self.y_embedder.embedding_table(y)
    c = self.t_embedder(ts[0]) + ey
    h, vs, accs, zs, j = s, [], [], [], 0
    for i, blk in enumerate(self.blocks, start=1):
      h = blk(h, c)
      if i in self.df_idxs:
        vs.append(self.unpatchify(self.final_layer[0](h, c)))
        a, h = self.df_blocks[j](h, s, self.dt_embedder(ts[j + 1] - ts[j]))
        accs.append(self.unpatchify(self.final_acc_layer(a, c)))
        c = self.t_embedder(ts[j + 1]) + ey
        if self.ssl:
          zs.append(self.projectors[j](h))
        j += 1
    vs.append(self.unpatchify(self.final_layer[1](h, c)))
    return vs, accs, zs


def randomize_(model: nn.Module, seed: int, vera_scale_gain: float = 1.0) -> None:
  """Non-trivial random weights (as the golden data): N(0, 1/fan_in) matrices, small biases."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "pos_embed":
        continue
      if p.ndim >= 2:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        if "embedding_table" in name:
          p.copy_(torch.randn(p.shape, generator=g))
        if "acc_norm.adaLN_modulation" in name:
          p.mul_(vera_scale_gain)
      elif name.endswith("weight"):  # affine LayerNorm
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.02 * torch.randn(p.shape, generator=g))

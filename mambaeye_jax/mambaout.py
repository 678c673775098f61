"""MambaOut (Yu & Wang, CVPR 2025): the gated-CNN baseline beside MambaEye.

Dimension letters: b batch, h, w spatial rows and columns (channels-last
throughout), c input channels (3), d a stage's width, e = int(8/3 d) the
block's hidden width, K classes.

    x        = normalise(images)                               (b, H, W, 3)
    stem     : conv3x3/2 -> LN -> GELU -> conv3x3/2 -> LN      (b, H/4, W/4, d_1)
    stage s  : [conv3x3/2 -> LN, for s > 1] -> depth_s blocks  (b, H/2^(s+1), W/2^(s+1), d_s)
    logits   = fc2(LN(GELU(fc1(LN(mean_hw(x))))))               (b, K)

Gated CNN block (every block of every stage), with LN = LayerNorm:

    g, i, c = split(fc1(LN(x)), (e, e - d, d))       fc1: d -> 2e
    x       = x + fc2(gelu(g) * concat(i, dwconv7x7(c)))   fc2: e -> d

Every stride-2 conv pads by 1, so a side of n pixels becomes ceil(n / 2):
the last stage sees ceil(H / 32) x ceil(W / 32) (1 x 1 at 32 x 32), and the
global mean makes the model take any input size, square or not.

Inputs are uint8 pixels (divided by 255 here) or floats already in [0, 1],
the same contract as MambaEye's glimpses, so one data pipeline feeds both
models; the ImageNet mean/std normalisation the original's data pipeline
applies is done here instead (`MambaOutConfig.normalize`).

Conv and linear weights are truncated-normal(0.02), biases zero, LayerNorm
eps 1e-6 everywhere; GELU is the exact (erf) form, as torch's nn.GELU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}

LN_EPS = 1e-6
HEAD_RATIO = 4  # The head's hidden width is 4 x the last stage's ("mlp_ratio").
DWCONV_KERNEL = 7
# torchvision's ImageNet statistics, which the original's timm pipeline uses.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class MambaOutConfig:
  """Everything that defines a MambaOut network.

  Attributes:
    depths: Gated CNN blocks per stage (Femto (3, 3, 9, 3)).
    widths: channels per stage (Femto (48, 96, 192, 288)); widths[0] must be
      even (the stem's first conv has widths[0] // 2 channels).
    num_classes: classifier outputs.
    dtype: compute dtype, "float32" or "bfloat16" ("float64", with
      jax_enable_x64, is for numerical gradient checks). Parameters are
      always float32; LayerNorm statistics, the residual stream between
      blocks, the global mean and the returned logits are in `stream_dtype`
      (float32, or float64 with float64 compute).
    drop_path_rate: stochastic depth of the last block; rates rise linearly
      from 0 at the first block (the original's schedule). Active only in
      train mode (`model.train()`, nnx's default; `model.eval()` turns it
      off) and then needs a "dropout" (or default) rng stream.
    normalize: subtract the ImageNet mean and divide by its std after
      scaling pixels to [0, 1]; False feeds the [0, 1] pixels as they are.
  """
  depths: tuple[int, ...] = (3, 3, 9, 3)
  widths: tuple[int, ...] = (48, 96, 192, 288)
  num_classes: int = 1000
  dtype: str = "float32"
  drop_path_rate: float = 0.0
  normalize: bool = True

  def __post_init__(self):
    # Lists are accepted and stored as tuples, so configs stay hashable.
    object.__setattr__(self, "depths", tuple(self.depths))
    object.__setattr__(self, "widths", tuple(self.widths))
    if self.dtype not in _DTYPES:
      raise ValueError(f"MambaOutConfig.dtype={self.dtype!r}; choose one of {sorted(_DTYPES)}")
    if not self.depths or len(self.depths) != len(self.widths):
      raise ValueError(f"MambaOutConfig needs one width per stage and at least one stage; "
                       f"got depths={self.depths}, widths={self.widths}")
    if any(d < 1 for d in self.depths):
      raise ValueError(f"MambaOutConfig.depths={self.depths}: every stage needs >= 1 block")
    if any(w < 2 for w in self.widths):
      raise ValueError(f"MambaOutConfig.widths={self.widths}: every width must be >= 2")
    if self.widths[0] % 2:
      raise ValueError(f"MambaOutConfig.widths[0]={self.widths[0]} must be even (the stem's "
                       f"first conv has widths[0] // 2 channels)")
    if self.num_classes < 1:
      raise ValueError(f"MambaOutConfig.num_classes={self.num_classes} must be >= 1")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"MambaOutConfig.drop_path_rate={self.drop_path_rate} must be in [0, 1)")

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def stream_dtype(self):
    """The compute dtype, but at least float32 (see `dtype`)."""
    return jnp.promote_types(self.compute_dtype, jnp.float32)


VARIANTS = {
    # Not one of the paper's sizes: a half-depth, two-thirds-width Femto for
    # quick runs at small resolutions (2,497,484 parameters at 1000 classes).
    "pico": MambaOutConfig(depths=(2, 2, 4, 2), widths=(32, 64, 128, 192)),
    # The paper's sizes; published parameters at 1000 classes in comments.
    "femto": MambaOutConfig(depths=(3, 3, 9, 3), widths=(48, 96, 192, 288)),  # 7.3 M
    "kobe": MambaOutConfig(depths=(3, 3, 15, 3), widths=(48, 96, 192, 288)),  # 9.1 M
    "tiny": MambaOutConfig(depths=(3, 3, 9, 3), widths=(96, 192, 384, 576)),  # 26.5 M
    "small": MambaOutConfig(depths=(3, 4, 27, 3), widths=(96, 192, 384, 576)),  # 48.5 M
    "base": MambaOutConfig(depths=(3, 4, 27, 3), widths=(128, 256, 512, 768)),  # 84.8 M
}


def get_config(variant: str, **overrides) -> MambaOutConfig:
  """The config of a named size (see `VARIANTS`), with field overrides."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown MambaOut variant {variant!r}; known: {sorted(VARIANTS)}")
  return dataclasses.replace(VARIANTS[variant], **overrides)


def hidden_width(dim: int) -> int:
  """The Gated CNN block's hidden width e = int(8/3 d) (fc1 gives 2e)."""
  return int(8 / 3 * dim)


def _weight_init():
  # jax's truncated normal cuts at +-2 std; the original's trunc_normal_(std
  # 0.02) cuts at +-2 absolute (effectively a plain normal). Either way the
  # weights are N(0, 0.02)-like; the exact tail does not matter for training.
  return jax.nn.initializers.truncated_normal(stddev=0.02)


def _conv(in_features: int, out_features: int, kernel: int, stride: int, dtype, rngs: nnx.Rngs,
          groups: int = 1) -> nnx.Conv:
  """A k x k conv with bias and torch's symmetric padding k // 2 (not "SAME").

  With stride 2, "SAME" would pad an even side by (0, 1) instead of (1, 1)
  and shift every output by half a pixel from the original's.
  """
  pad = kernel // 2
  return nnx.Conv(in_features, out_features, (kernel, kernel), strides=stride,
                  padding=((pad, pad), (pad, pad)), feature_group_count=groups, dtype=dtype,
                  kernel_init=_weight_init(), bias_init=nnx.initializers.zeros, rngs=rngs)


def _linear(in_features: int, out_features: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, dtype=dtype, kernel_init=_weight_init(),
                    bias_init=nnx.initializers.zeros, rngs=rngs)


def _layer_norm(dim: int, out_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over the last axis, statistics at least float32, output in out_dtype.

  The two-pass variance (use_fast_variance=False) is torch's; E[x^2] - E[x]^2
  loses precision when the mean is large against the spread.
  """
  return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=out_dtype, use_fast_variance=False,
                       rngs=rngs)


def _gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)


class Stem(nnx.Module):
  """Two stride-2 3x3 convs: (b, H, W, 3) -> (b, ceil(H/4), ceil(W/4), d_1) stream_dtype."""

  def __init__(self, width: int, dtype, stream_dtype, *, rngs: nnx.Rngs):
    self.conv1 = _conv(3, width // 2, 3, 2, dtype, rngs)
    self.norm1 = _layer_norm(width // 2, dtype, rngs)
    self.conv2 = _conv(width // 2, width, 3, 2, dtype, rngs)
    # Its output is the first value of the residual stream.
    self.norm2 = _layer_norm(width, stream_dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = _gelu(self.norm1(self.conv1(x)))
    return self.norm2(self.conv2(x))


class Downsample(nnx.Module):
  """Stride-2 3x3 conv + LN: (b, h, w, d_in) -> (b, ceil(h/2), ceil(w/2), d_out) stream_dtype."""

  def __init__(self, in_width: int, out_width: int, dtype, stream_dtype, *, rngs: nnx.Rngs):
    self.conv = _conv(in_width, out_width, 3, 2, dtype, rngs)
    self.norm = _layer_norm(out_width, stream_dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.conv(x))


class GatedCNNBlock(nnx.Module):
  """x + fc2(gelu(g) * concat(i, dwconv7x7(c))), g, i, c = split(fc1(LN(x)))."""

  def __init__(self, dim: int, dtype, drop_path: float = 0.0, *, rngs: nnx.Rngs,
               drop_rngs: nnx.RngStream | None = None):
    """Makes the block.

    Args:
      dim: d, the stage's width.
      dtype: compute dtype of the norm's output, the linears and the conv.
      drop_path: probability of dropping the branch of an example (training).
      rngs: parameter initialisation.
      drop_rngs: the stream drop path draws from; needed if drop_path > 0.
    """
    self.dim = dim
    self.hidden = hidden_width(dim)
    self.norm = _layer_norm(dim, dtype, rngs)
    self.fc1 = _linear(dim, 2 * self.hidden, dtype, rngs)
    self.conv = _conv(dim, dim, DWCONV_KERNEL, 1, dtype, rngs, groups=dim)
    self.fc2 = _linear(self.hidden, dim, dtype, rngs)
    # Drop path is dropout of a whole example's branch: one Bernoulli per
    # example, broadcast over (h, w, d), kept branches scaled by 1 / (1 - p).
    self.drop_path = (nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=drop_rngs)
                      if drop_path > 0 else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (b, h, w, d) residual stream (stream_dtype) -> (b, h, w, d), x's dtype."""
    g, i, c = jnp.split(self.fc1(self.norm(x)), [self.hidden, 2 * self.hidden - self.dim],
                        axis=-1)  # (b, h, w, e), (b, h, w, e - d), (b, h, w, d)
    branch = self.fc2(_gelu(g) * jnp.concatenate([i, self.conv(c)], axis=-1))
    if self.drop_path is not None:
      branch = self.drop_path(branch)
    return x + branch.astype(x.dtype)


class Head(nnx.Module):
  """LN(mean) -> Linear(d, 4d) -> GELU -> LN -> Linear(4d, K): (b, d) -> (b, K) stream_dtype."""

  def __init__(self, dim: int, num_classes: int, dtype, stream_dtype, *, rngs: nnx.Rngs):
    self.stream_dtype = stream_dtype
    self.norm = _layer_norm(dim, dtype, rngs)
    self.fc1 = _linear(dim, HEAD_RATIO * dim, dtype, rngs)
    self.norm_hidden = _layer_norm(HEAD_RATIO * dim, dtype, rngs)
    self.fc2 = _linear(HEAD_RATIO * dim, num_classes, dtype, rngs)

  def __call__(self, pooled: jax.Array) -> jax.Array:
    x = self.norm_hidden(_gelu(self.fc1(self.norm(pooled))))
    return self.fc2(x).astype(self.stream_dtype)


class MambaOut(nnx.Module):
  """The MambaOut classifier (see the module docstring)."""

  def __init__(self, config: MambaOutConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = config.compute_dtype
    # Forked whatever the rate, so that the parameters drawn from the same
    # rngs do not depend on drop_path_rate (each Dropout forking rngs itself
    # would advance the default stream when no "dropout" one is given).
    has_stream = "dropout" in rngs or "default" in rngs
    drop_rngs = rngs["dropout"].fork() if has_stream else None
    if config.drop_path_rate > 0 and drop_rngs is None:
      raise ValueError(f"drop_path_rate={config.drop_path_rate} needs a 'dropout' or default "
                       f"rng stream; rngs has {sorted(name for name, _ in rngs.items())}")
    stream = config.stream_dtype
    self.stem = Stem(config.widths[0], dtype, stream, rngs=rngs)
    self.downsamples = nnx.List([
        Downsample(w_in, w_out, dtype, stream, rngs=rngs)
        for w_in, w_out in zip(config.widths[:-1], config.widths[1:])])
    rates = np.linspace(0.0, config.drop_path_rate, sum(config.depths)).tolist()
    self.stages = nnx.List()
    for depth, width in zip(config.depths, config.widths):
      self.stages.append(nnx.List([
          GatedCNNBlock(width, dtype, rates.pop(0), rngs=rngs, drop_rngs=drop_rngs)
          for _ in range(depth)]))
    self.head = Head(config.widths[-1], config.num_classes, dtype, stream, rngs=rngs)

  def normalize(self, images: jax.Array) -> jax.Array:
    """(b, H, W, 3) uint8 or float in [0, 1] -> (b, H, W, 3) compute dtype."""
    x = images.astype(self.config.stream_dtype)
    if images.dtype == jnp.uint8:
      x = x / 255.0
    if self.config.normalize:
      x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return x.astype(self.config.compute_dtype)

  def features(self, images: jax.Array) -> jax.Array:
    """(b, H, W, 3) images -> (b, ceil(H/32), ceil(W/32), d_last) stream_dtype.

    With S stages (4 in every preset) the map is ceil(H / 2^(S+1)) high.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"MambaOut takes (batch, height, width, 3) images; got {images.shape}")
    x = self.stem(self.normalize(images))
    for s, blocks in enumerate(self.stages):
      if s > 0:
        x = self.downsamples[s - 1](x)
      for block in blocks:
        x = block(x)
    return x

  def __call__(self, images: jax.Array) -> jax.Array:
    """(b, H, W, 3) uint8 or float in [0, 1] images -> (b, K) logits, stream_dtype."""
    return self.head(jnp.mean(self.features(images), axis=(1, 2)))


def param_count(model: nnx.Module) -> int:
  """Number of scalar parameters (works on `nnx.eval_shape` models too)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def forward_macs(config: MambaOutConfig, height: int, width: int) -> int:
  """Multiply-accumulates of the convs and linears for one (height, width) image.

  Norms, GELUs, the gating product and pooling are left out. At 224 x 224
  this gives Femto 1.15 G, Kobe 1.51 G, Tiny 4.47 G, Small 8.94 G against the
  original's published "MACs" of 1.2, 1.5, 4.5 and 9.0 G (its counter's
  exact scope is not stated). XLA's cost analysis counts 2 FLOPs per MAC plus
  the elementwise work (Femto at 224: 2.51 GFLOP).
  """
  def down(n):
    return -(-n // 2)  # ceil(n / 2): a 3x3 stride-2 conv padded by 1.

  def conv(h, w, k, c_in, c_out, groups=1):
    return h * w * k * k * (c_in // groups) * c_out

  w0 = config.widths[0]
  h, w = down(height), down(width)
  macs = conv(h, w, 3, 3, w0 // 2)
  h, w = down(h), down(w)
  macs += conv(h, w, 3, w0 // 2, w0)
  for s, (depth, dim) in enumerate(zip(config.depths, config.widths)):
    if s > 0:
      h, w = down(h), down(w)
      macs += conv(h, w, 3, config.widths[s - 1], dim)
    e = hidden_width(dim)
    block = h * w * (dim * 2 * e + e * dim) + conv(h, w, DWCONV_KERNEL, dim, dim, groups=dim)
    macs += depth * block
  d = config.widths[-1]
  macs += d * HEAD_RATIO * d + HEAD_RATIO * d * config.num_classes
  return macs

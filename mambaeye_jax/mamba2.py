"""The Mamba2 mixer (mamba_ssm's `Mamba2` with MambaEye's settings), in Flax NNX.

Dimension letters: b batch, t time, d model dim, e d_inner = expand * d,
h heads, p headdim, g groups, n d_state, k conv taps.

Parallel form (`__call__`) for whole sequences, and a one-token recurrent
form (`step`) whose cache is the SSM state plus the last k - 1 conv inputs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kernels import conv as conv_lib
from kernels import conv_reference
from kernels import ssd as ssd_lib
from mambaeye_jax import layers


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
  """Sizes of one Mamba2 mixer (mamba_ssm defaults, as MambaEye uses them)."""
  dim: int = 256
  d_state: int = 64
  d_conv: int = 4
  expand: int = 2
  headdim: int = 64
  ngroups: int = 1
  chunk_size: int = 256

  def __post_init__(self):
    if self.d_inner % self.headdim:
      raise ValueError(f"d_inner={self.d_inner} must be a multiple of {self.headdim=}")
    if self.nheads % self.ngroups:
      raise ValueError(f"nheads={self.nheads} must be a multiple of {self.ngroups=}")

  @property
  def d_inner(self) -> int:
    return self.expand * self.dim

  @property
  def nheads(self) -> int:
    return self.d_inner // self.headdim

  @property
  def conv_dim(self) -> int:
    return self.d_inner + 2 * self.ngroups * self.d_state

  @property
  def in_proj_dim(self) -> int:
    return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads


class MixerCache(NamedTuple):
  """Recurrent state of one mixer.

  conv: (b, k - 1, conv_dim) the last conv inputs, oldest first.
  ssm: (b, h, p, n) float32 SSM state.
  """
  conv: jax.Array
  ssm: jax.Array


def _uniform(low: float, high: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, low, high)
  return init


class Mamba2(nnx.Module):
  """One Mamba2 mixer: in_proj, causal conv, SSD, gated RMSNorm, out_proj."""

  # in_proj's products (z, x, BC, dt; see `_project`): how many copies of its
  # input the block's norm hands out.
  NUM_PROJECTIONS = 4

  def __init__(self, config: Mamba2Config, *, depth: int, rngs: nnx.Rngs,
               dtype=jnp.float32, ssd_impl: str = "auto"):
    """Creates the parameters with mamba_ssm's initialisation.

    Args:
      config: sizes.
      depth: number of layers in the stack (out_proj is scaled by 1/sqrt(depth)).
      rngs: random streams.
      dtype: compute dtype of matmuls and SSD operands (params stay float32).
      ssd_impl: a `kernels.dispatch.SSDImpl` name.
    """
    c = config
    self.config = config
    self.dtype = dtype
    self.ssd_impl = ssd_impl
    self.in_proj = nnx.Linear(
        c.dim, c.in_proj_dim, use_bias=False, dtype=dtype,
        kernel_init=layers.torch_default_init(), rngs=rngs)
    # Conv weights stored (k, conv_dim): tap k - 1 multiplies the newest input.
    bound = 1.0 / math.sqrt(c.d_conv)  # PyTorch Conv1d default, fan_in = 1 * k.
    self.conv_kernel = nnx.Param(_uniform(-bound, bound)(rngs.params(), (c.d_conv, c.conv_dim)))
    self.conv_bias = nnx.Param(_uniform(-bound, bound)(rngs.params(), (c.conv_dim,)))
    # dt initialised log-uniform in [1e-3, 1e-1]; the bias is its inverse softplus.
    dt = jnp.exp(_uniform(math.log(1e-3), math.log(1e-1))(rngs.params(), (c.nheads,)))
    dt = jnp.maximum(dt, 1e-4)
    self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))
    self.A_log = nnx.Param(jnp.log(_uniform(1.0, 16.0)(rngs.params(), (c.nheads,))))
    self.D = nnx.Param(jnp.ones((c.nheads,), jnp.float32))
    self.norm = layers.GatedRMSNorm(c.d_inner, c.d_inner // c.ngroups)
    # mamba_ssm rescales out_proj by 1/sqrt(depth) (one residual per layer):
    # the variance of the default init divided by depth.
    out_init = jax.nn.initializers.variance_scaling(1.0 / (3.0 * depth), "fan_in", "uniform")
    self.out_proj = nnx.Linear(c.d_inner, c.dim, use_bias=False, dtype=dtype,
                               kernel_init=out_init, rngs=rngs)

  def _project(self, u: jax.Array | Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """in_proj as one product per consumer.

    Args:
      u: (..., d) input, or `NUM_PROJECTIONS` arrays holding the same values,
        one per product (z, x, BC, dt), whose input gradients then stay apart
        (`kernels.norms.add_rms_norm(copies=...)` adds them in its backward pass).

    Returns:
      z (..., e), x (..., e), BC (..., 2 g n), dt (..., h), in the compute
      dtype; x then BC are the conv's input channels in order.

    The checkpoint's single (d, in_proj_dim) matrix is split by columns
    rather than its product: each consumer then reads a contiguous array, and
    the backward pass adds input gradients instead of concatenating output
    gradients (measured on an H100: the slices and the concatenation cost
    ~0.3 ms a layer at 65k tokens, more than the extra additions).
    """
    kernel = self.in_proj.kernel[...]
    bounds = self._column_bounds()
    inputs = (u,) * len(bounds) if isinstance(u, jax.Array) else tuple(u)
    if len(inputs) != len(bounds):
      raise ValueError(f"in_proj takes one input or {len(bounds)}, got {len(inputs)}")
    return tuple(layers.dense(x, kernel[:, lo:hi], None, self.dtype)
                 for x, (lo, hi) in zip(inputs, bounds))

  def _column_bounds(self) -> list[tuple[int, int]]:
    """[lo, hi) of z, x, BC, dt in in_proj's output (conv channels: x, BC).

    B and C share one product and one conv launch (64 columns each are too
    few to keep apart: two more launches a layer each way).
    """
    c = self.config
    widths = (c.d_inner, c.d_inner, 2 * c.ngroups * c.d_state, c.nheads)
    ends = [sum(widths[:i + 1]) for i in range(len(widths))]
    return list(zip([0] + ends[:-1], ends))

  def _conv_silu(self, parts, segment_ids):
    """The conv + SiLU of x and BC, each with its own slice of the conv weights."""
    lo0 = self._column_bounds()[1][0]
    out = []
    for part, (lo, hi) in zip(parts, self._column_bounds()[1:3]):
      channels = slice(lo - lo0, hi - lo0)
      out.append(conv_lib.causal_conv_silu(
          part, self.conv_kernel[...][:, channels], self.conv_bias[...][channels],
          segment_ids, self.dtype, impl=self.ssd_impl))
    return out

  def _heads(self, x, bc):
    """x (..., e), BC (..., 2 g n) -> x (..., h, p), BC (..., 2 g, n).

    B and C stay packed in one array (B's groups, then C's), as the SSD
    accepts them: split apart here they would be two copies for a kernel.
    """
    c = self.config
    shape = x.shape[:-1]
    return (x.reshape(*shape, c.nheads, c.headdim),
            bc.reshape(*shape, 2 * c.ngroups, c.d_state))

  def __call__(self, u: jax.Array | Sequence[jax.Array],
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Parallel form.

    Args:
      u: (b, t, d) input (normalised residual stream), or NUM_PROJECTIONS
        such arrays, one per input product (see `_project`).
      segment_ids: (b, t) int or None; conv and SSM state reset where it changes.

    Returns:
      (b, t, d) in the compute dtype.
    """
    c = self.config
    z, x, bc, dt = self._project(u)
    x, bc = self._heads(*self._conv_silu((x, bc), segment_ids))
    y = ssd_lib.ssd(
        x, dt.astype(jnp.float32), -jnp.exp(self.A_log[...]), bc, None, self.D[...],
        dt_bias=self.dt_bias[...], dt_softplus=True, segment_ids=segment_ids,
        chunk_size=c.chunk_size, impl=self.ssd_impl)
    y = y.reshape(*y.shape[:-2], c.d_inner)
    normed = self.norm(y, z, out_dtype=self.dtype,
                       impl=self.ssd_impl)
    return layers.dense(normed, self.out_proj.kernel[...], None, self.dtype)

  def init_cache(self, batch: int) -> MixerCache:
    """Zero state for `batch` sequences."""
    c = self.config
    return MixerCache(
        conv=jnp.zeros((batch, c.d_conv - 1, c.conv_dim), jnp.float32),
        ssm=jnp.zeros((batch, c.nheads, c.headdim, c.d_state), jnp.float32))

  def step(self, u: jax.Array, cache: MixerCache) -> tuple[jax.Array, MixerCache]:
    """One token of the recurrence.

    Args:
      u: (b, d) input of this step.
      cache: the state after the previous steps.

    Returns:
      (b, d) output in the compute dtype, and the new cache.
    """
    c = self.config
    z, x, bc, dt = self._project(u)
    xbc = jnp.concatenate([x, bc], axis=-1)
    conv_out = conv_reference.causal_depthwise_conv(
        xbc[:, None], self.conv_kernel[...], self.conv_bias[...], history=cache.conv)[:, 0]
    new_conv = jnp.concatenate([cache.conv[:, 1:], xbc[:, None].astype(jnp.float32)], axis=1)
    x, bc = self._heads(*jnp.split(jax.nn.silu(conv_out).astype(self.dtype),
                                    [c.d_inner], axis=-1))
    B, C = jnp.split(bc, 2, axis=-2)
    x, B, C = (v.astype(jnp.float32) for v in (x, B, C))
    dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...])  # (b, h)
    A = -jnp.exp(self.A_log[...])
    heads_per_group = c.nheads // c.ngroups
    B = jnp.repeat(B, heads_per_group, axis=1)  # (b, h, n)
    C = jnp.repeat(C, heads_per_group, axis=1)
    ssm = (jnp.exp(dt * A)[..., None, None] * cache.ssm
           + (dt[..., None] * x)[..., None] * B[:, :, None, :])
    y = jnp.einsum("bhpn,bhn->bhp", ssm, C, precision=jax.lax.Precision.HIGHEST)
    y = y + self.D[...][:, None] * x
    y = self.norm(y.reshape(-1, c.d_inner), z)
    out = layers.dense(y, self.out_proj.kernel[...], None, self.dtype)
    return out, MixerCache(conv=new_conv, ssm=ssm)

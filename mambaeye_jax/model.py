"""MambaEye: class logits at every step of a causal glimpse sequence.

Dimension letters: b batch, t glimpses, d model dim (256), K classes,
L layers (depth).

    input_t  = concat(patch_t / 255 or patch_t, move_embedding(pos_t - pos_{t-1}))
    hidden   = silu(init_fc(input))                       (b, t, d)
    for each layer:  residual = hidden + residual  (f32)
                     hidden   = Mamba2(RMSNorm(residual))
    logits   = head(RMSNorm_f(hidden + residual))          (b, t, K)

The layers are stored stacked (every parameter has a leading axis of size L)
and unrolled (the default, faster on GPUs) or applied with `lax.scan`
(`ModelConfig.scan_layers=True`: compile time does not grow with depth).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kernels import norms
from mambaeye_jax import glimpse
from mambaeye_jax import layers
from mambaeye_jax import mamba2
from mambaeye_jax.data import geometry

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that defines a MambaEye network.

  Attributes:
    depth: number of Mamba2 blocks (Tiny 12, Small 24, Base 48).
    dim: model width (256 for every published size).
    num_classes: classifier outputs.
    d_state, d_conv, expand, headdim, ngroups, chunk_size: Mamba2 sizes.
    dtype: compute dtype, "float32" or "bfloat16" (params are always f32;
      the residual stream, norms and SSD state stay f32).
    ssd_impl: a `kernels.dispatch.SSDImpl` name ("auto" picks per backend).
    remat: recompute each block in the backward pass (less memory).
    scan_layers: apply the blocks with `lax.scan` (compile time independent
      of depth). The default, False, unrolls them in Python, which lets XLA
      keep each layer's saved activations in their own buffers instead of
      copying them into stacked ones, and schedule across layers (H100,
      Tiny, batch 64: training 43.0 -> 35.2 ms, inference 28.7 -> 26.5 ms
      when introduced); compiles take longer with depth.
  """
  depth: int = 12
  dim: int = 256
  num_classes: int = 1000
  d_state: int = 64
  d_conv: int = 4
  expand: int = 2
  headdim: int = 64
  ngroups: int = 1
  chunk_size: int = 256
  dtype: str = "float32"
  ssd_impl: str = "auto"
  remat: bool = False
  scan_layers: bool = False

  def __post_init__(self):
    if self.dtype not in _DTYPES:
      raise ValueError(f"ModelConfig.dtype={self.dtype!r}; choose one of {sorted(_DTYPES)}")
    if self.depth < 1:
      raise ValueError(f"ModelConfig.depth={self.depth} must be >= 1")
    _ = self.mixer  # Validates the mixer's sizes now, not at first use.

  @property
  def mixer(self) -> mamba2.Mamba2Config:
    return mamba2.Mamba2Config(
        dim=self.dim, d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
        headdim=self.headdim, ngroups=self.ngroups, chunk_size=self.chunk_size)

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]


VARIANTS = {
    "tiny": ModelConfig(depth=12),
    "small": ModelConfig(depth=24),
    "base": ModelConfig(depth=48),
}


def get_config(variant: str, **overrides) -> ModelConfig:
  """The config of a named size ("tiny", "small", "base"), with overrides."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown MambaEye variant {variant!r}; known: {sorted(VARIANTS)}")
  return dataclasses.replace(VARIANTS[variant], **overrides)


class Block(nnx.Module):
  """Pre-norm block: hidden = Mamba2(RMSNorm(residual))."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.norm = layers.RMSNorm(config.dim)
    self.mixer = mamba2.Mamba2(config.mixer, depth=config.depth, rngs=rngs,
                               dtype=config.compute_dtype, ssd_impl=config.ssd_impl)


class Cache(NamedTuple):
  """Streaming state of the whole network.

  conv: (L, b, k - 1, conv_dim) per-layer conv history.
  ssm: (L, b, h, p, n) per-layer SSM state, float32.
  position: (b, 2) int32 the last glimpse's corner (for the next move).
  steps: (b,) int32 glimpses seen so far.
  """
  conv: jax.Array
  ssm: jax.Array
  position: jax.Array
  steps: jax.Array


class MambaEye(nnx.Module):
  """The MambaEye classifier (see the module docstring)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = config.compute_dtype
    input_dim = geometry.PATCH_DIM + geometry.MOVE_DIM
    # PyTorch's default Linear init, weights and biases, for the two layers
    # outside the Mamba2 backbone (as the official model leaves them).
    self.init_fc = nnx.Linear(input_dim, config.dim,
                              dtype=dtype, kernel_init=layers.torch_default_init(),
                              bias_init=layers.torch_default_bias_init(input_dim),
                              rngs=rngs)

    @nnx.split_rngs(splits=config.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(config, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.norm_f = layers.RMSNorm(config.dim)
    self.head = nnx.Linear(config.dim, config.num_classes, dtype=dtype,
                           kernel_init=layers.torch_default_init(),
                           bias_init=layers.torch_default_bias_init(config.dim),
                           rngs=rngs)

  def embed(self, patches: jax.Array, positions: jax.Array,
            segment_ids: jax.Array | None = None) -> jax.Array:
    """Glimpse features -> initial hidden states.

    Args:
      patches: (b, t, 768) uint8 pixels (divided by 255 here) or floats
        already in [0, 1], in (channel, row, col) order.
      positions: (b, t, 2) int (row, col) canvas corners.
      segment_ids: (b, t) int or None; a new segment starts with move (0, 0).

    Returns:
      (b, t, d) in the compute dtype.
    """
    if patches.shape[-1] != geometry.PATCH_DIM:
      raise ValueError(f"patches must be (batch, glimpses, {geometry.PATCH_DIM}), "
                       f"got {patches.shape}")
    if positions.shape != (*patches.shape[:-1], 2):
      raise ValueError(f"positions must be {(*patches.shape[:-1], 2)}, got {positions.shape}")
    return self._embed_moves(patches, glimpse.moves_from_positions_jax(positions, segment_ids))

  def _embed_moves(self, patches: jax.Array, moves: jax.Array) -> jax.Array:
    """patches: (..., 768); moves: (..., 2) int -> (..., d) compute dtype."""
    if jnp.issubdtype(patches.dtype, jnp.integer):
      pixels = patches.astype(jnp.float32) / 255.0
    else:
      pixels = patches.astype(jnp.float32)
    features = jnp.concatenate([pixels, glimpse.move_embedding_jax(moves)], axis=-1)
    return jax.nn.silu(layers.dense(features, self.init_fc.kernel[...], self.init_fc.bias[...],
                                    self.config.compute_dtype))

  def _logits(self, normed: jax.Array) -> jax.Array:
    """(..., d) final-norm output -> (..., num_classes) float32 logits."""
    return layers.dense(normed, self.head.kernel[...], self.head.bias[...],
                        self.config.compute_dtype).astype(jnp.float32)

  def __call__(self, patches: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Parallel forward over whole sequences.

    Args:
      patches: (b, t, 768) uint8 or float in [0, 1].
      positions: (b, t, 2) int canvas corners.
      segment_ids: (b, t) int or None. Several sequences packed in one row
        (ids 1, 2, ...) never see each other; padding may carry any id since
        it comes after the real steps of a causal model.

    Returns:
      logits: (b, t, num_classes) float32.
    """
    hidden = self.embed(patches, positions, segment_ids)
    block_def, block_state = nnx.split(self.blocks)
    impl = self.config.ssd_impl

    def body(carry, state):
      hidden, residual = carry
      block = nnx.merge(block_def, state)
      # One copy of the normed input per in_proj product: their gradients
      # are added inside the norm's backward pass.
      residual, normed = norms.add_rms_norm(hidden, residual, block.norm.weight[...],
                                            block.norm.eps, self.config.compute_dtype, impl,
                                             copies=block.mixer.NUM_PROJECTIONS)
      hidden = block.mixer(normed, segment_ids)
      return (hidden, residual), None

    if self.config.remat:
      # Inside a scan, CSE cannot undo the recomputation and preventing it
      # costs speed; unrolled, XLA would merge it back into the forward.
      body = jax.checkpoint(body, prevent_cse=not self.config.scan_layers)
    carry = (hidden, jnp.zeros(hidden.shape, jnp.float32))
    if self.config.scan_layers:
      (hidden, residual), _ = jax.lax.scan(body, carry, block_state)
    else:
      for layer in range(self.config.depth):
        carry, _ = body(carry, jax.tree.map(lambda p, i=layer: p[i], block_state))
      hidden, residual = carry
    _, out = norms.add_rms_norm(hidden, residual, self.norm_f.weight[...], self.norm_f.eps,
                                self.config.compute_dtype, impl)
    return self._logits(out)

  def init_cache(self, batch: int) -> Cache:
    """Empty streaming state for `batch` sequences."""
    c = self.config.mixer
    L = self.config.depth
    return Cache(
        conv=jnp.zeros((L, batch, c.d_conv - 1, c.conv_dim), jnp.float32),
        ssm=jnp.zeros((L, batch, c.nheads, c.headdim, c.d_state), jnp.float32),
        position=jnp.zeros((batch, 2), jnp.int32),
        steps=jnp.zeros((batch,), jnp.int32))

  def step(self, patch: jax.Array, position: jax.Array,
           cache: Cache) -> tuple[jax.Array, Cache]:
    """One glimpse in constant memory.

    Args:
      patch: (b, 768) uint8 or float.
      position: (b, 2) int canvas corner of this glimpse.
      cache: state after the previous glimpses (`init_cache` at the start).

    Returns:
      logits (b, num_classes) float32 for this step, and the new cache.
    """
    position = position.astype(jnp.int32)
    # The first glimpse moves by (0, 0): use its own position as "previous".
    prev = jnp.where((cache.steps == 0)[:, None], position, cache.position)
    hidden = self._embed_moves(patch, position - prev)
    block_def, block_state = nnx.split(self.blocks)

    def body(carry, inputs):
      hidden, residual = carry
      state, conv, ssm = inputs
      block = nnx.merge(block_def, state)
      residual = hidden.astype(jnp.float32) + residual
      hidden, new = block.mixer.step(block.norm(residual), mamba2.MixerCache(conv, ssm))
      return (hidden, residual), (new.conv, new.ssm)

    residual0 = jnp.zeros(hidden.shape, jnp.float32)
    (hidden, residual), (conv, ssm) = jax.lax.scan(
        body, (hidden, residual0), (block_state, cache.conv, cache.ssm))
    out = self.norm_f(hidden.astype(jnp.float32) + residual)
    logits = self._logits(out)
    return logits, Cache(conv=conv, ssm=ssm, position=position, steps=cache.steps + 1)

  def jit_step(self) -> Callable[[jax.Array, jax.Array, Cache], tuple[jax.Array, Cache]]:
    """`step`, compiled once: the function to call in a per-glimpse loop.

        step = model.jit_step()
        cache = model.init_cache(batch)
        for t in range(T):
          logits_t, cache = step(patches[:, t], positions[:, t], cache)

    Eager `step` dispatches every operation from Python (0.55 s a glimpse
    for Tiny on a CPU); the compiled one runs in milliseconds. It holds a
    snapshot of the parameters taken now: call `jit_step` again after
    changing them. Models of one structure share the compilation.

    Returns:
      step(patch (b, 768), position (b, 2), cache) -> (logits (b, K)
      float32, cache), as `step`.
    """
    graphdef, state = nnx.split(self)
    return functools.partial(_compiled_step(graphdef), state)

  def jit_forward(self) -> Callable[..., jax.Array]:
    """`__call__`, compiled (per input shape): the parallel forward without
    Python dispatching every operation. Holds a snapshot of the parameters
    taken now, as `jit_step`.

    Returns:
      forward(patches (b, t, 768), positions (b, t, 2), segment_ids=None)
      -> logits (b, t, num_classes) float32.
    """
    graphdef, state = nnx.split(self)
    return functools.partial(_compiled_forward(graphdef), state)

  def stream(self, patches: jax.Array, positions: jax.Array,
             cache: Cache | None = None) -> tuple[jax.Array, Cache]:
    """Several glimpses through the streaming path, compiled.

    Feeding a sequence in pieces (each call continuing from the last
    call's cache) gives the logits of `__call__` on the whole sequence, in
    memory that does not grow with its length. Compiles once per piece
    length t.

    Args:
      patches: (b, t, 768) uint8 or float in [0, 1].
      positions: (b, t, 2) int canvas corners.
      cache: the state after earlier glimpses; None starts a new sequence.

    Returns:
      logits (b, t, num_classes) float32, and the cache after the last one.
    """
    patches, positions = jnp.asarray(patches), jnp.asarray(positions)
    if patches.ndim != 3 or patches.shape[-1] != geometry.PATCH_DIM:
      raise ValueError(f"patches must be (batch, glimpses, {geometry.PATCH_DIM}), "
                       f"got {patches.shape}")
    if positions.shape != (*patches.shape[:-1], 2):
      raise ValueError(f"positions must be {(*patches.shape[:-1], 2)}, got {positions.shape}")
    if cache is None:
      cache = self.init_cache(patches.shape[0])
    graphdef, state = nnx.split(self)
    return _compiled_stream(graphdef)(state, patches, positions, cache)


@functools.lru_cache(maxsize=8)
def _compiled_step(graphdef):
  """The jitted `MambaEye.step` of one model structure (cached: each call of
  `jit_step` reuses the compilation)."""
  def step(state, patch, position, cache):
    return nnx.merge(graphdef, state).step(patch, position, cache)
  return jax.jit(step)


@functools.lru_cache(maxsize=8)
def _compiled_forward(graphdef):
  """The jitted `MambaEye.__call__` of one model structure."""
  def forward(state, patches, positions, segment_ids=None):
    return nnx.merge(graphdef, state)(patches, positions, segment_ids)
  return jax.jit(forward)


@functools.lru_cache(maxsize=8)
def _compiled_stream(graphdef):
  """The jitted `MambaEye.stream`: `step` scanned over the glimpse axis."""
  def stream(state, patches, positions, cache):
    model = nnx.merge(graphdef, state)

    def body(cache, inputs):
      logits, cache = model.step(*inputs, cache)
      return cache, logits

    # Scan over time: (b, t, ...) -> (t, b, ...) and the logits back.
    cache, logits = jax.lax.scan(
        body, cache, (jnp.swapaxes(patches, 0, 1), jnp.swapaxes(positions, 0, 1)))
    return jnp.swapaxes(logits, 0, 1), cache
  return jax.jit(stream)


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

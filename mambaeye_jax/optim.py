"""The official optimiser: AdamW, cosine schedule with linear warm-up, clipping.

    lr(s) = peak * s / warmup                          for s < warmup
          = end + (peak - end) * (1 + cos(pi * u)) / 2  u = (s - warmup) / (total - warmup)
    update = AdamW(clip_by_global_norm(grad, clip), lr(s), betas, eps, wd * mask)

Weight decay follows mamba_ssm and the usual timm grouping by default
(`decay="matrices"`): matrices and conv kernels decay; biases, every norm
weight and the SSM's own parameters (`A_log`, `D`, `dt_bias`, which
mamba_ssm marks `_no_weight_decay`) do not. `decay="all"` decays every
parameter, as `torch.optim.AdamW(model.parameters())` does in the official
CIFAR harness (`official/cifar_official.py`); over its 1,953 steps at
lr <= 1e-3 and wd 0.05 that shrinks the undecayed parameters by ~5% more
(docs/fidelity.md).
MambaEye stores its blocks stacked (a leading depth axis), so the choice is
made from the parameter's name, never from its rank.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import optax

# Leaf names that decay. Everything else (bias, conv_bias, norm weights,
# A_log, D, dt_bias) is excluded.
DECAYED_LEAVES = frozenset({"kernel", "conv_kernel"})
DECAY_CHOICES = ("matrices", "all")
# Named for the error message and the docs: mamba_ssm's `_no_weight_decay`.
SSM_NO_DECAY = frozenset({"A_log", "D", "dt_bias"})


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimiser hyper-parameters (the official recipe by default).

  Attributes:
    learning_rate: peak learning rate.
    b1, b2, eps: Adam moments and epsilon (torch.optim.AdamW's defaults).
    weight_decay: decoupled decay, multiplied by the learning rate as in
      torch's AdamW.
    clip_norm: global gradient norm clip; <= 0 disables clipping.
    warmup_steps: linear warm-up from 0 to the peak.
    total_steps: schedule length; the cosine ends here.
    end_lr_ratio: final learning rate as a fraction of the peak.
    decay: which parameters weight decay applies to, "matrices" or "all".
  """
  learning_rate: float = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.05
  clip_norm: float = 1.0
  warmup_steps: int = 0
  total_steps: int = 1
  end_lr_ratio: float = 0.0
  decay: str = "matrices"

  def __post_init__(self):
    if self.decay not in DECAY_CHOICES:
      raise ValueError(f"OptimConfig.decay={self.decay!r} must be one of {DECAY_CHOICES}")
    if self.total_steps < 1:
      raise ValueError(f"OptimConfig.total_steps={self.total_steps} must be >= 1")
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(f"OptimConfig.warmup_steps={self.warmup_steps} must lie in "
                       f"[0, total_steps={self.total_steps}]")
    if self.learning_rate <= 0:
      raise ValueError(f"OptimConfig.learning_rate={self.learning_rate} must be > 0")


def config_dict(warmup_epochs: float = 20.0) -> ml_collections.ConfigDict:
  """The optimiser's fields as a training config group (`c.optim`).

  Official values; the warm-up is given in epochs (`warmup_steps` >= 0
  overrides it), which a trainer turns into `OptimConfig.warmup_steps`.
  """
  c = ml_collections.ConfigDict()
  c.learning_rate = 1e-3
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.05
  c.clip_norm = 1.0
  c.warmup_epochs = float(warmup_epochs)
  c.warmup_steps = -1  # >= 0 overrides warmup_epochs.
  c.end_lr_ratio = 0.0
  c.decay = "matrices"  # or "all", as the official CIFAR harness.
  return c


def learning_rate_schedule(config: OptimConfig) -> optax.Schedule:
  """step (int scalar) -> learning rate (f32 scalar); see the module docstring."""
  end = config.learning_rate * config.end_lr_ratio
  if config.warmup_steps >= config.total_steps:
    return optax.linear_schedule(0.0, config.learning_rate, config.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps, decay_steps=config.total_steps,
      end_value=end)


def _leaf_name(path) -> str:
  last = path[-1]
  for attr in ("key", "name", "idx"):
    if hasattr(last, attr):
      return str(getattr(last, attr))
  return str(last)


def decay_mask(params: Any) -> Any:
  """Same-structure tree of bools: True where weight decay applies.

  Args:
    params: the parameter tree (nested dict or nnx.State), leaves any shape.

  Returns:
    A tree of Python bools with the structure of `params`.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _leaf_name(path) in DECAYED_LEAVES, params)


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
  """AdamW with the schedule, clipping and decay mask of the module docstring."""
  parts = []
  if config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts.append(optax.adamw(
      learning_rate=learning_rate_schedule(config), b1=config.b1, b2=config.b2,
      eps=config.eps, weight_decay=config.weight_decay,
      mask=decay_mask if config.decay == "matrices" else None))
  return optax.chain(*parts)

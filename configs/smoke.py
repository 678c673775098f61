r"""Smoke test: a one-block MambaEye on generated data, a few steps (CI).

Command:
    python train.py --config configs/smoke.py --workdir /tmp/mambaeye_smoke

Exercises the whole tool once (real Grain pipeline on SyntheticShapes,
sharded step, metrics, asynchronous checkpoints, model export) in seconds;
it learns nothing worth reporting.

Hardware and time: any CPU; about 30 s on 2 busy CPU cores, most of it
compilation (measured 2026-11-22).
Expected result: 6 steps, a loss near ln(10) = 2.30, WORKDIR/model written.
"""

from mambaeye_jax import train_lib


def get_config(arg: str = ""):
  del arg
  c = train_lib.default_config()
  c.model = train_lib.model_config_dict(
      "tiny", depth=1, dim=32, d_state=8, headdim=32, num_classes=10, chunk_size=8)
  c.data.source = "synthetic"
  c.data.synthetic_size = 64
  c.data.num_glimpses = 16
  c.data.canvas_min = 32
  c.data.canvas_max = 48
  # The slow PIL paths are covered by the pipeline's own tests.
  c.data.augment.blur_prob = 0.0
  c.data.augment.perspective_prob = 0.0
  c.global_batch_size = 8
  c.num_train_steps = 6
  c.optim.warmup_steps = 2
  c.log_every_steps = 2
  c.checkpoint_every_steps = 3
  c.accuracy_at = (4,)
  return c

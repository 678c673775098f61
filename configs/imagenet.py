r"""The official ImageNet-1K recipe, shared by the mambaeye_*_i1k configs.

DESIGN.md section 3: AdamW lr 1e-3, betas (0.9, 0.999), weight decay 0.05,
cosine schedule with 20 warm-up epochs of 300, gradient clip 1.0, global
batch 1024, T = 1024 glimpses, canvas 256..1024, the official augmentation,
no Mixup/CutMix. The official code trains in float32 (TF32); these configs
use bfloat16 compute with float32 master weights (--config.model.dtype=float32
for the official precision) with the blocks unrolled and nothing recomputed
in the backward pass (model.remat=False): on one H100 that is the fastest
form and fits in 8 GB per 64 sequences of 1024 glimpses (docs/training.md).

Config argument (after the colon): "tfds" (default; imagenet2012 via TFDS,
--config.data.path = TFDS data_dir), "folder" (the official layout
root/<class>/<image>, --config.data.path = root) or "arrayrecord"
(--config.data.path = shard glob).
"""

import ml_collections

from mambaeye_jax import train_lib

IMAGENET_TRAIN_IMAGES = 1_281_167


def imagenet_config(variant: str, arg: str = "") -> ml_collections.ConfigDict:
  """The official recipe for `variant` ("tiny", "small", "base") from source `arg`."""
  source = arg or "tfds"
  if source not in ("tfds", "folder", "arrayrecord"):
    raise ValueError(f"config argument {source!r}: choose tfds, folder or arrayrecord")
  c = train_lib.default_config()
  # On one H100, Tiny batch 64 T=1024 bf16 (Pallas kernels), bench_model.py:
  # unrolled without remat ~32 ms at 7.9 GB; with remat (lax.scan) 43 ms at
  # 2.5 GB. --config.model.remat=True trades speed for memory.
  c.model = train_lib.model_config_dict(variant, num_classes=1000, dtype="bfloat16")
  c.data.source = source
  if source == "tfds":
    c.data.tfds_name = "imagenet2012"
    c.data.split = "train"
  c.data.num_glimpses = 1024
  c.data.canvas_min = 256
  c.data.canvas_max = 1024
  c.data.worker_count = 16  # Grain processes per host; official loading costs
  c.data.read_threads = 4  # ~92 ms of a core per sample (DESIGN.md section 4).
  c.train_examples = IMAGENET_TRAIN_IMAGES
  c.global_batch_size = 1024
  c.num_epochs = 300.0
  c.optim.learning_rate = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.05
  c.optim.clip_norm = 1.0
  c.optim.warmup_epochs = 20.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.accuracy_at = (16, 64, 256)
  return c

r"""MambaEye-Tiny on CIFAR-10 from the official folder layout.

Data (once): the project's archive, extracted outside the repository:
    mkdir -p ~/data && tar xzf ../shared/data/cifar10_train.tar.gz -C ~/data
which gives ~/data/cifar10/train/<class>/<n>.jpg (50,000 32x32 JPEGs).

Command:
    python train.py --config configs/cifar10.py:$HOME/data --workdir /tmp/mambaeye_cifar10

The config argument is the directory holding cifar10/ (default "data").
Canvas and T are scaled to 32x32 images: canvas 32..64 (images are enlarged
to fit it, as the official transform does), T = 128 glimpses, 100 epochs,
warm-up 5, global batch 256, bfloat16 compute (see configs/imagenet.py).

Hardware and time: not yet measured.
Expected result: not yet measured.
"""

import os

from mambaeye_jax import train_lib

CIFAR10_TRAIN_IMAGES = 50_000


def get_config(arg: str = ""):
  root = arg or "data"
  c = train_lib.default_config()
  c.model = train_lib.model_config_dict("tiny", num_classes=10, dtype="bfloat16",
                                        chunk_size=128)
  c.data.source = "folder"
  c.data.path = os.path.join(root, "cifar10", "train")
  c.data.num_glimpses = 128
  c.data.canvas_min = 32
  c.data.canvas_max = 64
  c.data.worker_count = 8
  c.train_examples = CIFAR10_TRAIN_IMAGES
  c.global_batch_size = 256
  c.num_epochs = 100.0
  c.optim.warmup_epochs = 5.0
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.accuracy_at = (4, 16, 64)
  return c

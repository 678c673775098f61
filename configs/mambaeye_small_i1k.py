r"""MambaEye-Small on ImageNet-1K, the official recipe (see configs/imagenet.py).

Command (one host; add --coordinator_address/--num_processes/--process_id
per host of a pod):
    python train.py --config configs/mambaeye_small_i1k.py:tfds \
        --config.data.path=$TFDS_DATA_DIR --workdir $WORKDIR

Hardware and time: not yet measured (300 epochs = 375,342 steps at global
batch 1024).
Expected result: not yet measured here; the paper reports 72.7% top-1 at
512^2 with T = 4096 for the official PyTorch training of this size.
"""

from configs import imagenet


def get_config(arg: str = ""):
  return imagenet.imagenet_config("small", arg)

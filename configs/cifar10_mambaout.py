r"""The MambaOut baseline (DESIGN.md section 7) on CIFAR-10, folder layout.

Data (once), as configs/cifar10.py, plus the test split:
    mkdir -p ~/data && tar xzf ../shared/data/cifar10_train.tar.gz -C ~/data
    tar xzf ../shared/data/cifar10_test.tar.gz -C ~/data
which gives ~/data/cifar10/{train,test}/<class>/<n>.jpg (32x32 JPEGs).

Command:
    python -m mambaeye_jax.mambaout_train \
        --config configs/cifar10_mambaout.py:$HOME/data --workdir /tmp/mambaout_cifar10

The config argument is the directory holding cifar10/ (default "data").
It trains, writes WORKDIR/params.msgpack, then evaluates the 10,000 test
images at MambaEye's canvases 32, 48, 64, 96, 128, 192 and 256 (each image
resized to C x C, bicubic: the "fit" of a square image) into
WORKDIR/results.json and results.md. `--eval_only` re-evaluates a trained
workdir; `--config.data.resample=lanczos` uses MambaEye's own fit filter.

Recipe: MambaOut-Femto (7.3 M parameters at 1000 classes, 6.16 M here;
forward 23.7 M multiply-accumulates per 32x32 image by
`mambaout.forward_macs`, so ~0.14 GFLOP per training image with the
backward), 10 classes, bfloat16 compute, input side S = 32. Augmentation:
the standard light CNN recipe on CIFAR, zero-pad 4 + random 32x32 crop +
horizontal flip (no random resized crop, colour jitter, mixup or drop
path; label smoothing 0). AdamW lr 2e-3, betas (0.9, 0.999), weight decay
0.05 on conv and linear kernels only (not biases or LayerNorm scales),
gradient clip 1.0, linear warm-up 2 epochs then cosine to 0, global batch
256, 30 epochs (5,859 steps). 30 epochs x 50,000 images x 0.14 GFLOP is
2.1e14 FLOP: seconds of H100 compute; the step rate at batch 256 and
32x32 (kernel launches, not FLOPs) and the data workers decide the time.

Hardware and time (2026-12-06, one H100, 16 CPU cores, 12 data workers),
two runs. The first: 171.2 s of training, the 73 s first step
(compilation, decoded-image cache) included; 14-21 ms steps, data wait
6-9%; last log line "step 5859/5859 (100.0%) | loss 0.2499 | acc 90.9% |
14713 img/s | 17.4 ms/step | data wait 6%" (accuracy on the augmented
training batches). The second, sharing the GPU and the cores with an
eval.py grid: 115.0 s of training (52 s first step), last line "step
5859/5859 (100.0%) | loss 0.2562 | acc 91.0% | 24570 img/s | 10.4 ms/step
| data wait 6%"; the evaluation of the seven canvases took 164 s.

Result: top-1 % on the 10,000 test images, each image resized to the
canvas (the second run; the first scored 83.48 at canvas 32 and was cut
off after it; docs/results/cifar10/mambaout_h100.json):

    canvas   32      48      64      96      128     192     256
    top-1    83.33   35.34   22.99   14.73   13.60   13.19   13.34

Trained at one size, it reads only that size: at 1.5x it loses 48 points,
from 3x on it is near chance (10%). docs/RESULTS.md section 4 sets it
beside MambaEye.
"""

import os

from mambaeye_jax import mambaout_train


def get_config(arg: str = ""):
  root = arg or "data"
  c = mambaout_train.default_config()
  c.model = mambaout_train.model_config_dict("femto", num_classes=10, dtype="bfloat16")
  c.data.train_path = os.path.join(root, "cifar10", "train")
  c.data.test_path = os.path.join(root, "cifar10", "test")
  c.data.image_size = 32
  c.data.crop_padding = 4
  c.data.hflip = True
  c.data.cache_decoded = True
  c.data.worker_count = 12
  c.data.read_threads = 2
  c.global_batch_size = 256
  c.num_epochs = 30.0
  c.optim.learning_rate = 2e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_epochs = 2.0
  c.eval_canvases = mambaout_train.MAMBAEYE_CANVASES
  c.eval_batch_size = 512
  c.log_every_steps = 200
  return c

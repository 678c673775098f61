"""benchmarks/profile_step.py: reading kernels of one GPU out of a trace."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

import profile_step  # pylint: disable=g-import-not-at-top,wrong-import-position


def _meta(kind, pid, name, tid=None):
  event = {"ph": "M", "name": kind, "pid": pid, "args": {"name": name}}
  if tid is not None:
    event["tid"] = tid
  return event


def test_device_kernels_keeps_one_gpus_stream_kernels():
  events = [
      _meta("process_name", 1, "/device:GPU:0 (pid 1)"),
      _meta("process_name", 2, "/device:GPU:1 (pid 2)"),
      _meta("process_name", 3, "/device:GPU:10 (pid 3)"),
      _meta("process_name", 4, "/host:CPU"),
      _meta("thread_name", 1, "Stream #13(Compute)", tid=7),
      _meta("thread_name", 1, "XLA Ops", tid=8),
      _meta("thread_name", 2, "Stream #13(Compute)", tid=7),
      _meta("thread_name", 3, "Stream #13(Compute)", tid=7),
      _meta("thread_name", 4, "Stream host", tid=7),
  ]
  kernel = lambda pid, tid, name: {"ph": "X", "pid": pid, "tid": tid, "name": name, "dur": 5}
  events += [kernel(1, 7, "gemm0"), kernel(1, 8, "op row"), kernel(2, 7, "gemm1"),
             kernel(3, 7, "gemm10"), kernel(4, 7, "host")]
  assert [e["name"] for e in profile_step.device_kernels(events)] == ["gemm0"]
  assert [e["name"] for e in profile_step.device_kernels(events, 1)] == ["gemm1"]

"""Tests of the Pallas TPU SSD kernels (kernels/ssd_pallas_tpu.py).

One test class runs twice: with the Pallas TPU interpreter on any backend (the
kernels' own logic on CPU, forward and custom-VJP backward) and compiled,
skipped unless a TPU is present. Export tests lower forward and VJP for TPU
from this machine at MambaEye and LM shapes. Shapes are kept small: the file
must run in well under three minutes on a 2-core CPU.
"""

import base64
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels.ssd_pallas_tpu import SSDTpuBlockSizes
from kernels.ssd_pallas_tpu import ssd_pallas_tpu
from kernels.ssd_pallas_tpu import ssd_pallas_tpu_with_blocks
from kernels.ssd_reference import ssd_sequential

F32, BF16 = jnp.float32, jnp.bfloat16
# max |kernel - oracle| / max |oracle|. The oracle runs in f32 on the same
# (possibly bf16) inputs; bf16 mode has bf16 matmul operands and output.
TOL = {F32: 1e-4, BF16: 1.5e-2}


def _rel_err(a, b):
  a = np.asarray(jnp.asarray(a, F32))
  b = np.asarray(jnp.asarray(b, F32))
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _inputs(seed, *, b, l, h, g, p, n, dtype, n_resets=0):
  """Random SSD inputs; dt is raw (use dt_softplus=True) so decays are < 1.

  Returns:
    dict with x (b, l, h, p), dt (b, l, h), A (h,), B, C (b, l, g, n),
    D (h,), dt_bias (h,), initial_state (b, h, p, n) f32, segment_ids (b, l)
    with `n_resets` id changes per row, alternating ids 0, 1, 0, ... so from
    two resets on, an id comes back (the state must still reset there).
  """
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  segment_ids = np.zeros((b, l), np.int32)
  rng = np.random.default_rng(seed)
  for row in range(b):
    cuts = np.sort(rng.choice(np.arange(1, l), n_resets, replace=False))
    for k, cut in enumerate(cuts):
      segment_ids[row, cut:] = (k + 1) % 2  # ids 0, 1, 0, 1, ...: non-monotone
  return dict(
      x=jax.random.normal(ks[0], (b, l, h, p)).astype(dtype),
      dt=jax.random.normal(ks[1], (b, l, h)) - 1.0,
      # Per-token decays from ~0.998 to ~0.7: the slow heads carry state
      # across whole chunks, so chunk-to-chunk passing is really tested.
      A=-jnp.exp(jnp.linspace(-5.0, 0.0, h)
                 + 0.1 * jax.random.normal(ks[2], (h,))),
      B=jax.random.normal(ks[3], (b, l, g, n)).astype(dtype),
      C=jax.random.normal(ks[4], (b, l, g, n)).astype(dtype),
      D=jax.random.normal(ks[5], (h,)),
      dt_bias=0.5 * jax.random.normal(ks[6], (h,)),
      initial_state=jax.random.normal(ks[7], (b, h, p, n)),
      segment_ids=jnp.asarray(segment_ids))


def _call(fn, inp, *, use, **kw):
  """Calls an SSD implementation with the optional inputs named in `use`.

  A `chunk_size` that is an `SSDTpuBlockSizes` selects
  `ssd_pallas_tpu_with_blocks` for the kernel.
  """
  opt = {k: inp[k] for k in ("dt_bias", "initial_state", "segment_ids")
         if k in use}
  d = inp["D"] if "D" in use else None
  blocks = kw.get("chunk_size")
  if fn is ssd_pallas_tpu and isinstance(blocks, SSDTpuBlockSizes):
    del kw["chunk_size"]
    fn = functools.partial(ssd_pallas_tpu_with_blocks, blocks)
  return fn(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], d,
            dt_softplus=True, **opt, **kw)


ALL = ("D", "dt_bias", "initial_state", "segment_ids")

# name: (shape kwargs, dtype, optional inputs used, SSDTpuBlockSizes or
#        chunk_size, resets per row). Default heads_per_block is the group size
#        (up to 8).
FORWARD_CASES = {
    # odd length over 3 chunks, 2 groups of 2 heads (2 per block), all on.
    "f32_full": (dict(b=2, l=300, h=4, g=2, p=16, n=16), F32, ALL, 128, 3),
    "bf16_full_chunk256": (dict(b=2, l=300, h=4, g=2, p=16, n=32), BF16, ALL,
                           256, 3),
    # shorter than one chunk, nothing optional, one head per group and block.
    "f32_plain_short": (dict(b=1, l=50, h=2, g=2, p=8, n=8), F32, (), 128, 0),
    # exactly two chunks (no padding), initial state only.
    "f32_exact_chunks": (dict(b=1, l=256, h=2, g=1, p=8, n=16), F32,
                         ("initial_state",), 128, 0),
}
GRAD_CASES = {
    "f32_full": FORWARD_CASES["f32_full"],
    "bf16_full": (dict(b=2, l=300, h=4, g=2, p=16, n=16), BF16, ALL, 128, 3),
    "f32_plain_short": FORWARD_CASES["f32_plain_short"],
    # 4 heads of one group in 2 blocks of 2: dB, dC summed across blocks.
    "f32_two_blocks_per_group": (
        dict(b=1, l=200, h=4, g=1, p=8, n=16), F32, ALL,
        SSDTpuBlockSizes(chunk_size=128, heads_per_block=2), 2),
}


@pytest.fixture(params=["interpret", "compiled"])
def interpret(request):
  """The `interpret` argument for each mode; compiled needs a TPU."""
  if request.param == "compiled":
    if jax.default_backend() != "tpu":
      pytest.skip("compiled Pallas TPU kernels need a TPU")
    yield False
    return
  # The TPU interpreter (not plain `interpret=True`) fills fresh buffers and
  # scratch with NaN and raises on out-of-bounds block reads, so a kernel
  # that reads state it never wrote fails here.
  yield pltpu.InterpretParams()
  # After an exception inside an interpreted kernel the interpreter's state
  # must be reset, or later tests fail for no reason of their own.
  pltpu.reset_tpu_interpret_mode_state()


class TestSSDPallasTpu:

  @pytest.mark.parametrize("case", list(FORWARD_CASES))
  def test_forward_matches_oracle(self, interpret, case):
    shape, dtype, use, chunk, resets = FORWARD_CASES[case]
    inp = _inputs(1, **shape, dtype=dtype, n_resets=resets)
    y, final = _call(ssd_pallas_tpu, inp, use=use, return_final_state=True,
                     chunk_size=chunk, interpret=interpret)
    f32_inp = {k: (v.astype(F32) if v.dtype == BF16 else v)
               for k, v in inp.items()}
    y_ref, final_ref = _call(ssd_sequential, f32_inp, use=use,
                             return_final_state=True)
    assert y.dtype == inp["x"].dtype and y.shape == inp["x"].shape
    assert final.dtype == F32 and final.shape == (shape["b"], shape["h"],
                                                  shape["p"], shape["n"])
    assert _rel_err(y, y_ref) < TOL[dtype]
    assert _rel_err(final, final_ref) < TOL[dtype]
    # The data must exercise each option: dropping one changes the oracle by
    # several times the tolerance.
    q = chunk if isinstance(chunk, int) else chunk.chunk_size
    if shape["l"] > q:
      # History from before the first chunk boundary must matter after it.
      cut = {k: (v[:, q:] if k in ("x", "dt", "B", "C", "segment_ids")
                 else v) for k, v in f32_inp.items()}
      y_cut = _call(ssd_sequential, cut, use=tuple(o for o in use
                                                   if o != "initial_state"))
      assert _rel_err(y_cut, y_ref[:, q:]) > 2 * TOL[dtype]
    for opt in use:
      less = tuple(o for o in use if o != opt)
      y_less, final_less = _call(ssd_sequential, f32_inp, use=less,
                                 return_final_state=True)
      assert max(_rel_err(y_less, y_ref),
                 _rel_err(final_less, final_ref)) > 2 * TOL[dtype], opt

  @pytest.mark.parametrize("case", list(GRAD_CASES))
  def test_grads_match_oracle(self, interpret, case):
    shape, dtype, use, chunk, resets = GRAD_CASES[case]
    inp = _inputs(2, **shape, dtype=dtype, n_resets=resets)
    names = ["x", "dt", "A", "B", "C"] + [k for k in ("D", "dt_bias",
                                                      "initial_state")
                                          if k in use]
    ky, kf = jax.random.split(jax.random.PRNGKey(3))
    wy = jax.random.normal(ky, inp["x"].shape)
    wf = jax.random.normal(kf, inp["initial_state"].shape)

    def loss(fn, diff, **kw):
      y, final = _call(fn, {**inp, **diff}, use=use, return_final_state=True,
                       **kw)
      return jnp.sum(y.astype(F32) * wy) + jnp.sum(final * wf)

    diff = {k: inp[k] for k in names}
    grads = jax.grad(lambda d: loss(ssd_pallas_tpu, d, chunk_size=chunk,
                                    interpret=interpret))(diff)
    ref = jax.grad(lambda d: loss(ssd_sequential, d))(
        {k: v.astype(F32) for k, v in diff.items()})
    for k in names:
      assert grads[k].dtype == inp[k].dtype, k
      assert grads[k].shape == inp[k].shape, k
      assert _rel_err(grads[k], ref[k]) < TOL[dtype], k

  def test_segments_isolate(self, interpret):
    """Changing a segment's tokens changes nothing after the next reset."""
    inp = _inputs(4, b=1, l=200, h=2, g=1, p=8, n=8, dtype=F32)
    seg = np.zeros((1, 200), np.int32)
    seg[:, 70:] = 1
    seg[:, 150:] = 0  # back to an earlier id: still a reset.
    inp["segment_ids"] = jnp.asarray(seg)
    use = ("initial_state", "segment_ids")
    y = _call(ssd_pallas_tpu, inp, use=use, interpret=interpret)
    bumped = dict(inp, x=inp["x"].at[:, 80:90].add(5.0))
    y2 = _call(ssd_pallas_tpu, bumped, use=use, interpret=interpret)
    np.testing.assert_array_equal(y[:, :80], y2[:, :80])
    np.testing.assert_array_equal(y[:, 150:], y2[:, 150:])
    assert float(jnp.max(jnp.abs(y[:, 80:150] - y2[:, 80:150]))) > 1e-2


def test_plain_interpret_true_also_runs():
  """`interpret=True` (the generic interpreter) gives the same answer."""
  inp = _inputs(5, b=1, l=130, h=2, g=1, p=8, n=8, dtype=F32, n_resets=1)
  y = _call(ssd_pallas_tpu, inp, use=ALL, interpret=True)
  y_ref = _call(ssd_sequential, inp, use=ALL)
  assert _rel_err(y, y_ref) < TOL[F32]


def test_block_sizes_validation():
  with pytest.raises(ValueError, match="chunk_size=100 must be a multiple"):
    SSDTpuBlockSizes(chunk_size=100)
  with pytest.raises(ValueError, match="chunk_size=100 must be a multiple"):
    inp = _inputs(0, b=1, l=8, h=1, g=1, p=8, n=8, dtype=F32)
    _call(ssd_pallas_tpu, inp, use=(), chunk_size=100, interpret=True)
  with pytest.raises(ValueError, match="needs .* MiB of VMEM"):
    SSDTpuBlockSizes(chunk_size=1024).validate(1, 64, 128, BF16)
  SSDTpuBlockSizes(chunk_size=256).validate(8, 64, 128, BF16)  # fits.
  with pytest.raises(ValueError, match="heads_per_block=3 must divide "
                     "heads_per_group=4"):
    inp = _inputs(0, b=1, l=8, h=4, g=1, p=8, n=8, dtype=F32)
    _call(ssd_pallas_tpu, inp, use=(), interpret=True,
          chunk_size=SSDTpuBlockSizes(heads_per_block=3))


# name: (b, l, h, p, g, n, chunk_size)
EXPORT_SHAPES = {
    "mambaeye": (2, 1000, 8, 64, 1, 64, 256),
    "lm": (1, 2048, 24, 64, 1, 128, 128),
}


@pytest.mark.parametrize("kind", ["forward", "vjp"])
@pytest.mark.parametrize("shapes", list(EXPORT_SHAPES))
def test_exports_for_tpu(shapes, kind):
  """Lowers to Mosaic for TPU on this machine (Mosaic's own compile, in libtpu,
  is not run: that needs a TPU)."""
  b, l, h, p, g, n, chunk = EXPORT_SHAPES[shapes]
  s = jax.ShapeDtypeStruct
  args = (s((b, l, h, p), BF16), s((b, l, h), F32), s((h,), F32),
          s((b, l, g, n), BF16), s((b, l, g, n), BF16), s((h,), F32),
          s((h,), F32), s((b, h, p, n), F32), s((b, l), jnp.int32))

  def fwd(x, dt, A, B, C, D, dt_bias, init, seg):
    return ssd_pallas_tpu(x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=True,
                          initial_state=init, segment_ids=seg,
                          return_final_state=True, chunk_size=chunk)

  def vjp(*a):
    (y, final), pullback = jax.vjp(lambda *d: fwd(*d, a[-1]), *a[:-1])
    return pullback((jnp.ones_like(y), jnp.ones_like(final)))

  exported = jax.export.export(jax.jit(fwd if kind == "forward" else vjp),
                               platforms=["tpu"])(*args)
  assert exported.platforms == ("tpu",)
  text = exported.mlir_module()
  if kind == "forward":
    names = ["ssd_tpu_fwd"]
    assert [a.shape for a in exported.out_avals] == [(b, l, h, p),
                                                     (b, h, p, n)]
  else:
    names = ["ssd_tpu_fwd_states", "ssd_tpu_bwd"]
    assert [a.shape for a in exported.out_avals] == [x.shape for x in args[:-1]]
  assert text.count("tpu_custom_call") == len(names)

  # Inside the Mosaic kernels: the grid semantics, the f32 state scratch of
  # heads_per_block (8 here) heads, and no vector transpose but of whole
  # (128k, 128m) tiles (Mosaic has rejected lane-padded ones).
  bodies = _mosaic_kernel_bodies(text)
  assert sorted(re.search(r"func\.func @(\w+)", m).group(1)
                for m in bodies) == sorted(names)
  for body in bodies:
    kernel = re.search(r"func\.func @ssd\w+\(.*", body).group(0)
    assert ("dimension_semantics = [#tpu.dimension_semantics<parallel>, "
            "#tpu.dimension_semantics<parallel>, "
            "#tpu.dimension_semantics<arbitrary>]") in kernel
    assert f"memref<8x{p}x{n}xf32, #tpu.memory_space<vmem>>)" in kernel
    assert "tpu.matmul" in body
    for src in re.findall(r"transpose %\S+, \[1, 0\] : vector<(\d+)x(\d+)x",
                          body):
      assert all(int(d) % 128 == 0 for d in src), src
  assert len(re.findall(r"tpu\.transpose", "".join(bodies))) == (
      0 if kind == "forward" else 2)


def _mosaic_kernel_bodies(hlo_text):
  """The Mosaic MLIR (text) of each TPU custom call in an exported module.

  The kernel travels serialized in the custom call's backend_config; this
  undoes that with jaxlib's own Mosaic dialect and serde pass. Skips if
  this jaxlib no longer offers them (nothing about the kernel is wrong then).
  """
  try:
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
    from jaxlib.mlir import ir  # pylint: disable=g-import-not-at-top
    from jaxlib.mlir.passmanager import PassManager  # pylint: disable=g-import-not-at-top
    from jaxlib.mosaic.python import tpu  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    pytest.skip(f"cannot decode Mosaic kernels with this jaxlib: {e}")
  bodies = []
  for m in re.finditer(r'backend_config = "((?:[^"\\]|\\.)*)"', hlo_text):
    config = re.sub(r"\\([0-9A-Fa-f]{2})",
                    lambda c: chr(int(c.group(1), 16)), m.group(1))
    blob = base64.b64decode(json.loads(config)["custom_call_config"]["body"])
    ctx = mlir.make_ir_context()
    tpu.register_dialect(ctx)
    with ctx:
      ctx.allow_unregistered_dialects = True
      module = ir.Module.parse(blob)
      PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(
          module.operation)
      bodies.append(str(module))
  return bodies

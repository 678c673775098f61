"""The SSD scan under the name the README and older code use.

The implementation choice lives in `kernels.dispatch` (`SSDImpl`,
`resolve_impl`) and the scan's dispatch in `kernels.ssd`; this module only
re-exports them, so `mambaeye_jax.ssd.resolve_impl` keeps working.
"""

from kernels.dispatch import SSDImpl  # pylint: disable=unused-import
from kernels.dispatch import resolve_impl  # pylint: disable=unused-import
from kernels.ssd import get_ssd_fn  # pylint: disable=unused-import
from kernels.ssd import shard_over_batch  # pylint: disable=unused-import
from kernels.ssd import ssd  # pylint: disable=unused-import

__all__ = ["SSDImpl", "get_ssd_fn", "resolve_impl", "shard_over_batch", "ssd"]

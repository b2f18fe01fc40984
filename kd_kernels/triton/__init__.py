"""Triton kernels of kd_kernels, one module per loss family (``kd_kernels.triton.<stem>``).

This package is import-light on purpose: importing it does not import Triton. Only the
modules inside (e.g. ``kd_kernels.triton.rkd``) import Triton, and the ops import those
lazily, when a call resolves to ``backend="triton"``. On the CPU the kernels run under the
Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
"""

__all__: list[str] = []

"""Triton kernels of the RKD distance and angle losses (forward and backward).

The four launchers, plugged into the ``kd_kernels::rkd_*`` ops for ``backend="triton"``, have
the signatures of ``kd_kernels.torch_impl.rkd``; they live in ``rkd_distance.py`` and
``rkd_angle.py`` and are re-exported here. The math (forward, backward, the near-duplicate
rule) is docs/rkd.md; each kernel states its formulas above its code.

What the kernels do. Every pairwise squared distance comes from a Gram tile of the
column-centred rows on tensor cores (``_tiles.gram_sqdist``: rows centred in registers, no
centred copy in memory), E_ij = s_i + s_j - 2 x~_i.x~_j. Pairs with E_ij < 2^-6 (s_i + s_j)
("near") are recomputed from explicit fp32 differences of the original rows, inside the kernel,
only in tiles that have one (a scalar branch on the tile, no host sync). Distance: near pairs are
left out of the Laplacian backward and added from explicit differences. Angle: anchors with a
near pair in the student or the teacher take upstream's explicit route (difference vectors,
psi from their dots, the v-form backward); all other anchors the E route over two [N, N] E
buffers.

Passes and memory. Distance: forward 2 passes over pair tiles (mu, then the loss), backward a
statistics pass plus one pass per needed gradient; O(N + D) extra memory besides the outputs.
Angle: one E pass per network (with the near-anchor flags), then the E-route and explicit
triple kernels; two [N, N] fp32 E buffers (and one [N, N] dLoss/dE per gradient).
Reductions use per-program partial buffers summed by torch; the backward's scatter into dX
uses ``sem="relaxed"`` atomics (their order makes the last bits of gradients run-dependent).

Configurations. Each kernel's launch configurations (BLOCK sizes, num_warps, num_stages) are
one table next to its launcher (``DISTANCE_CONFIGS``, ``ANGLE_CONFIGS``), picked by dtype and
width; under the interpreter one small 32-wide configuration. No autotuning.

Precision (docs/precision.md). fp16/bf16 tiles go to ``tl.dot`` in their own dtype with fp32
accumulation (the centred tile is rounded back to the input dtype before the dot); fp32 tiles
(and the fp32 difference tiles of the explicit route) use ``input_precision="tf32x3"``, or
``"tf32"`` when ``kd_kernels._backend.fp32_dot_precision()`` allows it, read at each call;
elementwise work and reductions are fp32. Only under the interpreter are tiles cast to fp32 and
multiplied with ``"ieee"``. float64 inputs are rejected (the ops route them to the PyTorch path).
Results come back in the student's dtype, gradients in each input's dtype, mu_s/mu_t in fp32.
"""

from __future__ import annotations

from kd_kernels.triton.rkd_angle import ANGLE_CONFIGS, rkd_angle_bwd_triton, rkd_angle_fwd_triton
from kd_kernels.triton.rkd_distance import DISTANCE_CONFIGS, rkd_distance_bwd_triton, rkd_distance_fwd_triton

__all__ = [
    "ANGLE_CONFIGS",
    "DISTANCE_CONFIGS",
    "rkd_angle_bwd_triton",
    "rkd_angle_fwd_triton",
    "rkd_distance_bwd_triton",
    "rkd_distance_fwd_triton",
]

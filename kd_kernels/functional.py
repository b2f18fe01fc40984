"""The functional API: one function per loss (see each family module for the math).

| family | module |
|---|---|
| RKD distance / angle | ``kd_kernels/losses/rkd.py`` |
| Gram, Procrustes, CKA, relation | ``kd_kernels/losses/geometry.py`` |
| SinKD and batched Sinkhorn | ``kd_kernels/losses/sinkhorn.py`` |
| KD, reverse KL, JSD, TVD, DIST, GRKD | ``kd_kernels/losses/logit.py`` |
| fused-linear KD and JSD (output head + divergence) | ``kd_kernels/losses/fused_linear.py`` |
"""

from kd_kernels.losses import fused_linear as _fused_linear
from kd_kernels.losses import geometry as _geometry
from kd_kernels.losses import logit as _logit
from kd_kernels.losses import rkd as _rkd
from kd_kernels.losses import sinkhorn as _sinkhorn

__all__: list[str] = []
for _m in (_rkd, _geometry, _sinkhorn, _logit, _fused_linear):
    for _name in getattr(_m, "__all__", []):
        if _name[0].islower():
            globals()[_name] = getattr(_m, _name)
            __all__.append(_name)
del _m

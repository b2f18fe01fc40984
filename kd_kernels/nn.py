"""``nn.Module`` wrappers: one per loss, same keyword defaults as the function, and
``forward(student, teacher)`` calls it. Defined beside their functions in
``kd_kernels/losses/<family>.py``."""

from kd_kernels.losses import geometry as _geometry
from kd_kernels.losses import logit as _logit
from kd_kernels.losses import rkd as _rkd
from kd_kernels.losses import sinkhorn as _sinkhorn

__all__: list[str] = []
for _m in (_rkd, _geometry, _sinkhorn, _logit):
    for _name in getattr(_m, "__all__", []):
        if _name[0].isupper():
            globals()[_name] = getattr(_m, _name)
            __all__.append(_name)
del _m

"""``nn.Module`` wrappers: one per loss, same keyword defaults as the function, and
``forward(student, teacher)`` calls it. Defined beside their functions in
``kd_kernels/losses/<family>.py`` (base class: ``kd_kernels/losses/_module.py``).

The constructor arguments are validated at construction, stored as plain attributes,
validated again on assignment and read at every ``forward``: a schedule such as
``loss_fn.temperature = t`` takes effect at the next call. Each class's docstring holds its
function's full docstring."""

from kd_kernels.losses import fused_linear as _fused_linear
from kd_kernels.losses import geometry as _geometry
from kd_kernels.losses import logit as _logit
from kd_kernels.losses import rkd as _rkd
from kd_kernels.losses import sinkhorn as _sinkhorn

__all__: list[str] = []
for _m in (_rkd, _geometry, _sinkhorn, _logit, _fused_linear):
    for _name in getattr(_m, "__all__", []):
        if _name[0].isupper() and _name != "TopKTeacher":  # a teacher container, not a module
            globals()[_name] = getattr(_m, _name)
            __all__.append(_name)
del _m

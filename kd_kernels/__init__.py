"""kd_kernels: fused, memory-efficient knowledge-distillation losses for PyTorch.

Importing this package never compiles code, never touches a GPU and never imports Triton;
the compiled CUDA extension ``kd_kernels._C`` is loaded on first use (or by
``build_info()``), and its absence is reported, never fatal.
"""

__version__ = "0.1.0"

from kd_kernels._backend import available_backends, build_info
from kd_kernels.functional import *
from kd_kernels.functional import __all__ as _functional_all
from kd_kernels.losses.logit import TopKTeacher
from kd_kernels.nn import *
from kd_kernels.nn import __all__ as _nn_all

__all__ = ["__version__", "build_info", "available_backends", "TopKTeacher"] + list(_functional_all) + list(_nn_all)

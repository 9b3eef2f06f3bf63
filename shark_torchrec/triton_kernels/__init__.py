"""Our row-group ops in Triton, for CUDA: the lookup (`mixed_lookup`) and the in-place row
update with stochastic rounding (`update_rows_`), with the arguments and results of the C++
ops in `shark_torchrec.kernels` (which serve the CPU), over the same group tables.

This package imports torch, triton and `shark_torchrec.precision` only: neither fbgemm_gpu,
nor torchrec, nor the C++ library, so that it runs on a machine with CUDA torch and triton
alone (`bench/gpu_kernels.py`). Its reference, `triton_kernels.reference`, is plain torch;
tests run the kernels on CPU through Triton's interpreter (`TRITON_INTERPRET=1`) against it,
and against the C++ ops, bit for bit.
"""

from shark_torchrec.triton_kernels.lookup import mixed_lookup
from shark_torchrec.triton_kernels.update import update_rows_

__all__ = ["mixed_lookup", "update_rows_"]

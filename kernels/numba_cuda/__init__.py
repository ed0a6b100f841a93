"""numba.cuda impls of the fused kernels (see launch.py for how they reach the GPU)."""

from ..numba_cuda.launch import compatible_numpy

compatible_numpy()  # before any kernel compiles: numba-cuda needs np.row_stack, gone in numpy 2.5

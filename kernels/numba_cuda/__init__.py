"""numba.cuda impls of the fused kernels (see launch.py for how they reach the GPU).

Each kernel is written out whole, its shared-memory tree reductions and loads included, with no
device functions: numba-cuda compiles a called function (``cuda.jit(device=True)`` or
``register_jitable``) through a dispatcher that asks the current device for its compute capability,
so a kernel that calls one can no longer be compiled to PTX on a machine without a GPU
(tests/kernels/test_gpu_compile.py). The repeats are checked against the numpy references under
the CUDA simulator (tests/cudasim).
"""

from ..numba_cuda.launch import compatible_numpy

compatible_numpy()  # before any kernel compiles: numba-cuda needs np.row_stack, gone in numpy 2.5

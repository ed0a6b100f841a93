// Layer norm for __half and __nv_bfloat16 x: the instantiations of layer_norm.cuh (algorithm and
// entry points there), mirrored by CONFIGS in kernels/cuda/layer_norm.py. Statistics, sums and
// partial rows in float; y and dx rounded once to x's type. Weight and bias are x's type, or
// float (the w32 instances: PyTorch's mixed-dtype rule; they have no _plain backward, which has no
// weight); dw and db come back in weight's type.
//
// 8 values per 16-byte pack: forward on chip up to D = 16384 (16 per thread x 1024), backward up
// to 4096 (8 x 512), as float32: at 16 values per thread the backward's registers (the row in
// float, the prefetched next row, the weights and the column sums) spilled.
#include "layer_norm.cuh"

LN_FWD_BLOCK(__half, __half, float, f16, 8)
LN_FWD_BLOCK(__half, __half, float, f16, 16)
LN_FWD_STREAM(__half, __half, float, f16)
LN_BWD_BLOCK(__half, __half, float, f16, 8, 1)
LN_BWD_STREAM(__half, __half, float, f16)
LN_COL_REDUCE(__half, float, f16)

LN_FWD_BLOCK(__half, float, float, f16w32, 8)
LN_FWD_BLOCK(__half, float, float, f16w32, 16)
LN_FWD_STREAM(__half, float, float, f16w32)
LN_BWD_BLOCK_W32(__half, float, f16w32, 8, 1)
LN_BWD_STREAM_W32(__half, float, f16w32)
LN_COL_REDUCE(float, float, f32)

LN_FWD_BLOCK(__nv_bfloat16, __nv_bfloat16, float, bf16, 8)
LN_FWD_BLOCK(__nv_bfloat16, __nv_bfloat16, float, bf16, 16)
LN_FWD_STREAM(__nv_bfloat16, __nv_bfloat16, float, bf16)
LN_BWD_BLOCK(__nv_bfloat16, __nv_bfloat16, float, bf16, 8, 1)
LN_BWD_STREAM(__nv_bfloat16, __nv_bfloat16, float, bf16)
LN_COL_REDUCE(__nv_bfloat16, float, bf16)

LN_FWD_BLOCK(__nv_bfloat16, float, float, bf16w32, 8)
LN_FWD_BLOCK(__nv_bfloat16, float, float, bf16w32, 16)
LN_FWD_STREAM(__nv_bfloat16, float, float, bf16w32)
LN_BWD_BLOCK_W32(__nv_bfloat16, float, bf16w32, 8, 1)
LN_BWD_STREAM_W32(__nv_bfloat16, float, bf16w32)

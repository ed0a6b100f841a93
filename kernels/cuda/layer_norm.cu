// Layer norm for float and double: the instantiations of layer_norm.cuh (algorithm and entry
// points there), mirrored by CONFIGS in kernels/cuda/layer_norm.py. The 16-bit types are in
// layer_norm_lowp.cu.
#include "layer_norm.cuh"

// float32: forward on chip up to D = 16384 (16 per thread x 1024), backward up to 4096 (8 x 512).
LN_FWD_BLOCK(float, float, float, f32, 4)
LN_FWD_BLOCK(float, float, float, f32, 8)
LN_FWD_BLOCK(float, float, float, f32, 16)
LN_FWD_STREAM(float, float, float, f32)
LN_BWD_BLOCK(float, float, float, f32, 4, 1)
LN_BWD_BLOCK(float, float, float, f32, 8, 1)
LN_BWD_STREAM(float, float, float, f32)
LN_COL_REDUCE(float, float, f32)
// float64: forward on chip up to D = 8192, backward up to 2048.
LN_FWD_BLOCK(double, double, double, f64, 2)
LN_FWD_BLOCK(double, double, double, f64, 4)
LN_FWD_BLOCK(double, double, double, f64, 8)
LN_FWD_STREAM(double, double, double, f64)
LN_BWD_BLOCK(double, double, double, f64, 2, 1)
LN_BWD_BLOCK(double, double, double, f64, 4, 1)
LN_BWD_STREAM(double, double, double, f64)
LN_COL_REDUCE(double, double, f64)

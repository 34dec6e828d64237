"""Are compile-time cluster dimensions (a __global__ redefinition in the header) honoured when MLX launches a
mx.fast.cuda_kernel? Each of 8 blocks writes %cluster_ctarank and %cluster_nctarank (GPU machine; session 6):

    python3 benchmarks/probe_cluster_rank.py; MLX_USE_CUDA_GRAPHS=0 python3 benchmarks/probe_cluster_rank.py
"""
import json, os, sys
import mlx.core as mx
header = r"""
#undef __global__
#define __global__ __attribute__((global)) __launch_bounds__(64, 1) __cluster_dims__(2, 1, 1)
"""
src = r"""
  unsigned r, n;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
  if (threadIdx.x == 0) { out[blockIdx.x * 2] = (int)r; out[blockIdx.x * 2 + 1] = (int)n; }
"""
k = mx.fast.cuda_kernel(name="probe_cluster_rank", input_names=["x"], output_names=["out"], source=src, header=header)
x = mx.zeros((1,))
(o,) = k(inputs=[x], output_shapes=[(16,)], output_dtypes=[mx.int32], grid=(8 * 64, 1, 1), threadgroup=(64, 1, 1),
         init_value=-7)
print(json.dumps({"graphs": os.environ.get("MLX_USE_CUDA_GRAPHS"), "rank_n": o.tolist()}))

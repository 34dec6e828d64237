"""Host cost of building one call (no evaluation): MLX's GEMM against quantized_linear, 1024x3072->3072 4-bit
(run on the GPU machine; on the CPU quantized_linear takes the reference path):

    python3 benchmarks/probe_host_cost.py
"""
import time, mlx.core as mx
from flashdiff.kernels import quantized_linear
x = mx.random.normal((1024, 3072)).astype(mx.bfloat16); w = (mx.random.normal((3072, 3072)) * 0.02).astype(mx.bfloat16)
wq, s, b = mx.quantize(w, 64, 4); mx.eval(x, w, wq, s, b)
def t(f, n=2000):
    mx.eval(f()); t0 = time.perf_counter()
    outs = [f() for _ in range(n)]  # kept alive: nothing is freed inside the timing
    elapsed = time.perf_counter() - t0
    del outs
    return elapsed / n * 1e6
print("host build us: matmul %.1f, quantized_linear %.1f" % (t(lambda: x @ w.T), t(lambda: quantized_linear(x, wq, s, b, 4, 64, "affine"))))

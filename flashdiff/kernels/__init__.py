"""Hot-path kernels. Each public function dispatches to a Metal, CUDA or pure-MLX implementation."""

from .attention import attention

__all__ = ["attention"]

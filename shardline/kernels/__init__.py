"""Quantized weight formats and their matmuls: NumPy reference, Numba CPU, Numba CUDA (lazy).

    from shardline.kernels import QuantizedWeight, QuantizedLinear, quantized_matmul, dequantize, quantize
"""
from .dispatch import QuantizedLinear, dequantize, quantized_matmul
from .formats import QType, QuantizedWeight, quantize

__all__ = ["QType", "QuantizedWeight", "QuantizedLinear", "quantize", "quantized_matmul",
           "dequantize"]

"""Fused kernels (Triton / CUDA) with pure-torch fallbacks.

No kernel exists yet.
"""

"""Triton kernels, installed as decovae_fast.kernels.

TRITON_OPS maps an op name to a callable with the same positional signature as the matching
decovae_fast.ops.reference function, differentiable (autograd wired to the backward kernels).
"""
TRITON_OPS: dict = {}

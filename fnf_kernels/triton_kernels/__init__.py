"""Triton kernels (GPU, or CPU under TRITON_INTERPRET=1), wrapped as torch custom ops."""

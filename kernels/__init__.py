"""Triton kernels, one module per op (kernel and host launcher side by side); installed as
neuroidx_fast.kernels. On a machine without a GPU they run only under TRITON_INTERPRET=1."""

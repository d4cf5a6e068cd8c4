"""aphro's hot kernels: each Triton kernel beside the plain-torch reference of the same function.

Every public function here dispatches: Triton on CUDA tensors, the torch reference elsewhere.
Tests compare the two on CPU with TRITON_INTERPRET=1 (the `*_triton` entry points) and on GPUs.

Note: Hugging Face's kernel-hub package is also imported as `kernels`; the two cannot be installed
in one environment (see README). `__aphro__` lets tests tell ours apart.
"""

__aphro__ = True

"""Kernel sources: ``kernels/triton/*.py`` (@triton.jit) and ``kernels/cuda/*.cu`` (CUDA C++ for
cupy.RawModule). Kernels know nothing of layers; backends launch them."""

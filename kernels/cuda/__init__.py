"""The cupy backend's side of the CUDA sources in this folder: compiling them (``sources``),
cuBLAS through ctypes (``cublas``), the operations a call is made of (``ops``), CUDA-graph
capture and the per-shape workspaces (``graphs``) and the device interface the backend's
algorithms use (``device``). Nothing here imports CuPy at module level."""

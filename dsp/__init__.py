"""Signal processing and inference: pure functions and numba kernels, no I/O."""

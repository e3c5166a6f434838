"""A CPU emulator for the CUDA kernels of csrc/ (see cuda_emu.h and build.py)."""

"""Attention math: plain-torch references (`reference.py`), fused dispatch (`attention.py`) and
Triton kernels (`decode.py`)."""

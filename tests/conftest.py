import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this when kernels are decorated, so it must be set before longkv.kernels imports it:
# the kernel tests then run the Triton code on the CPU through its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

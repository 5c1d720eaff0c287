"""`python -m longkv` is `longkv`."""
import sys

from .cli import main

sys.exit(main())

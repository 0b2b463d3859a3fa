"""pytest loads this before any test file. train.py and sample.py import kernels.py, whose Triton
kernels then run through Triton's CPU interpreter in the tests: that must be chosen before triton is
first imported, whichever test file comes first."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

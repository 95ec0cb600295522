"""Devices and processes, asked without importing torch (seconds to load), so that --help,
--show-config and a bad flag answer at once."""

import ctypes
import functools
import importlib.util
import os
import re
from pathlib import Path

# --device: the devices torch runs this project's models on
DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")


@functools.cache  # the same answer all through a process
def cuda_available():
    """torch.cuda.is_available(), asked without importing torch: a CUDA build of torch (its
    version.py names a CUDA version) and a CUDA driver that counts a device (CUDA_VISIBLE_DEVICES
    applies). parallel.setup refuses a CUDA device that torch itself cannot use."""
    spec = importlib.util.find_spec("torch")
    version = Path(spec.origin).with_name("version.py").read_text() if spec else ""
    # "cuda: Optional[str] = None" in a CPU build
    if not re.search(r"^cuda\b[^=]*=\s*'", version, re.M):
        return False
    try:
        driver = ctypes.CDLL("nvcuda.dll" if os.name == "nt" else "libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return (
        driver.cuInit(0) == 0
        and driver.cuDeviceGetCount(ctypes.byref(count)) == 0
        and count.value > 0
    )


def world_size():
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", 1))

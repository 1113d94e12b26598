"""What every bench records about the machine it ran on (imported by benches/bench_*.py)."""
from __future__ import annotations

import os
import platform

import torch

import fastpt


def machine(**extra) -> dict:
    """CPU model, cores, thread count, versions, load and GPU name, plus any ``extra`` fields."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return dict(cpu=model, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                fastpt=fastpt.__version__, loadavg_1m=os.getloadavg()[0],
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None, **extra)

"""The ``env`` stage: the machine, the versions, the peak bf16 matmul."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from .plan import _write


def stage_env(results: Path, args: argparse.Namespace) -> None:
    import timm
    import torch

    from dsmae.bench import device_name
    from dsmae.matmul_peak import matmul_peak_gflops

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    size = 8192 if cuda and not args.shrink else 256
    peak = matmul_peak_gflops(dev, dtype, size=size, repeats=10)
    env = {
        "device": device_name(dev),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": timm.__version__,
        "cpus": os.cpu_count(),
        "matmul_size": size,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_tflops": peak / 1e3,
    }
    if cuda:
        props = torch.cuda.get_device_properties(dev)
        env["gpu_memory_gib"] = props.total_memory / 2**30
        env["multiprocessors"] = props.multi_processor_count
    _write(results / "env.json", env)
    print(json.dumps(env, indent=2))

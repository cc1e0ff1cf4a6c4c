"""The device of the PyTorch path (`moe-run --model`, moe-bench's PyTorch side): CUDA when this torch build
sees a GPU, by the same rules and messages as the runtime's engines (runtime/device.py)."""
from __future__ import annotations

from runtime.device import Device, DeviceChoice, resolve_device


def choose_torch(requested: Device) -> DeviceChoice:
    import torch

    usable = requested is not Device.CPU and torch.cuda.is_available()
    name = torch.cuda.get_device_name() if usable else ""
    return resolve_device(requested, usable, f"PyTorch {torch.__version__}, {name}", f"PyTorch {torch.__version__}",
                          f"torch {torch.__version__} sees no CUDA GPU",
                          "install a CUDA build of torch (https://pytorch.org/get-started/locally/) or use "
                          "--device cpu")

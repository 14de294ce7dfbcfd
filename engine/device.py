"""Where a model runs and in which precision."""
import torch

from engine.errors import ParleyError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device asked for, else CUDA, then Apple's MPS, then the CPU."""
    if device is not None:
        try:
            device = torch.device(device)
        except RuntimeError:
            raise ParleyError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ParleyError("device 'cuda' was asked for but no CUDA GPU is available: use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ParleyError("device 'mps' was asked for but MPS is not available: use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype asked for, else bfloat16 on a GPU that has it and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ParleyError(f"unsupported dtype {dtype}: use one of {', '.join(DTYPES)}")
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise ParleyError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)

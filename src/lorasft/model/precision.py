"""Which precision a run trains in, and so which dtype its frozen base is held in.

`auto` picks what is fast on this machine: bf16 on GPUs that have it and on CPUs with native bf16
(AVX512-BF16 or AMX), fp32 elsewhere. An explicit choice is honoured: bf16 on a CPU without native
support is emulated (correct, and many times slower), which is said once.
"""

from __future__ import annotations

import torch

from lorasft.console import say

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16() -> bool:
    """bf16 matmuls are fast on CPUs with AVX512-BF16 or AMX; elsewhere they are emulated and
    (measured on an AVX2-only EPYC) about 9x slower than fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str) -> str:
    """`fp32`, `bf16` or `fp16` for train.precision on this machine."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "bf16" and not cuda and not cpu_has_bf16():
        say("train.precision=bf16: this CPU has no AVX512-BF16/AMX, so bf16 is "
            "emulated: same results as on a bf16 machine, many times slower than fp32 "
            "(train.precision=auto picks fp32 here)")  # fmt: skip
    if precision == "fp16" and not cuda:
        say("train.precision=fp16 needs a GPU; using fp32")
        return "fp32"
    return precision


def base_dtype(model_dtype: str, precision: str) -> torch.dtype:
    """The frozen base's dtype: model.dtype when set, else the precision's."""
    if model_dtype != "auto":
        return DTYPE_NAMES[model_dtype]
    return PRECISION_DTYPES[precision]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

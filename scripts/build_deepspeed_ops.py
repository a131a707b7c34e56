"""Build DeepSpeed's CPU communication op (g++, 40 s to a minute on 2 cores).

DeepSpeed compiles it with torch's JIT extension builder the first time a ZeRO run starts on a
CPU, into TORCH_EXTENSIONS_DIR (the Makefile points it into the venv). `make test` builds it
while setting up, the way DeepSpeed itself would (`deepspeed.comm.torch.build_shm_op`), so the
suite's time is the tests' own. Nothing is built where DeepSpeed has no such op for the
accelerator (GPUs) or marks it as not compatible.
"""

import deepspeed.ops
from deepspeed.accelerator import get_accelerator


def main() -> None:
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        print(f"DeepSpeed has no usable shared-memory op for the {get_accelerator().device_name()} "
              "accelerator; nothing to build")  # fmt: skip
        return
    builder.load()


if __name__ == "__main__":
    main()

"""Build DeepSpeed's CPU communication op (g++, about a minute on 2 cores) once per venv.

DeepSpeed compiles it with torch's JIT extension builder the first time a ZeRO run starts on a
CPU (into ~/.cache/torch_extensions, rebuilt for each new venv). `make test` builds it while
setting up, the way DeepSpeed itself would (`deepspeed.comm.torch.build_shm_op`), so the test
suite's time is the tests' own. Nothing is built where DeepSpeed marks the op as not compatible.
"""

import deepspeed.ops
from deepspeed.accelerator import get_accelerator


def main() -> None:
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        print("DeepSpeed's shared-memory op is not compatible here; nothing to build")
        return
    builder.load()


if __name__ == "__main__":
    main()

"""Time and memory of lorasft's loss alone by train.loss_chunk_tokens: the output head and
cross-entropy, forward and backward, on N positions of the default model's shape (hidden 576,
vocabulary 49,152, a frozen head as LoRA leaves it), each chunk size in a fresh process (peak RSS
above the process before the loss) with the allocator as `lorasft train` sets it.

    python bench/long_context/loss_chunk.py [--positions 8192] [--chunks 0 128 256 512 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(positions: int, chunk: int, hidden: int, vocab: int, dtype: str, repeat: int) -> dict:
    import torch

    from lorasft.model.host_memory import release_freed_memory
    from lorasft.model.loss import chunked_nll

    release_freed_memory()
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(dt).requires_grad_(False)
    h = (torch.randn(positions, hidden) * 3).to(dt).requires_grad_(True)
    t = torch.randint(0, vocab, (positions,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        if chunk:
            loss = chunked_nll(head, h, t, chunk)
        else:
            loss = torch.nn.functional.cross_entropy(head(h).float(), t, reduction="sum")
        loss.backward()
        times.append(time.perf_counter() - start)
        h.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"positions": positions, "chunk": chunk, "dtype": dtype, "seconds": min(times),
            "peak_above": peak - before, "loss": loss.item()}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=8192)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        print(json.dumps(child(a.positions, a.child, a.hidden, a.vocab, a.dtype, a.repeat)))
        return
    print(f"loss on {a.positions} positions, hidden {a.hidden}, vocabulary {a.vocab}, {a.dtype} "
          "(chunk 0: all positions at once)")  # fmt: skip
    for chunk in a.chunks:
        cmd = [sys.executable, __file__, "--child", str(chunk), "--positions", str(a.positions),
               "--hidden", str(a.hidden), "--vocab", str(a.vocab), "--dtype", a.dtype,
               "--repeat", str(a.repeat)]  # fmt: skip
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        print(f"chunk {chunk:>5}: {r['seconds']:.2f} s forward+backward, peak "
              f"{r['peak_above'] / 2**30:.2f} GiB above the process, loss {r['loss']:.2f}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""Where a lorasft training step spends its time on this machine, and what each dtype's matmul
gives: the figures behind docs/speed-memory.md's "What is left on this CPU".

    python bench/speed/profile_step.py [--steps 2]

Prints GFLOP/s of one linear (864x576 @ 576x1536, a batch of 8 demo records through SmolLM2's
MLP) in fp32, bf16 and fp16, int8 `torch._int_mm`, then torch.profiler's top operators for
`--steps` training steps of lorasft's defaults (bench/speed/train_speed.py's lorasft mode) and the
throughput of `aten::mm` inside them.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from train_speed import lorasft_trainer


def rate(fn, flops: float, reps: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return flops * reps / (time.perf_counter() - start) / 1e9


def dtype_rates() -> None:
    m, k, n = 864, 576, 1536
    flops = 2 * m * k * n
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x, w = torch.randn(m, k, dtype=dt), torch.randn(n, k, dtype=dt)
        gflops = rate(lambda x=x, w=w: torch.nn.functional.linear(x, w), flops)
        print(f"linear {dt!s:15} {gflops:7.1f} GFLOP/s")
    a = torch.randint(-128, 127, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 127, (k, n), dtype=torch.int8)
    print(f"torch._int_mm int8    {rate(lambda: torch._int_mm(a, b), flops, reps=5):7.1f} GOP/s")


def profile_steps(steps: int) -> None:
    trainer = lorasft_trainer(steps + 1, [])
    model, batches = trainer.model, iter(trainer.get_train_dataloader())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step():
        loss = trainer.compute_loss(model, next(batches))
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    mm = next(e for e in events if e.key == "aten::mm")
    total = sum(e.self_cpu_time_total for e in events)
    print(f"aten::mm: {100 * mm.self_cpu_time_total / total:.1f}% of the time, "
          f"{mm.flops / (mm.self_cpu_time_total / 1e6) / 1e9:.1f} GFLOP/s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    dtype_rates()
    profile_steps(a.steps)


if __name__ == "__main__":
    main()

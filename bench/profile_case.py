"""Where one benchmark case spends its time: the PyTorch profiler's kernel table of its timed
call, on any device.

    python -m bench.profile_case --op topn_create --shape paper --direction fwd+bwd \
        --provider triton

Builds the case as ``python -m bench`` does (bench/registry.py), warms it up, then profiles
``--calls`` calls and prints the operators and kernels by total device time (CPU time on a
CPU), with the launch count of each: a first look at a slow case, not a measurement (the
benchmark's ratios come from ``python -m bench``).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from .registry import all_cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_case", description=__doc__)
    parser.add_argument("--op", required=True)
    parser.add_argument("--shape", required=True)
    parser.add_argument("--direction", required=True)
    parser.add_argument("--provider", required=True)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25, help="rows of the table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    device = torch.device(args.device)
    key = (args.op, args.shape, args.direction, args.provider)
    found = [c for c in all_cases(device) if (c.op, c.shape, c.direction, c.provider) == key]
    if not found:
        parser.error(f"no case {key} on {device}")
    (case,) = found
    call = case.build()  # as python -m bench does: built outside the case's context
    with case.context():
        for _ in range(3):  # compiles and autotuning out of the profile
            call()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            for _ in range(args.calls):
                call()
            sync()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{case.id}: {args.calls} calls")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()

"""`python -m gpu.policy_share --json FILE`: the time of one call of the frozen policy network
alone (`policy_logits`, random weights: the cost does not depend on them) at batch 32, 512 px,
bf16 autocast, on CUDA: eager with BatchNorm folded (what an eager CTS forward runs), then
compiled (what a compiled CTS forward runs: the plain network, inductor folds BN). The JSON is
rewritten after each measurement, so a time limit during compilation keeps the eager figure.
The GPU check divides these by the CTS forward time of the benchmark."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv=None) -> None:
    from segm.bench.timing import round_robin, summary
    from segm.model.policy import PolicyNet, fuse_batchnorm, policy_logits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("policy_share: no CUDA device")
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    policy = PolicyNet().to(device).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    result = {"batch_size": args.batch_size, "size": args.size, "dtype": "bf16", "gpu": torch.cuda.get_device_name(),
              "warmup": args.warmup, "repeats": args.repeats}
    runs = [("eager_ms", fuse_batchnorm(policy).to(memory_format=torch.channels_last))]
    if not args.no_compile:
        runs.append(("compiled_ms", torch.compile(policy)))
    for key, net in runs:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            times = round_robin({key: lambda im: policy_logits(net, im)}, [x], args.warmup, args.repeats, device)
        result[key] = 1e3 * summary(times[key])["median"]
        args.json.write_text(json.dumps(result, indent=1))
        print(f"policy network, batch {args.batch_size}, {args.size} px, bf16, {key}: {result[key]:.2f}", flush=True)


if __name__ == "__main__":
    main()

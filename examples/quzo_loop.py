"""QuZO in a plain PyTorch loop: SmolLM2-135M with int4 weights learns SST-2 sentiment as next-word prediction,
two forward passes per step and no backward pass.

    python examples/quzo_loop.py                     # SmolLM2-135M (packaged), 300 steps
    python examples/quzo_loop.py --model PATH_OR_HUB_ID --steps 1000 --device cuda

The int4 model is frozen and QuZO trains its RMSNorm scales (full precision), the setting that learns fastest at
a few hundred steps (BENCHMARKS.md, SmolLM2 study); `--train all` trains every linear layer's int4 codes as well,
the paper's full-model QuZO, which needs thousands of steps at a lower rate (--lr 1e-6).
"""

from __future__ import annotations

import argparse
import random

from sst2_prompts import accuracy, collate, read_sst2, training_examples

import ftkit
from ftkit.optim import QuZO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--train", choices=["norms", "all"], default="norms")
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--dev-rows", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    tokenizer = ftkit.load_tokenizer(args.model)
    # int4 in groups of 64 weights per scale, streamed from the checkpoint one module at a time
    model = ftkit.load_quantized(args.model, "int4", group_size=64, device=args.device, trainable=args.train == "all")
    for name, param in model.named_parameters():
        param.requires_grad = "norm" in name
    optimizer = QuZO(model, lr=args.lr, eps=args.eps, seed=0)
    counts = ftkit.count_parameters(model)
    print(f"{counts['trainable']:,} of {counts['total']:,} weights train; the model holds {counts['stored_bytes']:,} "
          f"bytes")

    train_set = training_examples(tokenizer, read_sst2("train", args.train_rows))
    dev_rows = read_sst2("dev", args.dev_rows)
    print(f"dev accuracy before: {accuracy(model, tokenizer, dev_rows):.3f}")
    order = random.Random(0)
    for step in range(1, args.steps + 1):
        batch = collate(tokenizer, order.sample(train_set, args.batch_size))
        batch = {k: v.to(args.device) for k, v in batch.items()}
        loss = optimizer.step(lambda: model(**batch).loss)  # the closure: this batch's loss at the current weights
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}: loss {loss:.4f}")
    print(f"dev accuracy after {args.steps} steps: {accuracy(model, tokenizer, dev_rows):.3f}")


if __name__ == "__main__":
    main()

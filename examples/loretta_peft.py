"""LoRETTA through PEFT with ordinary first-order training: tensor-train LoRA factors (LoRETTA_rep) on SmolLM2-135M's
attention projections, trained with AdamW and backpropagation, saved and merged the way LoRA adapters are.

    python examples/loretta_peft.py                   # SmolLM2-135M (packaged), 100 steps
    python examples/loretta_peft.py --model PATH_OR_HUB_ID --device cuda
"""

from __future__ import annotations

import argparse
import random

import torch
from peft import PeftModel, get_peft_model
from sst2_prompts import accuracy, collate, read_sst2, training_examples

import ftkit
from ftkit.peft import LorettaRepConfig  # importing it registers LoRETTA with PEFT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--dev-rows", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-dir", default="runs/loretta_peft")
    args = parser.parse_args()

    tokenizer = ftkit.load_tokenizer(args.model)
    model = ftkit.load_model(args.model, device=args.device)
    config = LorettaRepConfig(r=8, tensor_rank=5, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    train_set = training_examples(tokenizer, read_sst2("train", args.train_rows))
    dev_rows = read_sst2("dev", args.dev_rows)
    print(f"dev accuracy before: {accuracy(model, tokenizer, dev_rows):.3f}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    order = random.Random(0)
    model.train()
    for step in range(1, args.steps + 1):
        batch = collate(tokenizer, order.sample(train_set, args.batch_size))
        loss = model(**{k: v.to(args.device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.4f}")
    print(f"dev accuracy after {args.steps} steps: {accuracy(model, tokenizer, dev_rows):.3f}")

    model.save_pretrained(args.output_dir)  # adapter_config.json + the tensor-train cores, as for LoRA
    merged = PeftModel.from_pretrained(ftkit.load_model(args.model, device=args.device), args.output_dir)
    merged = merged.merge_and_unload()  # a plain model again, the adapter folded into its weights
    print(f"merged model, dev accuracy: {accuracy(merged, tokenizer, dev_rows):.3f}")


if __name__ == "__main__":
    main()

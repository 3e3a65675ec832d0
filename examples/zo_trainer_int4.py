"""A Hugging Face Trainer script switched to QuZO: SmolLM2-135M's linear layers in int4, and QuZO trains their int4
codes directly (no full-precision copy, no backward pass). Against an ordinary fine-tuning script, two lines
change: the model is loaded low-bit, and `Trainer` becomes `ZOTrainer`.

    python examples/zo_trainer_int4.py                                    # 200 steps, checkpoints in runs/
    python examples/zo_trainer_int4.py --resume                           # continue from the last checkpoint
    python examples/zo_trainer_int4.py --model PATH_OR_HUB_ID --device cuda --steps 20000

The rate follows MeZO's protocol for full-model zeroth-order training (lr 1e-6, eps 1e-3, thousands of steps).
"""

from __future__ import annotations

import argparse

from sst2_prompts import accuracy, collate, read_sst2, training_examples
from transformers import TrainingArguments

import ftkit
from ftkit.hf import ZOTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--dev-rows", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-dir", default="runs/zo_trainer_int4")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    tokenizer = ftkit.load_tokenizer(args.model)
    model = ftkit.load_quantized(args.model, "int4", group_size=64, device=args.device)  # was: from_pretrained
    model.requires_grad_(False)  # QuZO trains the int4 codes (trainable=True above), not the norms or embeddings
    train_set = training_examples(tokenizer, read_sst2("train", args.train_rows))
    dev_rows = read_sst2("dev", args.dev_rows)

    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=16, learning_rate=args.lr,
        lr_scheduler_type="constant", weight_decay=0.0, logging_steps=max(1, args.steps // 10),
        save_steps=max(1, args.steps // 2), save_total_limit=2, report_to=[], seed=0,
        use_cpu=args.device == "cpu", remove_unused_columns=False)
    trainer = ZOTrainer(model=model, args=training, train_dataset=train_set,
                        data_collator=lambda rows: collate(tokenizer, rows),
                        method="quzo", eps=1e-3)  # was: Trainer(model=model, args=training, ...)
    print(f"dev accuracy before: {accuracy(model, tokenizer, dev_rows):.3f}")
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    print(f"dev accuracy after {args.steps} steps: {accuracy(model, tokenizer, dev_rows):.3f}")


if __name__ == "__main__":
    main()

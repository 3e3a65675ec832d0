"""Run under torchrun by tests/two_processes.py: each argument, a JSON list [name, *ftkit arguments], through
`ftkit`'s command line in turn in these processes, all in one process group."""

import json
import os
import sys

MARK = "=== two-process run "  # printed (by process 0) before each run's output


def main(arguments: list[str]) -> None:
    import torch.distributed as dist

    import ftkit.training.loop
    from ftkit.cli import app

    # The runs share the process group the first one joins (init_world joins none when one exists): a group joined
    # again after one was left, through torchrun's store, can wait forever on the other process.
    ftkit.training.loop.close_world = lambda world: None
    for argument in arguments:
        name, *words = json.loads(argument)
        if os.environ.get("RANK", "0") == "0":
            print(f"{MARK}{name}", flush=True)
        try:
            app(words)
        except SystemExit as done:
            if done.code:
                raise
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

"""SST-2's 872 validation sentences for the harness tasks beside this file, read as ftkit reads them: GLUE's TSV
(`sentence<TAB>label`, split at the last tab, the sentence stripped) from $FTKIT_DATA_DIR/sst2/dev.tsv."""

import os
from pathlib import Path

import datasets


def validation(**kwargs) -> dict:
    root = os.environ.get("FTKIT_DATA_DIR")
    if not root:
        raise RuntimeError("set FTKIT_DATA_DIR to the folder that holds sst2/dev.tsv")
    lines = (Path(root) / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    rows = [line.rsplit("\t", 1) for line in lines if line.strip()]
    return {"validation": datasets.Dataset.from_list([{"sentence": s.strip(), "label": int(l)} for s, l in rows])}

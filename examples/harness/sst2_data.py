"""SST-2's 872 validation sentences for the harness tasks beside this file, read as ftkit reads them: GLUE's TSV
(`sentence<TAB>label`, split at the tab, the sentence stripped) from $FTKIT_DATA_DIR/sst2/dev.tsv, else from
../shared/data beside the repository (where the Makefile looks too)."""

import os
from pathlib import Path

import datasets

BESIDE = Path(__file__).resolve().parents[3] / "shared" / "data"


def validation(**kwargs) -> dict:
    root = Path(os.environ.get("FTKIT_DATA_DIR") or BESIDE)
    path = root / "sst2" / "dev.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"SST-2 validation not found at {path}: set FTKIT_DATA_DIR to the folder that holds "
                                f"sst2/dev.tsv")
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    rows = [line.rsplit("\t", 1) for line in lines if line.strip()]
    return {"validation": datasets.Dataset.from_list([{"sentence": s.strip(), "label": int(l)} for s, l in rows])}

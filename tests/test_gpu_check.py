"""scripts/gpu_check.py: its bundle is laid out as a node without network needs it, and its whole sequence runs
(--dry-run: every section, the same code, tiny shapes, on the CPU) and records what it checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))


def test_the_bundle_holds_the_tokenizer_and_data_and_a_manifest(tmp_path):
    import gpu_check

    manifest = gpu_check.prepare(tmp_path / "bundle", download=False)  # wheels need the registry: not in tests
    bundle = tmp_path / "bundle"
    assert (bundle / "minilm" / "vocab.txt").is_file() and (bundle / "minilm" / "tokenizer.json").is_file()
    assert len((bundle / "data" / "sst2" / "train.tsv").read_text().splitlines()) == 2001
    assert (bundle / "data" / "sst2" / "dev.tsv").read_text().count("\n") == 873
    assert set(manifest["packages"]) == {"omegaconf", "accelerate", "bitsandbytes"}
    for name, entry in manifest["files"].items():
        assert (bundle / name).stat().st_size == entry["bytes"] and len(entry["sha256"]) == 64
    assert manifest["total_bytes"] < 8 * 2**20  # without wheels: well inside what a device copy can carry


def test_the_dry_run_goes_through_every_section(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert results["shapes"] == "tiny" and results["environment"]["device"] == "cpu"
    assert all(row["ok"] for row in results["kernels"]["paths"] if "ok" in row)
    assert all(results["kernels"]["nearest_codes_equal_cpu"].values())
    assert all(entry["ok"] for entry in results["kernels"]["stochastic_rounding"].values())
    methods = results["methods"]["rows"] + results["methods"]["ratio_rows"]
    assert [r["method"] for r in results["methods"]["rows"]] == list(__import__("gpu_check").METHODS)
    assert all("error" not in r and r["losses_finite"] for r in methods), methods
    assert all(r["step_over_two_forwards"] > 0 for r in methods if "MeZO" in r["method"] or "QuZO" in r["method"])
    assert results["determinism"] == {"two_runs_identical": True, "resume_equals_uninterrupted": True,
                                      "replay_identical": True}
    assert results["processes"] == {"two_equal_one": True}
    assert all("error" not in r and r["losses_finite"] for r in results["scale"]["rows"])
    assert "| QuZO int4 |" in (tmp_path / "out" / "gpu_check.md").read_text()

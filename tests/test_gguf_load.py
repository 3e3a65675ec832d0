"""A GGUF model loaded without requantizing: a tiny LLaMA file's Q4_1 codes as ftkit's layers (logits equal to
transformers' own dequantization of the file), other formats converted from the dequantized weights, an untied
output, QuZO on the file's codes with a bit-exact resume, and bad files refused in one line naming file and
tensor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import EPS32, tiny_recipe
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from gguf_files import VOCAB, tiny_llama_gguf

from ftkit.errors import RecipeError, UserError
from ftkit.gguf.layout import layer_to_file
from ftkit.gguf.metadata import copy_fields
from ftkit.gguf.names import to_hf_rows
from ftkit.gguf.read import open_gguf
from ftkit.models.load import load_backbone, load_tokenizer
from ftkit.quant.convert import quantize_model
from ftkit.quant.linear import QuantLinear
from ftkit.recipe import load_recipe
from ftkit.recipe.schema import ModelSpec, QuantSpec
from ftkit.training import checkpoint as ckpt
from ftkit.training.loop import train

Q4_1 = GGMLQuantizationType.Q4_1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def reference(tiny):
    """transformers' own model of the file (gguf.quants dequantization, its q/k permutation undone) and a prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.parent, gguf_file=tiny.name, dtype=torch.float32).eval()
    ids = load_tokenizer(ModelSpec(name=str(tiny)))(["The film was great, I loved it"], return_tensors="pt").input_ids
    with torch.inference_mode():
        return model, ids, model(ids).logits


def backbone(path, **quant) -> nn.Module:
    return load_backbone(ModelSpec(name=str(path)), "causal_lm", quant=QuantSpec(**quant)).eval()


def logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def rewrite(source, target, add: dict):
    """A copy of a GGUF file with the tensors `add` ({name: (float32 values, type)}) added."""
    reader = GGUFReader(source)
    writer = GGUFWriter(str(target), "llama")
    copy_fields(reader, writer)
    for tensor in reader.tensors:
        quantized = tensor.tensor_type != GGMLQuantizationType.F32
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type if quantized else None)
    for name, (values, ggml) in add.items():
        writer.add_tensor(name, quants.quantize(values.astype(np.float32), ggml), raw_dtype=ggml)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def test_own_q4_1_codes_give_the_files_logits_and_its_blocks(tiny, reference):
    """quant.format q4_1 (and gguf) on a Q4_1 file: the layers hold the file's blocks byte for byte (q/k rows in
    Hugging Face order), and the model computes transformers' logits of the dequantized file, to float32 rounding of
    the same sums (dequantize kernel: the int4pack kernel rounds scales to bfloat16 below 512 rows)."""
    _, ids, expected = reference
    reader = {t.name: t for t in open_gguf(tiny).tensors}
    for fmt in ("q4_1", "gguf"):
        model = backbone(tiny, format=fmt, kernel="dequantize")
        q_proj = model.model.layers[1].self_attn.q_proj
        assert isinstance(q_proj, QuantLinear) and q_proj.fmt == "q4_1"
        raw = to_hf_rows(torch.from_numpy(np.array(reader["blk.1.attn_q.weight"].data)), 4).numpy()
        assert np.array_equal(layer_to_file(q_proj), raw)  # nothing requantized
        assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
        difference = (logits(model, ids) - expected).abs().max().item()
        assert difference <= 64 * EPS32 * expected.abs().max().item(), (fmt, difference)


def test_other_formats_convert_from_the_dequantized_file(tiny, reference):
    """q4_0 and int4 quantize the file's dequantized weights as they would a full-precision model's; none keeps
    them; quant.skip keeps a layer in full precision."""
    _, ids, expected = reference
    full = backbone(tiny, format="none")
    assert torch.equal(logits(full, ids), expected)
    for fmt in ("q4_0", "int4"):
        converted = quantize_model(backbone(tiny, format="none"), QuantSpec(format=fmt), skip_prefix="lm.")
        model = backbone(tiny, format=fmt)
        assert model.model.layers[0].mlp.up_proj.fmt == fmt
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), converted.state_dict().values()))
    skipped = backbone(tiny, format="q4_1", skip=[r"lm_head", r"\.0\.mlp\.down_proj"])
    down = skipped.model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear and torch.equal(down.weight, full.model.layers[0].mlp.down_proj.weight)


def test_the_fallback_types_of_a_q4_k_m_file_load_as_they_are(tmp_path):
    """Where rows are no multiple of 256 llama.cpp's Q4_K_M stores Q5_0 and Q8_0 instead of Q4_K and Q6_K (SmolLM2's
    attention and gate / up projections): under quant.format gguf each becomes its own format's layer holding the
    file's blocks byte for byte (q rows in Hugging Face order)."""
    q5, q8 = GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q8_0
    path = tiny_llama_gguf(tmp_path / "mixed.gguf", {"attn_q": q5, "ffn_gate": q5, "attn_v": q8}, seed=1)
    reader = {t.name: t for t in open_gguf(path).tensors}
    layers = backbone(path, format="gguf", kernel="dequantize").model.layers[1]
    for layer, name, fmt in [(layers.self_attn.q_proj, "attn_q", "q5_0"), (layers.mlp.gate_proj, "ffn_gate", "q5_0"),
                             (layers.self_attn.v_proj, "attn_v", "q8_0"), (layers.mlp.up_proj, "ffn_up", "q4_1")]:
        raw = torch.from_numpy(np.array(reader[f"blk.1.{name}.weight"].data))
        assert layer.fmt == fmt and np.array_equal(layer_to_file(layer), (to_hf_rows(raw, 4) if name == "attn_q"
                                                                          else raw).numpy()), name


def test_tokenizer_and_chat_template_come_from_the_file(tiny):
    tokenizer = load_tokenizer(ModelSpec(name=str(tiny)))
    assert len(tokenizer) == VOCAB and "<|im_start|>" in tokenizer.chat_template
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat


def test_an_untied_output_is_read_in_its_format_or_kept_in_full_precision(tiny, tmp_path):
    rng = np.random.default_rng(1)
    untied = rewrite(tiny, tmp_path / "untied.gguf", add={"output.weight": (rng.normal(0, 0.05, (VOCAB, 64)), Q4_1)})
    output = next(t for t in open_gguf(untied).tensors if t.name == "output.weight")  # the loader's reader
    expected = torch.from_numpy(quants.dequantize(output.data, output.tensor_type))
    default = backbone(untied, format="q4_1")  # lm_head is in quant.skip by default: float, from the file
    assert type(default.lm_head) is nn.Linear and default.lm_head.weight is not default.model.embed_tokens.weight
    assert torch.equal(default.lm_head.weight, expected)
    own = backbone(untied, format="q4_1", skip=[])
    assert isinstance(own.lm_head, QuantLinear) and own.lm_head.fmt == "q4_1"
    assert torch.equal(own.lm_head.dequantize(), expected)


def edited(source, target, old: bytes, new: bytes, at: int | None = None):
    """A copy of `source` with the bytes `old` replaced by `new` (as long) where they first occur, or at `at`."""
    data = bytearray(source.read_bytes())
    at = data.index(old) if at is None else at
    assert len(old) == len(new) and data[at:at + len(old)] == old
    data[at:at + len(old)] = new
    target.write_bytes(bytes(data))
    return target


def type_offset(path, name: str) -> int:
    """Where the type of tensor `name` is stored in the file's header (its info: name, dims, type, offset)."""
    field = next(t.field for t in open_gguf(path).tensors if t.name == name)
    return field.offset + sum(part.nbytes for part in field.parts[:4])


@pytest.fixture(scope="module")
def bad_files(tiny, tmp_path_factory) -> dict:
    """name -> (file, quant.format, the message it ends in): cut short, not GGUF, another architecture, a tensor
    missing (renamed), a tensor type ftkit holds in no format (IQ4_NL, read under quant.format: gguf)."""
    folder, data = tmp_path_factory.mktemp("bad"), tiny.read_bytes()
    (folder / "short.gguf").write_bytes(data[: len(data) - 1000])
    (folder / "foreign.gguf").write_bytes(b"PK\x03\x04" + data[4:200])
    iq4_nl = int(GGMLQuantizationType.IQ4_NL).to_bytes(4, "little")
    return {
        "short": (folder / "short.gguf", "q4_1",
                  r"short.gguf is truncated: tensor blk.1.ffn_down.weight needs bytes up to 145,920 and the file has "
                  r"145,176"),
        "foreign": (folder / "foreign.gguf", "q4_1", r"foreign.gguf is not a GGUF file"),
        "mamba": (edited(tiny, folder / "mamba.gguf", b"\x05\x00\x00\x00\x00\x00\x00\x00llama",
                         b"\x05\x00\x00\x00\x00\x00\x00\x00mamba"), "q4_1",
                  r"mamba.gguf holds a 'mamba' model; ftkit reads GGUF files of the LLaMA architecture"),
        "missing": (edited(tiny, folder / "missing.gguf", b"blk.1.ffn_up.weight", b"blk.1.ffn_xx.weight"), "q4_1",
                    r"missing.gguf: missing tensor blk.1.ffn_up.weight \(the model's model.layers.1.mlp.up_proj"),
        "iq4_nl": (edited(tiny, folder / "iq4_nl.gguf", int(Q4_1).to_bytes(4, "little"), iq4_nl,
                          type_offset(tiny, "blk.0.ffn_up.weight")), "gguf",
                   r"iq4_nl.gguf: tensor blk.0.ffn_up.weight is IQ4_NL, which ftkit holds in no format of its own"),
    }


@pytest.mark.parametrize("name", ["short", "foreign", "mamba", "missing", "iq4_nl"])
def test_bad_files_end_in_one_line_naming_file_and_tensor(bad_files, name):
    path, fmt, message = bad_files[name]
    with pytest.raises(UserError, match=message) as caught:
        backbone(path, format=fmt)
    assert "\n" not in str(caught.value)


def test_a_bad_file_writes_nothing(bad_files, tmp_path, write_recipe):
    path, fmt, message = bad_files["missing"]
    recipe = load_recipe(write_recipe(tiny_recipe(model={"name": str(path), "config": None}, quant={"format": fmt},
                                                  train={"output_dir": str(tmp_path / "run")})))
    with pytest.raises(UserError, match=message):
        train(recipe)
    assert not (tmp_path / "run" / "recipe.yaml").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_the_file_format_needs_a_gguf_model(write_recipe):
    with pytest.raises(RecipeError, match=r"quant.format: gguf keeps each layer in its GGUF file's format, and "
                                          r"model.name 'minilm' is not a GGUF file"):
        load_recipe(write_recipe(tiny_recipe(quant={"format": "gguf"})))
    with pytest.raises(RecipeError, match=r"quant.engine: gguf takes the file's blocks into ftkit's own layers"):
        load_recipe(write_recipe({"model": {"name": "x.gguf"},
                                  "quant": {"format": "gguf", "engine": "straight_through"}}))


def test_count_params_under_the_files_format_reads_the_header_only(tiny, write_recipe):
    from ftkit.models.count import count_parameters

    def counts(fmt):
        recipe = load_recipe(write_recipe(tiny_recipe(model={"name": str(tiny), "config": None},
                                                      quant={"format": fmt}, method={"optimizer": "quzo"})))
        return count_parameters(recipe)

    own, asked = counts("gguf"), counts("q4_1")
    assert own == asked and own["trainable"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64) + 5 * 64


def test_quzo_trains_the_files_q4_1_codes_resumes_bit_exactly_and_exports_into_its_file(tiny, tmp_path, write_recipe):
    def recipe(name, steps):
        return load_recipe(write_recipe(tiny_recipe(
            model={"name": str(tiny), "config": None}, quant={"format": "q4_1"}, method={"optimizer": "quzo"},
            data={"task": "sst2", "max_seq_len": 24, "n_train": 32, "n_dev": 8},
            train={"max_steps": steps, "batch_size": 4, "lr": 1e-2, "save_every": 2, "eval_every": 0,
                   "output_dir": str(tmp_path / name)}), f"{name}.yaml"))

    def weights(name):
        from safetensors.torch import load_file

        return load_file(str(ckpt.resolve(tmp_path / name / "checkpoints", "last") / ckpt.WEIGHTS))

    train(recipe("full", 4))
    train(recipe("parts", 2))
    train(recipe("parts", 4), resume=True)
    end, resumed = weights("full"), weights("parts")
    assert end.keys() == resumed.keys() and all(torch.equal(end[k], resumed[k]) for k in end)
    start = backbone(tiny, format="q4_1").state_dict()
    codes = [k for k in end if k.endswith(".codes")]
    assert codes and any(not torch.equal(end[k], start[k.removeprefix("lm.")]) for k in codes)
    record = json.loads((tmp_path / "full" / "data.json").read_text())["model"]
    assert record["path"] == str(tiny.resolve()) and record["size"] == tiny.stat().st_size
    exported_into_the_file(tiny, tmp_path / "full", tmp_path / "full.gguf")


def exported_into_the_file(source, run_dir, out):
    """`ftkit export --format gguf` of a run trained on the file's own Q4_1 codes: the tensors training left alone
    come back as the source's bytes, the trained ones as the run's codes exactly (through gguf.quants), and a source
    changed since training is refused in one line."""
    from ftkit.gguf.names import hf_name, permuted_heads
    from ftkit.runs import export_gguf_run

    export_gguf_run(run_dir, out)
    before, after = ({t.name: t for t in GGUFReader(path).tensors} for path in (source, out))
    model = backbone(source, format="q4_1")
    trained = load_checkpoint_weights(run_dir)
    moved = 0
    for name, tensor in after.items():
        assert tensor.tensor_type == before[name].tensor_type
        key = "lm." + hf_name(name).removesuffix(".weight")
        if f"{key}.codes" not in trained:  # a float tensor: the trained norms as they are, the Q8_0 embedding's bytes
            values = trained.get(f"{key}.weight")
            expected = before[name].data if values is None or tensor.tensor_type != 0 else values.numpy()
            assert np.array_equal(tensor.data, expected), name
            continue
        layer = model.get_submodule(key[3:])
        if torch.equal(trained[f"{key}.codes"], layer.codes):
            assert np.array_equal(tensor.data, before[name].data), name  # untouched: the source's bytes
            continue
        moved += 1
        layer.codes.copy_(trained[f"{key}.codes"])
        weight = torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type))
        heads = permuted_heads(name, 4, 2)
        assert torch.equal(to_hf_rows(weight, heads) if heads else weight, layer.dequantize()), name
    assert moved > 0
    record = json.loads((run_dir / "data.json").read_text())
    record["model"]["sha256"] = "0" * 64  # as if the file had changed since training
    (run_dir / "data.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="has changed since the run was trained"):
        export_gguf_run(run_dir, out.with_name("again.gguf"))
    assert not out.with_name("again.gguf").exists()


def load_checkpoint_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(ckpt.resolve(run_dir / "checkpoints", "last") / ckpt.WEIGHTS))


def test_what_the_libraries_cannot_read_ends_in_one_line_naming_file_and_tensor(tiny, tmp_path):
    """transformers builds no tokenizer for an unknown tokenizer model, and gguf.quants has no dequantizer for some
    block types (Q8_1, llama.cpp's activation type): each is the user's file, said in one line."""
    from types import SimpleNamespace

    from ftkit.gguf.read import dequantized, file_config, file_tokenizer

    odd = edited(tiny, tmp_path / "wxyz.gguf", b"\x04\x00\x00\x00\x00\x00\x00\x00gpt2",
                 b"\x04\x00\x00\x00\x00\x00\x00\x00wxyz")
    with pytest.raises(UserError, match=r"model.name: cannot read the tokenizer of .*wxyz.gguf: .*'wxyz'") as caught:
        file_tokenizer(odd)
    assert "\n" not in str(caught.value)
    q8_1 = SimpleNamespace(name="blk.0.ffn_up.weight", tensor_type=GGMLQuantizationType.Q8_1,
                           data=np.zeros((1, 36), dtype=np.uint8), shape=[32, 1])
    with pytest.raises(UserError, match=r"tiny.gguf: tensor blk.0.ffn_up.weight is Q8_1, which cannot be "
                                        r"dequantized") as caught:
        dequantized(q8_1, file_config(tiny), tiny)
    assert "\n" not in str(caught.value)

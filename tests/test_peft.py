"""LoRETTA_rep and LoRETTA_adp registered as PEFT methods: get_peft_model, save_pretrained, from_pretrained and
merge_and_unload outside ftkit, on tiny random LLaMA and BERT models."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BERT, TINY_LLAMA
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ftkit.adapters.loretta_rep.layer import LorettaRepLinear
from ftkit.peft import LorettaAdpConfig, LorettaRepConfig


def tiny(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    kind = dict(config)
    auto = AutoModelForCausalLM if kind["model_type"] == "llama" else AutoModel
    return auto.from_config(AutoConfig.for_model(kind.pop("model_type"), vocab_size=64, **kind)).eval()


def outputs(model, ids):
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).detach()


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def test_methods_are_peft_types_and_lora_still_works():
    assert PeftType("LORETTA_REP") is PeftType.LORETTA_REP and PeftType.LORETTA_ADP in list(PeftType)
    lora = get_peft_model(tiny(TINY_LLAMA), LoraConfig(r=2, target_modules=["q_proj"]))
    assert lora.peft_config["default"].peft_type == PeftType.LORA


def test_loretta_rep_round_trips_through_peft_and_merges_exactly(tmp_path):
    base_out = outputs(tiny(TINY_LLAMA), IDS)
    model = get_peft_model(tiny(TINY_LLAMA), LorettaRepConfig(r=4, tensor_rank=3, init="paper"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("loretta_rep_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    adapted = outputs(model, IDS)
    assert (adapted - base_out).abs().max() > 1e-3  # paper init: the update is not zero

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny(TINY_LLAMA), tmp_path)
    assert torch.equal(outputs(reloaded, IDS), adapted)

    merged = reloaded.merge_and_unload()
    assert not any("loretta" in n for n, _ in merged.named_modules())
    # merged weights run through the whole network: equal to a relative 1e-5 of the outputs' scale
    torch.testing.assert_close(outputs(merged, IDS), adapted, rtol=1e-5, atol=1e-5 * adapted.abs().max().item())


def test_loretta_rep_identity_init_is_exact_and_counts_match_ftkit():
    model = get_peft_model(tiny(TINY_BERT), LorettaRepConfig(r=8, tensor_rank=3))
    assert torch.equal(outputs(model, IDS), outputs(tiny(TINY_BERT), IDS))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layer = LorettaRepLinear(torch.nn.Linear(32, 32), r=8, alpha=16, dropout=0, tensor_rank=3)
    per_layer = layer.loretta_a.num_parameters + layer.loretta_b.num_parameters
    assert trainable == per_layer * 2 * TINY_BERT["num_hidden_layers"]  # query and value in every layer


def test_loretta_adp_trains_and_saves_norms_and_refuses_to_merge(tmp_path):
    base_out = outputs(tiny(TINY_BERT), IDS)
    model = get_peft_model(tiny(TINY_BERT), LorettaAdpConfig(bottleneck=8, tensor_rank=3))
    assert torch.equal(outputs(model, IDS), base_out)  # identity init
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("LayerNorm" in n for n in trainable) and any("loretta_adp_adapter" in n for n in trainable)
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules()
               if type(m).__name__ == "LorettaAdpLinear"}
    layers = range(TINY_BERT["num_hidden_layers"])
    assert adapted == ({f"encoder.layer.{i}.attention.output.dense" for i in layers}
                       | {f"encoder.layer.{i}.output.dense" for i in layers})
    with torch.no_grad():  # move the adapters and a norm away from their initial values
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    trained = outputs(model, IDS)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny(TINY_BERT), tmp_path)
    assert torch.equal(outputs(reloaded, IDS), trained)
    with pytest.raises(ValueError, match="cannot be merged"):
        reloaded.merge_and_unload()
    assert not any("loretta" in n for n, _ in reloaded.unload().named_modules())


def test_loretta_adp_placement_on_llama_follows_ftkit():
    model = get_peft_model(tiny(TINY_LLAMA), LorettaAdpConfig(bottleneck=8, tensor_rank=3))
    placed = {n.rsplit(".", 1)[-1]: m.loretta_adp_on_input for n, m in model.named_modules()
              if type(m).__name__ == "LorettaAdpLinear"}
    assert placed == {"gate_proj": True, "up_proj": True, "down_proj": False}

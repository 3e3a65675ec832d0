"""LoRETTA_rep: LoRA whose two factors are tensor trains. Declared here (torch-free); layers and injection in
layer.py, the PEFT method in peft.py. Options: `method.loretta`."""

from ftkit.adapters.loretta_options import LORETTA_SECTION, config_int
from ftkit.components import Adapter, Hook

# Architectures whose default targets (ftkit.adapters.targets.REP_TARGETS) are separate query and value projections.
QUERY_VALUE_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "llama", "mistral", "opt", "qwen2"}


def tt_dims(spec, architecture: dict) -> dict:
    """A factors each target's input into r, B r into its output: the query projection's (heads x head size) and the
    value projection's (key-value heads x head size)."""
    hidden, heads = config_int(architecture, "hidden_size"), config_int(architecture, "num_attention_heads")
    if spec.target_modules is not None or architecture.get("model_type") not in QUERY_VALUE_TYPES or not (
            hidden and heads):
        return {}
    head_size = config_int(architecture, "head_dim") or hidden // heads
    outputs = {heads * head_size, (config_int(architecture, "num_key_value_heads") or heads) * head_size}
    return {"a": [(hidden, spec.r)], "b": [(spec.r, out) for out in sorted(outputs)]}


LORETTA_REP = Adapter("loretta_rep", "LoRA whose A and B are tensor trains", section=LORETTA_SECTION,
                      inject=Hook("ftkit.adapters.loretta_rep.layer:inject"),
                      unwrap=Hook("ftkit.adapters.loretta_rep.layer:unwrap"), mergeable=True,
                      parameters=r"loretta_", tt_roles=("a", "b"), tt_dims=tt_dims)

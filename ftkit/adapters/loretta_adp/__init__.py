"""LoRETTA_adp: bottleneck adapters (h -> b -> h) whose two projections are tensor trains. Declared here
(torch-free); layers and injection in layer.py, the PEFT method in peft.py. Options: `method.loretta`."""

from ftkit.adapters.loretta_options import LORETTA_SECTION, config_int
from ftkit.components import Adapter, Hook


def tt_dims(spec, architecture: dict) -> dict:
    """Every default placement wraps a layer whose adapted side is the hidden size (h -> b -> h); the TT head maps
    the pooled embedding to itself."""
    hidden = config_int(architecture, "hidden_size")
    if hidden is None:
        return {}
    dims = {"head": [(hidden, hidden)]}
    if spec.target_modules is None:
        dims.update(down=[(hidden, spec.bottleneck)], up=[(spec.bottleneck, hidden)])
    return dims


LORETTA_ADP = Adapter("loretta_adp", "tensor-train bottleneck adapters (norms trained)", section=LORETTA_SECTION,
                      inject=Hook("ftkit.adapters.loretta_adp.layer:inject"),
                      unwrap=Hook("ftkit.adapters.loretta_adp.layer:unwrap"), mergeable=False,
                      parameters=r"loretta_", tt_roles=("down", "up", "head"), tt_dims=tt_dims)

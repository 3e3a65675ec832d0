"""LoRETTA_adp: bottleneck adapters (h -> b -> h) whose two projections are tensor trains. Declared here
(torch-free); layers and injection in layer.py, the PEFT method in peft.py. Options: `method.loretta`."""

from ftkit.adapters.loretta_options import LORETTA_SECTION
from ftkit.components import Adapter, Hook

LORETTA_ADP = Adapter("loretta_adp", "tensor-train bottleneck adapters (norms trained)", section=LORETTA_SECTION,
                      inject=Hook("ftkit.adapters.loretta_adp.layer:inject"),
                      unwrap=Hook("ftkit.adapters.loretta_adp.layer:unwrap"), mergeable=False,
                      parameters=r"loretta_", tt_roles=("down", "up", "head"))

"""LoRETTA_rep: LoRA whose two factors are tensor trains. Declared here (torch-free); layers and injection in
layer.py, the PEFT method in peft.py. Options: `method.loretta`."""

from ftkit.adapters.loretta_options import LORETTA_SECTION
from ftkit.components import Adapter, Hook

LORETTA_REP = Adapter("loretta_rep", "LoRA whose A and B are tensor trains", section=LORETTA_SECTION,
                      inject=Hook("ftkit.adapters.loretta_rep.layer:inject"),
                      unwrap=Hook("ftkit.adapters.loretta_rep.layer:unwrap"), mergeable=True,
                      parameters=r"loretta_", tt_roles=("a", "b"))

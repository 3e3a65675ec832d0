"""LoRETTA_rep and LoRETTA_adp as PEFT methods. Importing this module registers them, so that outside ftkit

    from ftkit.peft import LorettaRepConfig
    model = get_peft_model(model, LorettaRepConfig(r=8, tensor_rank=5, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(path)
    merged = PeftModel.from_pretrained(base, path).merge_and_unload()

work as for LoRA (import it before `PeftModel.from_pretrained` too, so PEFT knows the method).
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from ftkit.adapters.loretta_adp.peft import PEFT_TYPE as ADP_TYPE
from ftkit.adapters.loretta_adp.peft import LorettaAdpConfig, LorettaAdpModel
from ftkit.adapters.loretta_rep.peft import PEFT_TYPE as REP_TYPE
from ftkit.adapters.loretta_rep.peft import LorettaRepConfig, LorettaRepModel

for _name, _type, _config, _model in (("loretta_rep", REP_TYPE, LorettaRepConfig, LorettaRepModel),
                                      ("loretta_adp", ADP_TYPE, LorettaAdpConfig, LorettaAdpModel)):
    if PEFT_TYPE_TO_TUNER_MAPPING.get(_type) is not _model:
        register_peft_method(name=_name, config_cls=_config, model_cls=_model)

__all__ = ["LorettaRepConfig", "LorettaRepModel", "LorettaAdpConfig", "LorettaAdpModel"]

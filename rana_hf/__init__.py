"""rana_hf: RaNA adapters (Adaptive Rank Allocation, ICLR 2025) for Hugging Face transformers and PEFT.

`import rana_hf` registers the RaNA method with PEFT, so that `PeftModel.from_pretrained`,
`AutoPeftModelForCausalLM.from_pretrained` and `AutoModelForCausalLM.from_pretrained` load RaNA adapters, and with
transformers, so that `AutoModelForCausalLM.from_pretrained` loads standalone checkpoints written by `save_compressed`.
"""

from .config import RaNAConfig
from .integrations import register as _register

_register()

from .adapters import RaNAGatedLinear, RaNALinear, RaNANeuronLinear  # noqa: E402
from .api import Calibration, calibrate, compress, refit_thresholds  # noqa: E402
from .evaluation import measure_flops  # noqa: E402
from .hub import push_to_hub  # noqa: E402
from .integrations.standalone import save_compressed  # noqa: E402
from .tuner import RaNAModel  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "RaNAConfig",
    "RaNAGatedLinear",
    "RaNAModel",
    "RaNALinear",
    "RaNANeuronLinear",
    "calibrate",
    "compress",
    "measure_flops",
    "push_to_hub",
    "refit_thresholds",
    "save_compressed",
]

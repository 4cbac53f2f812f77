"""Remote-code entry for megamem models exported by megamem's tools/convert_to_hf.py.

The model is defined once, in the `megamem` package (pip install megamem); this file only names it.
"""
try:
    from megamem.hf.modeling import MegamemForCausalLM as _Base
except ImportError as e:  # pragma: no cover - depends on the user's environment
    raise ImportError("this model folder needs the megamem package: pip install megamem (or pip install -e a megamem checkout)") from e

from .configuration_megamem import MegamemConfig


class MegamemForCausalLM(_Base):
    config_class = MegamemConfig

"""Remote-code entry for megamem models exported by megamem's tools/convert_to_hf.py.

The model is defined once, in the `megamem` package (pip install megamem); this file only names it.
"""
try:
    from megamem.hf.configuration import MegamemHFConfig as _Base
except ImportError as e:  # pragma: no cover - depends on the user's environment
    raise ImportError("this model folder needs the megamem package: pip install megamem (or pip install -e a megamem checkout)") from e


class MegamemConfig(_Base):
    pass

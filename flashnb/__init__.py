"""flashnb: LLM in a flash (Alizadeh et al., ACL 2024), as a small real engine plus notebooks."""

from flashnb.errors import FlashnbError

__version__ = "0.1.0"

__all__ = ["FlashnbError", "__version__"]

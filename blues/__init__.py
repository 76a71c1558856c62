"""Blues: the framework-free core (config, canonical layout, tokenizer, data).

Importing this package pulls in neither torch nor jax; the two implementations
(`blues_torch`, `blues_jax`) and the bridge between them (`parity`) build on it.
"""
from blues.config import BluesConfig
from blues.errors import BluesError, ConfigError

__all__ = ["BluesConfig", "BluesError", "ConfigError"]

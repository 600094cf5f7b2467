"""Model registries: versioned runs with one current version (`imagen registry init`), kept current by
periodic re-fine-tuning that promotes a candidate only when it is not worse (`imagen refresh`)."""

from imagen.registry.refresh import refresh
from imagen.registry.store import CURRENT, HISTORY, VERSIONS, Registry, init_registry

__all__ = ["Registry", "init_registry", "refresh", "CURRENT", "HISTORY", "VERSIONS"]

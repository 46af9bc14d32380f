"""Package data: schemas (installed as pointvl.schemas, found with importlib.resources)."""

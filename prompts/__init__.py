"""Package data: prompts (installed as pointvl.prompts, found with importlib.resources)."""

"""Layer 4: one file per method, all run by the pipeline in recipe order."""

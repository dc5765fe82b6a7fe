"""Sources: where records enter the pipeline (kernel conntrack, recordings)."""

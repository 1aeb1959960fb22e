"""DeepSpeed config templates (JSON); ftcore/ds_config.py fills them from the typed config."""

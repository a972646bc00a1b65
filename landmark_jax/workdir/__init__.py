"""What a run keeps in its workdir: config.json (run_config), checkpoints and
their integrity records, and the metrics it writes."""

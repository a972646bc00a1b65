"""The data a run reads: the TFDS build's format and metadata, the train and
evaluation input pipelines, augmentation and the shard checks."""

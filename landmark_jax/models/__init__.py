"""Model zoo: backbones, pooling, embedding necks and retrieval models."""

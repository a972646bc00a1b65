"""Model zoo: backbones, pooling, embedding necks and retrieval models.

factory.py builds a retrieval model from config.model (`create_model`) and
owns the model keys and their defaults; global_model.py (GLR2020) and
dolg.py (GLR2021, DOLG) are the two retrieval models; backbones.py is the
backbone registry over efficientnet.py and resnet.py; layers.py,
conv_lowering.py and input_normalization.py are what they share;
keras_import.py and backbone_checkpoint.py bring converted weights in.
"""

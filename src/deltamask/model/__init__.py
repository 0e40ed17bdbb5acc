"""The model: backbones from every zoo, the built-in DINOv2, the masked network, the frozen-prefix cache."""

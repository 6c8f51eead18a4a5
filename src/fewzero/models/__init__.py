"""Audio backbones, the prototypical-network head and the Lightning modules around them."""

"""The embedded toy world: procedural shapes data, its tokenizer, small reward/heatmap/attribute models and
a tiny Stable Diffusion pipeline trained on it (shipped in fnf/assets/toy)."""
import os

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy")

"""kandlab — rebuild a Kandinsky-style text-to-image diffusion system from scratch.

Modules are imported on demand (``from kandlab import diffusion``) so that
``import kandlab`` stays instant; each file holds one concept.
"""

__version__ = "0.1.0"

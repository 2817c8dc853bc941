"""kda-serving: serve Kimi-Linear-style hybrid KDA/MLA models.

Layers, with dependencies pointing one way: server -> engine -> model -> ops -> csrc.
"""

__version__ = "0.1.0"

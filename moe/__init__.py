"""moe: Mixture-of-Experts layers, routing, kernels and training (GShard, Switch, LIMoE).

Library API::

    import moe
    cfg = moe.MoEConfig(d_model=256, d_ffn=1024, num_experts=8,
                        router=moe.RouterConfig(top_k=2, capacity_factor=1.25, drop_policy="bpr"))
    layer = moe.MoELayer(cfg)
    y, aux = layer(x)                     # x[..., 256]; aux: {loss name: weighted loss}
    loss = task_loss + sum(aux.values())
"""
from . import losses
from .config import MoEConfig, RouterConfig
from .experts import Experts
from .layer import MoEGroups, MoELayer
from .permute import PermutePlan, permute, unpermute
from .router import Router
from .routing import route
from .routing_types import Routing

__all__ = [
    "MoEConfig", "RouterConfig", "MoELayer", "MoEGroups", "Router", "Experts", "Routing", "route",
    "permute", "unpermute", "PermutePlan", "losses",
]
__version__ = "0.1.0"

from ftlab.models.backbones import build_backbone, efficientnet_lite0_state_dict
from ftlab.models.types import Backbone

__all__ = ["Backbone", "build_backbone", "efficientnet_lite0_state_dict"]

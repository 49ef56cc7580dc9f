from ftlab.models.backbones import Backbone, build_backbone, efficientnet_lite0_state_dict

__all__ = ["Backbone", "build_backbone", "efficientnet_lite0_state_dict"]

"""Blues in PyTorch: the model (model.py) and its parts (attention, experts, loss)."""
from blues_torch.model import Attention, Block, BluesModel, BluesOutput, MoE, RMSNorm

__all__ = ["Attention", "Block", "BluesModel", "BluesOutput", "MoE", "RMSNorm"]

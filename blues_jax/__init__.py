"""Blues in Flax NNX: the model (model.py), its parts (attention, experts, loss) and the
logical-axis -> device-mesh rules (sharding.py)."""
from blues_jax.model import Attention, Block, BluesModel, BluesOutput, MoE, RMSNorm
from blues_jax.sharding import make_mesh, shard_batch, shard_model

__all__ = ["Attention", "Block", "BluesModel", "BluesOutput", "MoE", "RMSNorm",
           "make_mesh", "shard_batch", "shard_model"]

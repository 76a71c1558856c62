"""Blues configuration for Hugging Face transformers (copied into every `--to hf` export).

Self-contained: depends on transformers only. The fields and their meaning are Blues' own
(docs/architecture.md in the Blues repository); `attribute_map` adds transformers' usual names.
"""
from transformers import PretrainedConfig


class BluesConfig(PretrainedConfig):
    model_type = "blues"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {"num_hidden_layers": "num_layers", "num_local_experts": "tot_num_experts",
                     "num_experts_per_tok": "chosen_num_experts"}

    def __init__(self, vocab_size=200019, max_position_embeddings=256, num_layers=4, hidden_size=192, head_dim=48,
                 num_attention_heads=4, num_key_value_heads=2, tot_num_experts=4, chosen_num_experts=1,
                 embedding_multiplier_scale=4, rms_norm_eps=1e-5, rope_theta=10000.0, use_post_norms=True,
                 attn_logit_softcap=None, router_noise_std=0.05, normalize_router_weights=False,
                 capacity_factor=None, router_aux_loss_coef=0.01, router_z_loss_coef=0.001, dropout=0.0,
                 output_router_logits=False, use_cache=True, bos_token_id=199999, eos_token_id=199999,
                 tie_word_embeddings=True, **kwargs):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.tot_num_experts = tot_num_experts
        self.chosen_num_experts = chosen_num_experts
        self.embedding_multiplier_scale = embedding_multiplier_scale  # F = hidden_size * this
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.use_post_norms = use_post_norms
        self.attn_logit_softcap = attn_logit_softcap
        self.router_noise_std = router_noise_std  # training only
        self.normalize_router_weights = normalize_router_weights
        self.capacity_factor = capacity_factor  # None: dropless
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.dropout = dropout
        self.output_router_logits = output_router_logits
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def intermediate_size(self) -> int:
        """F, one expert's hidden width."""
        return self.hidden_size * self.embedding_multiplier_scale

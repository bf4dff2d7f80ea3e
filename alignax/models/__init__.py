"""NNX models: the decoder-only transformer, its layers and its config."""
from alignax.models.config import ModelConfig
from alignax.models.config import REMAT_POLICIES
from alignax.models.layers import apply_rope
from alignax.models.layers import Attention
from alignax.models.layers import einsum_attention
from alignax.models.layers import Embed
from alignax.models.layers import fused_attention
from alignax.models.layers import make_attention_mask
from alignax.models.layers import MLP
from alignax.models.layers import partitioned_param
from alignax.models.layers import rope_frequencies
from alignax.models.layers import RMSNorm
from alignax.models.transformer import Block
from alignax.models.transformer import init_cache
from alignax.models.transformer import LAYERS_AXIS
from alignax.models.transformer import Transformer

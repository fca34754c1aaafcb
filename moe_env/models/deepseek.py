"""DeepSeek-V2/V3: dense first layers (first_k_dense_replace) are skipped, shared experts stay resident.

Their routers compute logits in float32 whatever the model dtype (F.linear(h.float(), W.float())): the lookahead
signal does the same so that it equals what the next router will compute from the same input.
"""

import torch
import torch.nn.functional as F
from torch import nn

from moe_env.models.base import ModelAdapter


class DeepseekAdapter(ModelAdapter):
    model_types = ("deepseek_v2", "deepseek_v3")

    def raw_logits(self, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.float(), router.weight.float())

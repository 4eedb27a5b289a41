"""Pure tensor functions: attention, position encodings.  No modules, no state."""

from longctx.ops.alibi import alibi_slopes
from longctx.ops.attention import attention, attention_ref, merge
from longctx.ops.rope import rope

__all__ = ["alibi_slopes", "attention", "attention_ref", "merge", "rope"]

"""Will it fit? A GPU memory plan for Flux + LoRA sampling, from architecture, not from constants.

`plan(PlanRequest(...))` adds up, for one sampling run:

* the diffusion model's weights by dtype (a preset's shapes come from `lora_ops.flux`, a checkpoint's
  from its safetensors header; no tensor is read);
* the LoRA bytes resident on the GPU when it is applied unmerged the way kohya's
  flux_minimal_inference does (fp32 factors + the bf16 copy autocast caches = 6 B/param), 0 merged;
* the peak of the merge temporaries when merged: this package's tile vs a full-layer fp32 merge;
* activations of one forward at the resolution / batch / CFG (model below);
* the family's text encoders (T5-XXL + CLIP-L, Mistral Small 3.1, Qwen3) and the VAE when they stay on
  the GPU during sampling;

and compares the peak with the card (usable = total - 0.5 GiB for the CUDA context and
workspaces). When it does not fit it tries, in this order, the cheap changes: merge the LoRA, fp8
weights, offload the text encoder, fp8 text encoder, no CFG / smaller batch.

By job: `inputs` (the request, model and LoRA headers), `companions` (encoders, VAE), `memory`
(weights, merge temporaries), `activations` (the activation model), `result` (the Plan), `evaluate` (the
verdict), `search` (the cheapest fix).
"""

from ..formats import UNMERGED_BYTES_PER_PARAM
from ..units import GIB, MIB
from .activations import ACTIVATION_FORMULA, activation_points, tokens_for
from .companions import (
    MISTRAL_SMALL_3_1,
    QWEN3_4B,
    QWEN3_8B,
    T5_XXL,
    TextEncoder,
    clip_l_text_params,
    flux_ae_params,
    t5_xxl_bf16_resident_params,
    t5_xxl_encoder_params,
    text_encoder_for,
    vae_params,
)
from .inputs import (
    MODES,
    PRESETS,
    RESIDENT_CHOICES,
    TEXT_ENCODER_CHOICES,
    WEIGHT_POLICIES,
    ModelInfo,
    PlanRequest,
    kohya_lora_params,
    model_from_tensors,
)
from .memory import CUDA_RESERVE_BYTES, fp8_policy_dtype
from .result import Plan
from .search import plan, plan_model

__all__ = [
    "ACTIVATION_FORMULA",
    "CUDA_RESERVE_BYTES",
    "GIB",
    "MISTRAL_SMALL_3_1",
    "QWEN3_4B",
    "QWEN3_8B",
    "T5_XXL",
    "TextEncoder",
    "MIB",
    "MODES",
    "PRESETS",
    "RESIDENT_CHOICES",
    "TEXT_ENCODER_CHOICES",
    "UNMERGED_BYTES_PER_PARAM",
    "WEIGHT_POLICIES",
    "ModelInfo",
    "Plan",
    "PlanRequest",
    "activation_points",
    "clip_l_text_params",
    "flux_ae_params",
    "fp8_policy_dtype",
    "kohya_lora_params",
    "model_from_tensors",
    "plan",
    "plan_model",
    "t5_xxl_bf16_resident_params",
    "t5_xxl_encoder_params",
    "text_encoder_for",
    "tokens_for",
    "vae_params",
]

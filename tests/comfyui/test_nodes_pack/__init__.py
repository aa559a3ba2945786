"""TEST-ONLY ComfyUI custom nodes used by the integration tests (never shipped with the pack).

``FluxLoRAOpsTestConditioning`` produces a Flux CONDITIONING without a text encoder, in the same
structure CLIPTextEncode + FluxGuidance produce: ``[[cond (B, tokens, 4096), {"pooled_output":
(B, 768), "guidance": float}]]`` (comfy/sd.py encode_from_tokens_scheduled; model_base.Flux reads
``pooled_output`` as ``y`` via encode_adm and ``guidance`` in extra_conds).
"""

import torch


class FluxLoRAOpsTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {},
            "optional": {
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}),
                "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                # -1: all zeros; otherwise standard-normal values from this seed.
                "seed": ("INT", {"default": -1, "min": -1, "max": 2**31 - 1}),
            },
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "_for_testing/flux_lora_ops"

    def make(self, guidance=3.5, tokens=8, seed=-1):
        if seed < 0:
            cond = torch.zeros(1, tokens, 4096)
            pooled = torch.zeros(1, 768)
        else:
            gen = torch.Generator().manual_seed(seed)
            cond = torch.randn(1, tokens, 4096, generator=gen)
            pooled = torch.randn(1, 768, generator=gen)
        return ([[cond, {"pooled_output": pooled, "guidance": guidance}]],)


NODE_CLASS_MAPPINGS = {"FluxLoRAOpsTestConditioning": FluxLoRAOpsTestConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxLoRAOpsTestConditioning": "Flux LoRA Ops (test) Conditioning"}

"""The DeepSpeed config a run trains with: the user's `deepspeed` section and fgdist's policy.

fgdist owns the batch size (data.batch_size per rank, no gradient accumulation), turns bf16 on
on CUDA unless the section says otherwise, and takes the run's dtype from the result
(`precision`). ZeRO stages 1 and 2 are allowed, stage 3 and fp16 are refused (see the errors).
"""

from __future__ import annotations

import torch

from fgdist.config import RunConfig


def deepspeed_config(cfg: RunConfig, world_size: int, on_cuda: bool) -> dict:
    """The user's `deepspeed` section, with the batch size fgdist owns and bf16 on CUDA unless
    the section says otherwise. The trainer's dtype follows the result (`precision`). ZeRO
    stages 1 and 2 partition the engine's optimizer state (and gradients) only, so the engine's
    module stays whole on every rank, which evaluation, pictures and export read; stage 3 is
    refused."""
    ds = {"steps_per_print": 10**9, "zero_optimization": {"stage": 0}, **cfg.deepspeed}
    if "bf16" not in ds and "bfloat16" not in ds:
        ds["bf16"] = {"enabled": on_cuda}
    stage = zero_stage(ds)
    if stage not in (0, 1, 2):
        raise ValueError(
            f"deepspeed.zero_optimization.stage={stage} is not supported: use 0, 1 or 2 (stage 3 partitions the "
            "model's weights, which evaluation, pictures and export read whole)"
        )
    if stage:
        ds.setdefault("zero_allow_untested_optimizer", True)  # torch's SGD: ZeRO 1/2 only partition its state
    micro = ds.setdefault("train_micro_batch_size_per_gpu", cfg.data.batch_size)
    if micro != cfg.data.batch_size or ds.setdefault("gradient_accumulation_steps", 1) != 1:
        raise ValueError(
            f"deepspeed.train_micro_batch_size_per_gpu must equal data.batch_size ({cfg.data.batch_size}) and "
            "gradient_accumulation_steps must be 1"
        )
    ds.setdefault("train_batch_size", cfg.data.batch_size * world_size)
    return ds


def zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def precision(ds: dict) -> torch.dtype:
    """The one owner of the run's dtype: the final DeepSpeed config. bf16 or fp32; fp16 is
    refused (it needs loss scaling, which DeepSpeed would apply to the engine's gradients only,
    not to the instance head outside it)."""
    if (ds.get("fp16") or {}).get("enabled"):
        raise ValueError(
            "deepspeed.fp16.enabled: fp16 is not supported (its loss scaling would not cover the instance head "
            "outside the engine); use deepspeed.bf16.enabled=true, or false for fp32"
        )
    return torch.bfloat16 if (ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled") else torch.float32

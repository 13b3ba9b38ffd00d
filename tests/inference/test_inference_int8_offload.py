"""bot --load-in-8bit with -g/-r offload (gpu-paths review item 11): modules that accelerate
places on the CPU stay fp32 there, which transformers requires for int8
(`llm_int8_enable_fp32_cpu_offload`); without offload the flag stays off."""

from __future__ import annotations

from openchatkit.models.loading import int8_config


def test_int8_offload_keeps_cpu_modules_in_fp32():
    with_offload = int8_config(offload=True)
    assert with_offload.load_in_8bit and with_offload.llm_int8_enable_fp32_cpu_offload
    plain = int8_config(offload=False)
    assert plain.load_in_8bit and not plain.llm_int8_enable_fp32_cpu_offload

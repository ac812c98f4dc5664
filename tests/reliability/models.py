"""Tiny models saved to folders, for bad-input tests: one without MLP hook support, one that
overflows float16."""

from __future__ import annotations

from pathlib import Path


def tiny_bert(folder: Path) -> Path:
    """A real (tiny, random) BERT: an encoder, not a decoder LM; it has no MLP hook point here."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


def overflowing_fp16_llama(folder: Path) -> Path:
    """A tiny Llama with the bundled model's tokenizer and weights so large that float16 overflows
    (activations become inf / NaN), like a real model pushed past fp16's range of 65,504."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from neuron_pipeline.subject.loading import resolve_model_path

    _, bundled = resolve_model_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(bundled)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.fill_(300.0 if "norm" in name else 50.0)
    model.to(torch.float16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

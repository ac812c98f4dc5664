"""A local transformers model as explainer (chat generation) and simulator (value distributions).

The simulator side is the exact all-at-once method: for every excerpt one forward pass gives the
next-token distribution at every value slot. Excerpts of a neuron share a long prefix (few-shot
examples + explanation): it is run once, its KV cache is copied into each batch of excerpts, and
only the excerpt tokens are computed per batch. The lm_head is applied at the slot positions only.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from neuron_pipeline.interp.llm_protocol import ChatRequest, ChatResponse, SlotDistributions, TokenLogprobs
from neuron_pipeline.interp.prompts import MAX_VALUE
from neuron_pipeline.interp.simulator import refill_slots
from neuron_pipeline.subject.loading import SubjectLoadError, resolve_device, resolve_model_path

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LOADED: dict[tuple, tuple] = {}
_LOAD_LOCK = threading.Lock()


def _load(model: str, device: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    key = (model, device, dtype)
    with _LOAD_LOCK:
        if key not in _LOADED:
            hf_logging.disable_progress_bar()
            model_id, location = resolve_model_path(model)
            try:
                tokenizer = AutoTokenizer.from_pretrained(location)
                weights = AutoModelForCausalLM.from_pretrained(location, dtype=_DTYPES[dtype])
            except (OSError, ValueError) as exc:
                raise SubjectLoadError(f"cannot load LLM {model!r}: {str(exc).splitlines()[0][:200]}") from None
            weights.eval().requires_grad_(False).to(resolve_device(device))
            _LOADED[key] = (model_id, tokenizer, weights)
        return _LOADED[key]


@dataclass(frozen=True)
class _ValueTokens:
    """How the values 0..10 are written in tokens after a tab.

    With tokenizers that split digits (Llama, SmolLM), "10" is "1" then "0": the slot
    distribution gives p("1") for 1 and 10 together, and a second pass with "1" in the slot
    splits it by p("0" | "1") against p(end of line | "1")."""

    first: tuple[int, ...]  # first token of each value
    split_first: int | None  # the first token shared by a one-token and a two-token value
    split_short: int | None  # value written with that token alone (1)
    split_long: int | None  # value written with it plus `split_second` (10)
    split_second: int | None
    newline: int | None
    split_text: str | None


def _value_tokens(tokenizer) -> _ValueTokens:
    base = tokenizer.encode("x\t", add_special_tokens=False)
    sequences = []
    for value in range(MAX_VALUE + 1):
        ids = tokenizer.encode(f"x\t{value}\n", add_special_tokens=False)
        assert ids[: len(base)] == base, "tokenizer merges the tab with the value"
        sequences.append(ids[len(base) :])
    newline = tokenizer.encode("x\t0\n", add_special_tokens=False)[len(base) + 1 :]
    first = tuple(seq[0] for seq in sequences)
    split_first = split_short = split_long = split_second = None
    for value, seq in enumerate(sequences):
        body = seq[:-1] if seq[-1:] == newline[:1] else seq
        if len(body) == 2:
            shorter = [v for v, s in enumerate(sequences) if s[0] == body[0] and v != value]
            if shorter:
                split_first, split_long, split_second, split_short = body[0], value, body[1], shorter[0]
        elif len(body) > 2:
            raise ValueError(f"value {value} takes {len(body)} tokens: unsupported tokenizer")
    return _ValueTokens(
        first,
        split_first,
        split_short,
        split_long,
        split_second,
        newline[0] if newline else None,
        tokenizer.decode([split_first]) if split_first is not None else None,
    )


class LocalLLM:
    """A transformers causal LM on CPU or GPU: ``ChatModel`` and ``ValueDistributionModel``."""

    def __init__(self, model: str = "smollm2-135m-instruct", device: str = "auto", dtype: str = "float32", batch_size: int = 8):
        self.model_name, self.tokenizer, self.model = _load(model, device, dtype)
        self.device = next(self.model.parameters()).device
        self.batch_size = batch_size
        self.values = _value_tokens(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    # --- chat -----------------------------------------------------------------------------

    @torch.inference_mode()
    def chat(self, request: ChatRequest) -> ChatResponse:
        messages = [{"role": role, "content": content} for role, content in request.messages]
        # A final assistant message is a prefill: the model continues it (e.g. "... is find").
        prefill = messages[-1]["role"] == "assistant"
        prompt = self.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=not prefill,
            continue_final_message=prefill,
            return_tensors="pt",
            return_dict=True,
        )
        input_ids = prompt["input_ids"].to(self.device)
        sample = request.temperature > 0 or request.n > 1
        torch.manual_seed(request.seed)
        generated = self.model.generate(
            input_ids,
            attention_mask=prompt["attention_mask"].to(self.device),
            max_new_tokens=request.max_tokens,
            do_sample=sample,
            temperature=request.temperature if sample else None,
            top_p=None,
            top_k=None,
            num_return_sequences=request.n,
            pad_token_id=self.pad_id,
            # Explanations and simulations are line-based; small models loop without these.
            repetition_penalty=1.2,
            stop_strings=request.stop or None,
            tokenizer=self.tokenizer,
            output_scores=request.top_logprobs > 0,
            return_dict_in_generate=True,
        )
        new_tokens = generated.sequences[:, input_ids.shape[1] :]
        eos = self.tokenizer.eos_token_id
        texts, completion_tokens, logprobs = [], 0, []
        for row, tokens in enumerate(new_tokens.tolist()):
            if eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            completion_tokens += len(tokens)
            texts.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
            if request.top_logprobs:
                steps = []
                for step, token in enumerate(tokens):
                    scores = torch.log_softmax(generated.scores[step][row].float(), -1)
                    top = torch.topk(scores, request.top_logprobs)
                    steps.append(
                        TokenLogprobs(
                            self.tokenizer.decode([token]),
                            float(scores[token]),
                            {self.tokenizer.decode([i]): float(v) for v, i in zip(top.values.tolist(), top.indices.tolist())},
                        )
                    )
                logprobs.append(tuple(steps))
        return ChatResponse(tuple(texts), int(input_ids.shape[1]) * request.n, completion_tokens, tuple(logprobs))

    # --- all-at-once value distributions -----------------------------------------------------

    def _encode_suffix(self, suffix: str, slots: Sequence[int]) -> tuple[list[int], list[int]]:
        encoded = self.tokenizer(suffix, add_special_tokens=False, return_offsets_mapping=True)
        starts = [start for start, _ in encoded["offset_mapping"]]
        index_of = {start: i for i, start in enumerate(starts)}
        slot_tokens = []
        for slot in slots:
            if slot not in index_of:
                raise ValueError(f"no token starts at value slot offset {slot}: the prompt format broke tokenization")
            slot_tokens.append(index_of[slot])
        return encoded["input_ids"], slot_tokens

    def _run_prefix(self, prefix_ids: list[int]) -> tuple[object, torch.Tensor, int]:
        """The shared prefix's KV cache, its last hidden state and its length."""
        out = self.model.base_model(input_ids=torch.tensor([prefix_ids], device=self.device), use_cache=True)
        return out.past_key_values, out.last_hidden_state[0, -1], len(prefix_ids)

    def _slot_logits(self, prefix: tuple[object, torch.Tensor, int], suffix_ids: list[list[int]], positions: list[list[int]]) -> list[torch.Tensor]:
        """Log-probabilities [len(positions[i]), vocab] of the token *following* each listed
        suffix position (-1 means the last prefix token), after the prefix run by ``_run_prefix``
        (computed once per neuron, its KV cache copied into every batch)."""
        base = self.model.base_model
        head = self.model.get_output_embeddings()
        prefix_cache, last_prefix_hidden, n_prefix = prefix
        results: list[torch.Tensor] = [None] * len(suffix_ids)  # type: ignore[list-item]
        for start in range(0, len(suffix_ids), self.batch_size):
            rows = list(range(start, min(start + self.batch_size, len(suffix_ids))))
            length = max(len(suffix_ids[r]) for r in rows)
            batch = torch.full((len(rows), length), self.pad_id, dtype=torch.long, device=self.device)
            for i, r in enumerate(rows):
                batch[i, : len(suffix_ids[r])] = torch.tensor(suffix_ids[r], device=self.device)
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(rows))
            # Right padding: real tokens never attend to the pads that follow them.
            hidden = base(
                input_ids=batch,
                past_key_values=cache,
                cache_position=torch.arange(n_prefix, n_prefix + length, device=self.device),
                use_cache=True,
            ).last_hidden_state
            for i, r in enumerate(rows):
                index = torch.tensor(positions[r], device=self.device)
                picked = hidden[i].index_select(0, index.clamp(min=0))
                picked = torch.where((index < 0)[:, None], last_prefix_hidden[None, :], picked)
                results[r] = torch.log_softmax(head(picked).float(), dim=-1)
        return results

    def _distributions(self, slot_logprobs: torch.Tensor, split_logprobs: torch.Tensor | None) -> np.ndarray:
        probs = slot_logprobs.exp()[:, list(self.values.first)].double()  # [slots, 11]
        v = self.values
        if v.split_first is not None:
            shared = probs[:, v.split_short].clone()  # p(first token), shared by e.g. 1 and 10
            follow = split_logprobs.exp().double()
            p_long, p_end = follow[:, v.split_second], follow[:, v.newline]
            ratio = torch.where(p_long + p_end > 0, p_long / (p_long + p_end), torch.zeros_like(p_long))
            probs[:, v.split_short] = shared * (1 - ratio)
            probs[:, v.split_long] = shared * ratio
        return probs.cpu().numpy()

    @torch.inference_mode()
    def value_distributions(self, prefix: str, suffixes: Sequence[str], slots: Sequence[Sequence[int]]) -> list[SlotDistributions]:
        if not suffixes:
            return []
        prefix_ids = self.tokenizer(prefix)["input_ids"]
        encoded = [self._encode_suffix(s, sl) for s, sl in zip(suffixes, slots)]
        prefix_run = self._run_prefix(prefix_ids)
        slot_logprobs = self._slot_logits(prefix_run, [e[0] for e in encoded], [[i - 1 for i in e[1]] for e in encoded])
        split = [None] * len(suffixes)
        if self.values.split_first is not None:
            refilled = [refill_slots(s, sl, self.values.split_text) for s, sl in zip(suffixes, slots)]
            encoded2 = [self._encode_suffix(s, sl) for s, sl in refilled]
            split = self._slot_logits(prefix_run, [e[0] for e in encoded2], [e[1] for e in encoded2])
        return [
            # The whole vocabulary is seen: every value token's mass is captured.
            SlotDistributions(self._distributions(lp, sp), len(prefix_ids) + len(e[0]), np.ones(len(e[1])))
            for lp, sp, e in zip(slot_logprobs, split, encoded)
        ]

    @torch.inference_mode()
    def reference_value_distributions(self, prefix: str, suffixes: Sequence[str], slots: Sequence[Sequence[int]]) -> list[SlotDistributions]:
        """The slow reference: one plain full-model forward pass per excerpt (and per refill),
        no batching, no prefix reuse. Used to check the fast path."""
        prefix_ids = self.tokenizer(prefix)["input_ids"]

        def logprobs_after(suffix: str, suffix_slots: Sequence[int], shift: int) -> torch.Tensor:
            ids, slot_tokens = self._encode_suffix(suffix, suffix_slots)
            logits = self.model(input_ids=torch.tensor([prefix_ids + ids], device=self.device)).logits[0]
            rows = [len(prefix_ids) + i + shift for i in slot_tokens]
            return torch.log_softmax(logits[rows].float(), dim=-1)

        results = []
        for suffix, suffix_slots in zip(suffixes, slots):
            slot_lp = logprobs_after(suffix, suffix_slots, -1)
            split_lp = None
            if self.values.split_first is not None:
                refilled, new_slots = refill_slots(suffix, suffix_slots, self.values.split_text)
                split_lp = logprobs_after(refilled, new_slots, 0)
            results.append(SlotDistributions(self._distributions(slot_lp, split_lp)))
        return results

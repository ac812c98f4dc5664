"""The method, as small pure functions over plain dataclasses. No Dagster import here:
a researcher can use it in a notebook."""

from neuron_pipeline.interp.baseline import BaselineExplainer, BaselineSimulator
from neuron_pipeline.interp.classification import ScorerResult, ScoringSample, classification_metrics, scoring_sample
from neuron_pipeline.interp.contrastive import ContrastiveExplainer
from neuron_pipeline.interp.detection import DetectionScorer
from neuron_pipeline.interp.embedding_scoring import EmbeddingScorer
from neuron_pipeline.interp.fuzzing import FuzzingScorer
from neuron_pipeline.interp.explainer import Explainer, Explanation, LLMExplainer, parse_explanation
from neuron_pipeline.interp.llm_protocol import ChatModel, ChatRequest, ChatResponse, ValueDistributionModel
from neuron_pipeline.interp.records import (
    ActivationRecord,
    NeuronId,
    NeuronRecord,
    RecordSplits,
    interleaved_splits,
    neuron_records_from_rows,
    split_records,
)
from neuron_pipeline.interp.scoring import Score, ScoredSequence, score_simulation
from neuron_pipeline.interp.simulator import (
    AllAtOnceSimulator,
    ChatSimulator,
    SequenceSimulation,
    Simulator,
    expected_values,
    parse_simulated_values,
)
from neuron_pipeline.interp.variants import CalibratedSimulator, RefiningExplainer, fit_calibration

__all__ = [
    "ContrastiveExplainer",
    "DetectionScorer",
    "EmbeddingScorer",
    "FuzzingScorer",
    "ScorerResult",
    "ScoringSample",
    "classification_metrics",
    "scoring_sample",
    "ActivationRecord",
    "AllAtOnceSimulator",
    "CalibratedSimulator",
    "ChatModel",
    "ChatRequest",
    "ChatResponse",
    "ChatSimulator",
    "LLMExplainer",
    "RefiningExplainer",
    "ValueDistributionModel",
    "expected_values",
    "fit_calibration",
    "parse_explanation",
    "parse_simulated_values",
    "BaselineExplainer",
    "BaselineSimulator",
    "Explainer",
    "Explanation",
    "NeuronId",
    "NeuronRecord",
    "RecordSplits",
    "Score",
    "ScoredSequence",
    "SequenceSimulation",
    "Simulator",
    "interleaved_splits",
    "neuron_records_from_rows",
    "score_simulation",
    "split_records",
]

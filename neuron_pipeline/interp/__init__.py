"""The method, as small pure functions over plain dataclasses. No Dagster import here:
a researcher can use it in a notebook."""

from neuron_pipeline.interp.baseline import BaselineExplainer, BaselineSimulator
from neuron_pipeline.interp.explainer import Explainer, Explanation
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
from neuron_pipeline.interp.simulator import SequenceSimulation, Simulator

__all__ = [
    "ActivationRecord",
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

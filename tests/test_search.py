"""Search by meaning: explanation_embeddings, `neuron-pipeline search`, the viewer's similar neurons.

Two neurons of a real small lake get planted explanations about money; the embeddings asset
re-embeds only those two, a query about money finds the planted neuron first, and the viewer
lists the other planted neuron as its most similar one.
"""

from __future__ import annotations

import shutil

import dagster as dg
import numpy as np
import polars as pl
import pytest

from neuron_pipeline.cli import main
from neuron_pipeline.definitions import build_definitions
from neuron_pipeline.lake import read_table, write_table
from neuron_pipeline.lake.search import SearchError, nearest_neighbours, search
from neuron_pipeline.viewer.build import read_neuron
from neuron_pipeline.viewer import build_viewer

from conftest import small_settings

PLANTED = {
    ("1", 5): 'the tokens "money" (10), "pounds" (8), "shillings" (6), "guineas" (5)',
    ("0", 2): 'sums of money: pounds, shillings and pence',
}


def _embed(settings, instance=None):
    defs = build_definitions(settings)
    result = dg.materialize(
        list(defs.assets),
        selection=[dg.AssetKey("explanation_embeddings")],
        resources=defs.resources,
        instance=instance or dg.DagsterInstance.ephemeral(),
        tags={"dagster/asset_partition_range_start": "0", "dagster/asset_partition_range_end": "1"},
    )
    assert result.success
    [event, *_] = result.get_asset_materialization_events()
    return event.materialization.metadata["newly_embedded"].value


@pytest.fixture(scope="module")
def planted(small_lake, tmp_path_factory):
    lake = tmp_path_factory.mktemp("planted") / "lake"
    shutil.copytree(small_lake, lake)
    explanations = read_table(lake, "explanations")
    for (layer, neuron), text in PLANTED.items():
        match = (pl.col("layer") == layer) & (pl.col("neuron") == neuron)
        explanations = explanations.with_columns(pl.when(match).then(pl.lit(text)).otherwise("explanation").alias("explanation"))
    write_table(lake, "explanations", explanations, replace_where={"layer": ["0", "1"]})
    settings = small_settings(lake, layers="0-1")
    return {"lake": lake, "settings": settings, "newly_embedded": _embed(settings)}


def test_the_pipeline_embeds_every_explanation(small_lake):
    explanations = read_table(small_lake, "explanations").filter(pl.col("error").is_null())
    embeddings = read_table(small_lake, "explanation_embeddings")
    assert embeddings.height == explanations.height == 16
    assert (embeddings["embedding"].list.len() == 384).all()
    assert set(embeddings["embedding_model"]) == {"all-MiniLM-L6-v2"}


def test_a_changed_explanation_re_embeds_only_itself(planted):
    assert planted["newly_embedded"] == len(PLANTED)
    assert _embed(planted["settings"]) == 0  # nothing changed since


def test_a_query_about_a_planted_neurons_token_finds_it_first(planted):
    hits = search(planted["lake"], "money", top=3)
    assert (hits["layer"][0], hits["neuron"][0]) in PLANTED
    assert {(l, n) for l, n in hits.head(2).select("layer", "neuron").iter_rows()} == set(PLANTED)
    assert hits["similarity"].is_sorted(descending=True) and hits["rank"].to_list() == [1, 2, 3]
    assert hits["explanation"][0] == PLANTED[(hits["layer"][0], hits["neuron"][0])]
    assert hits["score"].is_not_null().all()  # joined to its best score
    only_layer_1 = search(planted["lake"], "money", layers=[1], top=3)
    assert set(only_layer_1["layer"]) == {"1"} and (only_layer_1["layer"][0], only_layer_1["neuron"][0]) == ("1", 5)


def test_cli_search_prints_the_planted_neuron_first(planted, capsys):
    assert main(["search", "coins and money", "--lake", str(planted["lake"]), "--top", "4", "--layers", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.strip("│ ").split("┆") for line in out.splitlines() if line.startswith("│ ")]
    results = [cells for cells in rows if cells[0].strip().isdigit()]
    assert [cells[0].strip() for cells in results] == ["1", "2", "3", "4"]
    assert (results[0][2].strip(), results[0][3].strip()) == ("1", "5")
    assert '"money"' in results[0][-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["   "], "empty search query"),
        (["money", "--top", "0"], "at least 1 result"),
        (["money", "--layers", "7"], "no embedded explanations in layers 7"),
        (["money", "--layers", "x"], "cannot read layer selection"),
    ],
)
def test_bad_search_input_is_one_line(planted, capsys, args, message):
    assert main(["search", *args, "--lake", str(planted["lake"])]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_lake_without_embeddings_says_what_to_run(small_lake, tmp_path, capsys):
    lake = tmp_path / "lake"
    shutil.copytree(small_lake, lake)
    shutil.rmtree(lake / "explanation_embeddings")
    assert main(["search", "money", "--lake", str(lake)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no explanation_embeddings table" in err and "neuron-pipeline run" in err and len(err.splitlines()) == 1
    with pytest.raises(SearchError):
        search(lake, "money")


def test_viewer_lists_similar_neurons_and_output_tokens(planted, tmp_path):
    build_viewer(planted["lake"], tmp_path / "viewer")
    page = read_neuron(tmp_path / "viewer", "1", 5)["html"]
    similar = page.split('id="similar"', 1)[1].split("</section>", 1)[0]
    first_link = similar.split('<a href="', 1)[1].split('"', 1)[0]
    assert first_link == "../layer_0/neuron.html#2"  # the other planted neuron, across layers
    assert read_neuron(tmp_path / "viewer", "0", 2) is not None
    assert similar.count("<tr><td><a href=") == 5  # five neighbours per explanation
    outputs = read_table(planted["lake"], "neuron_output_tokens", where={"layer": "1", "neuron": 5}).row(0, named=True)
    section = page.split('id="output-tokens"', 1)[1].split("</section>", 1)[0]
    for token in outputs["promoted_tokens"][:10] + outputs["suppressed_tokens"][:10]:
        escaped = repr(token)[1:-1].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;").replace("'", "&#x27;")
        assert escaped in section


def test_nearest_neighbours_exclude_the_same_neuron_and_rank_by_similarity():
    vectors = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.95, 0.05]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    groups = np.array([0, 1, 2, 0])  # rows 0 and 3 are one neuron
    indices, similarities = nearest_neighbours(vectors, groups, k=3, chunk=2)
    assert indices[0].tolist() == [1, 2, -1]  # not itself, not row 3 of the same neuron
    assert indices[1].tolist() == [3, 0, 2]
    assert np.all(np.diff(similarities[1]) <= 0) and np.isnan(similarities[0, 2])


def test_nearest_neighbours_of_some_queries_among_allowed_rows():
    vectors = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.95, 0.05]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    groups = np.arange(4)
    # Only row 0's neighbours, and row 3 (another explainer, say) is not a candidate.
    allowed = np.array([True, True, True, False])
    indices, similarities = nearest_neighbours(vectors, groups, k=2, queries=np.array([0]), allowed=allowed)
    assert indices.tolist() == [[1, 2]]
    full, _ = nearest_neighbours(vectors, groups, k=2)
    assert full[0].tolist() == [3, 1]  # allowed changes the answer: the test can fail


def test_the_embedder_agrees_with_float32_in_its_chosen_dtype():
    """The embedder runs in bfloat16 where the CPU has it natively (llm/embeddings.py): its vectors
    must stay those of float32 for search to mean the same thing."""
    import torch

    from neuron_pipeline.llm.embeddings import SentenceEmbedder, default_dtype

    texts = [
        'the tokens "monday" (10), "friday" (9), "sunday" (7)', "names of days of the week", "a comma after a clause",
        "words about money and prices", "the word 'house'", 'the tokens "," (10)', "verbs in the past tense",
    ]
    reference = SentenceEmbedder(dtype=torch.float32).embed(texts)
    chosen = SentenceEmbedder().embed(texts)
    assert SentenceEmbedder().dtype == default_dtype()
    assert chosen.dtype == np.float32
    assert np.allclose(np.linalg.norm(chosen, axis=1), 1.0, atol=1e-5)
    cosine = (reference * chosen).sum(1)
    assert cosine.min() > 0.999, cosine
    # The same nearest neighbour for every text.
    assert ((reference @ reference.T - 2 * np.eye(len(texts))).argmax(1) == (chosen @ chosen.T - 2 * np.eye(len(texts))).argmax(1)).all()

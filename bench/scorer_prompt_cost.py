"""Prompt tokens per explanation of each scorer next to the simulator's, counted with the SmolLM2 tokenizer on the
prompts the code builds from a lake (no generation): the quick cost figure of BENCHMARKS.md section 9.
Usage: python bench/scorer_prompt_cost.py (reads the lake of bench/scorer_bench.py at /tmp/scorers/light_work)."""
import polars as pl, math
from transformers import AutoTokenizer
from neuron_pipeline.subject.loading import resolve_model_path
from neuron_pipeline.lake import read_table
from neuron_pipeline.interp.records import neuron_records_from_rows, split_records
from neuron_pipeline.interp.classification import scoring_sample, records_seen
from neuron_pipeline.interp.detection import DetectionScorer
from neuron_pipeline.interp.fuzzing import FuzzingScorer
from neuron_pipeline.interp.classification import shuffled_groups
from neuron_pipeline.interp.explainer import render_chat
from neuron_pipeline.interp.simulator import AllAtOnceSimulator, excerpt_suffix, ChatSimulator
_, path = resolve_model_path("smollm2-135m-instruct")
tok = AutoTokenizer.from_pretrained(path)
lake = "/tmp/scorers/light_work/lake"
ex = read_table(lake, "explanations").filter(~pl.col("explainer_id").str.starts_with("baseline-"))
recs = neuron_records_from_rows(read_table(lake, "activation_records", where={"layer": ["0", "29"], "neuron": 0}).iter_rows(named=True))
class M: model_name = "x"
det, fuz = DetectionScorer(M()), FuzzingScorer(M())
def count(messages):
    msgs = [{"role": r, "content": c} for r, c in messages]
    text = tok.apply_chat_template(msgs, continue_final_message=msgs[-1]["role"] == "assistant", add_generation_prompt=msgs[-1]["role"] != "assistant", tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])
rows = []
for row in ex.iter_rows(named=True):
    key = next(k for k in recs if k.layer == int(row["layer"]))
    rec = recs[key]; splits = split_records(rec, 5, 5, 5)
    sample = scoring_sample(rec, splits.explain + splits.holdout_random[:4], 10, 10)
    lab = sample.labelled
    d = [count(det.messages(row["explanation"], [lab[i][0].tokens for i in g])) for g in shuffled_groups(len(lab), 5, ("detection", 0))]
    marked = fuz.marked_excerpts(sample, 0)
    f = [count(render_chat(fuz.template, explanation=row["explanation"], excerpts="\n".join(f"{i}: {marked[j][2]}" for i, j in enumerate(g, 1)))) for g in shuffled_groups(len(marked), 5, ("fuzzing", 0))]
    sim = AllAtOnceSimulator.__new__(AllAtOnceSimulator); 
    from neuron_pipeline.interp.prompts import load_template
    t = load_template("simulator_v1", required=("explanation",))
    prefix = t.render(explanation=row["explanation"])
    scored = splits.score_top + splits.score_random
    s_all = len(tok(prefix)["input_ids"]) + sum(len(tok(excerpt_suffix(r.tokens)[0])["input_ids"]) for r in scored)
    cs = ChatSimulator.__new__(ChatSimulator); cs.template = t; cs.use_logprobs = True
    s_chat = sum(count(cs.request(row["explanation"], r.tokens).messages) for r in scored)
    chat_completion = sum(len(tok("".join(f"{x}\t0\n" for x in r.tokens))["input_ids"]) for r in scored)
    rows.append(dict(explainer=row["explainer_id"][:11], layer=row["layer"], judged=len(lab), det_calls=len(d), det_prompt=sum(d), fuz_calls=len(f), fuz_prompt=sum(f),
                     sim_excerpts=len(scored), sim_all_at_once_prompt=s_all, chat_sim_prompt=s_chat, chat_sim_completion=chat_completion))
df = pl.DataFrame(rows)
with pl.Config(tbl_cols=-1, tbl_width_chars=250): print(df)
print(df.mean())

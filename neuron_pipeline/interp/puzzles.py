"""Ground-truth puzzles for explainers and simulators, written for this project.

Each puzzle is a made-up neuron with a stated rule: a handful of sentences whose per-token
activations follow the rule, the true explanation, and plausible false ones (too broad, too
narrow, a neighbouring topic, a subset of the tokens, the token next door). A good simulator
scores the true explanation above every false one; a good explainer, shown the sentences,
writes an explanation that scores close to the true one.

Sentences are cut into word-level tokens the way GPT-style tokenizers write them (a leading
space belongs to the word; punctuation stands alone), so the prompts look like real excerpts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from neuron_pipeline.interp.records import ActivationRecord

PUZZLE_SET_VERSION = "puzzles_v1"
_TOKEN = re.compile(r"\s*[A-Za-z]+(?:'[a-z]+)?|\s*\d+|\s*[^\sA-Za-z\d]")

# A rule sees the sentence's tokens and returns one activation (0-10) per token.
Rule = Callable[[Sequence[str]], list[float]]


def tokenize(sentence: str) -> tuple[str, ...]:
    tokens = tuple(_TOKEN.findall(sentence))
    if "".join(tokens) != sentence:
        raise ValueError(f"puzzle sentence does not tokenize back to itself: {sentence!r}")
    return tokens


def _word(token: str) -> str:
    return token.strip().lower()


def words(strengths: dict[str, float] | Sequence[str]) -> Rule:
    """Fires on the listed words (case-insensitive), 10 or the strength given."""
    table = dict(strengths) if isinstance(strengths, dict) else {w: 10.0 for w in strengths}
    table = {w.lower(): v for w, v in table.items()}
    return lambda tokens: [table.get(_word(t), 0.0) for t in tokens]


def after(previous: Sequence[str], target: Sequence[str] | None = None, value: float = 10.0) -> Rule:
    """Fires on a token that follows one of ``previous`` (and is one of ``target`` when given)."""
    before = {p.lower() for p in previous}
    wanted = None if target is None else {t.lower() for t in target}

    def rule(tokens: Sequence[str]) -> list[float]:
        out = [0.0] * len(tokens)
        for i in range(1, len(tokens)):
            if _word(tokens[i - 1]) in before and (wanted is None or _word(tokens[i]) in wanted):
                out[i] = value
        return out

    return rule


def matching(predicate: Callable[[int, Sequence[str]], bool], value: float = 10.0) -> Rule:
    return lambda tokens: [value if predicate(i, tokens) else 0.0 for i in range(len(tokens))]


@dataclass(frozen=True)
class Puzzle:
    name: str
    kind: str  # single_token | token_family | syntax | position | topic | phrase | negation
    true_explanation: str
    false_explanations: tuple[str, ...]
    records: tuple[ActivationRecord, ...]
    answer_words: tuple[str, ...]  # words an explainer's explanation should mention (any of them)

    @property
    def explanations(self) -> tuple[str, ...]:
        return (self.true_explanation, *self.false_explanations)


def puzzle(
    name: str,
    kind: str,
    rule: Rule,
    sentences: Sequence[str],
    true: str,
    false: Sequence[str],
    answer_words: Sequence[str],
) -> Puzzle:
    records = []
    for i, sentence in enumerate(sentences):
        tokens = tokenize(sentence)
        records.append(ActivationRecord(tokens, tuple(float(v) for v in rule(tokens)), sequence_id=i))
    if not any(r.max_activation > 0 for r in records):
        raise ValueError(f"puzzle {name!r}: the rule never fires on its sentences")
    if len(false) < 3:
        raise ValueError(f"puzzle {name!r} needs at least three false explanations")
    return Puzzle(name, kind, true, tuple(false), tuple(records), tuple(answer_words))


DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october", "november", "december"]  # fmt: skip
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink", "brown"]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty", "hundred"]  # fmt: skip
ANIMALS = ["dog", "dogs", "cat", "cats", "horse", "horses", "cow", "cows", "sheep", "fox", "owl", "rabbit", "goat", "mouse", "lion"]  # fmt: skip
FAMILY = ["mother", "father", "sister", "brother", "aunt", "uncle", "cousin", "daughter", "son", "grandmother", "niece"]  # fmt: skip
BODY = ["hand", "hands", "arm", "knee", "foot", "feet", "head", "shoulder", "finger", "fingers", "elbow", "neck", "eyes"]  # fmt: skip
WEATHER = ["rain", "raining", "snow", "wind", "windy", "storm", "cloudy", "clouds", "sunny", "fog", "thunder", "hail", "drizzle"]  # fmt: skip
FOOD = ["bread", "soup", "bake", "baked", "oven", "flour", "butter", "roast", "cake", "dough", "stew", "onions", "recipe"]  # fmt: skip
SPORT = ["ball", "goal", "team", "match", "score", "scored", "referee", "striker", "league", "kicked", "pitch", "players"]  # fmt: skip
MEDICINE = ["doctor", "fever", "medicine", "hospital", "nurse", "patient", "illness", "pills", "surgery", "cough", "clinic"]  # fmt: skip
MUSIC = ["song", "songs", "piano", "sing", "sang", "melody", "violin", "choir", "tune", "orchestra", "guitar", "concert"]  # fmt: skip
MONEY = ["money", "pounds", "dollars", "coins", "price", "paid", "bank", "cost", "cheap", "wages", "rent", "debt"]  # fmt: skip
PRONOUNS = ["he", "she", "they", "him", "her", "them"]
PREPOSITIONS = ["in", "on", "under", "above", "beside", "behind", "between", "into", "across", "over"]
NEGATIONS = ["not", "never", "no", "nobody", "nothing", "n't", "neither", "nor"]


def _capitalised_inside(i: int, tokens: Sequence[str]) -> bool:
    word = tokens[i].strip()
    return i > 0 and word[:1].isupper() and word.isalpha() and tokens[i - 1].strip() not in {".", "!", "?", '"'}


def _sentence_start(i: int, tokens: Sequence[str]) -> bool:
    return i == 0 or tokens[i - 1].strip() in {".", "!", "?"}


def _before_full_stop(i: int, tokens: Sequence[str]) -> bool:
    return i + 1 < len(tokens) and tokens[i + 1].strip() == "." and tokens[i].strip().isalpha()


def _ends_in(suffix: str, exclude: Sequence[str] = ()) -> Callable[[int, Sequence[str]], bool]:
    excluded = set(exclude)
    return lambda i, tokens: _word(tokens[i]).endswith(suffix) and len(_word(tokens[i])) > len(suffix) + 2 and _word(tokens[i]) not in excluded  # noqa: E731


def _negated(tokens: Sequence[str]) -> list[float]:
    """The word right after a negation (the negated word), strongest; the negation itself weakly."""
    out = [0.0] * len(tokens)
    for i in range(1, len(tokens)):
        if _word(tokens[i - 1]) in {"not", "never", "n't"} and tokens[i].strip().isalpha():
            out[i] = 10.0
    return out


PUZZLES: tuple[Puzzle, ...] = (
    # --- single tokens -------------------------------------------------------------------------
    puzzle("the", "single_token", words(["the"]), [
        "She left the house before the sun rose over the hills.",
        "A dog and a cat slept by the fire.",
        "They asked the teacher about the test.",
        "Birds sing in spring and autumn.",
    ], 'the word "the"', [
        'the articles "a" and "an"',
        "the first word of every noun phrase",
        'the word "then"',
        "nouns that come after an article",
    ], ["the"]),
    puzzle("and", "single_token", words(["and"]), [
        "Bread and butter and jam were on the table.",
        "He ran fast, but she was faster.",
        "We sang and danced until midnight.",
        "Salt, pepper or vinegar are all fine.",
    ], 'the word "and"', [
        "commas in lists",
        'the word "or"',
        'joining words such as "but", "or" and "yet"',
        "food served at breakfast",
    ], ["and"]),
    puzzle("question_mark", "single_token", words(["?"]), [
        "Where did you put the keys?",
        "I put them on the shelf.",
        "Why is the sky blue? Nobody knows.",
        "Is it raining? Take an umbrella.",
    ], "question marks", [
        "full stops at the end of sentences",
        'question words such as "where" and "why"',
        "any punctuation mark",
        "the last word of a sentence",
    ], ["question mark", "?"]),
    puzzle("time", "single_token", words(["time"]), [
        "It was time to leave, so we packed our bags.",
        "Once upon a time there lived a king.",
        "The clock struck nine and the hours went slowly.",
        "She had no time for his stories.",
    ], 'the word "time"', [
        "words about clocks and hours",
        'the word "times" in multiplication',
        "nouns in general",
        "the beginning of fairy tales",
    ], ["time"]),
    puzzle("love", "single_token", words(["love"]), [
        "I love the smell of rain.",
        "Their love grew stronger every year.",
        "She felt great joy and a little fear.",
        "We all love a good story.",
    ], 'the word "love"', [
        "words for feelings such as joy and fear",
        'the word "like"',
        "romance and marriage",
        "verbs that follow a pronoun",
    ], ["love"]),
    # --- token families ------------------------------------------------------------------------
    puzzle("days", "token_family", words(DAYS), [
        "We met on Monday and again on Thursday.",
        "The shop is closed every Sunday.",
        "In March the days grow longer.",
        "By Friday evening everyone was tired.",
    ], "names of the days of the week", [
        "names of the months",
        "words about time and dates",
        'the word "Monday"',
        "capitalised words",
    ], ["day", "days", "monday", "week"]),
    puzzle("months", "token_family", words(MONTHS), [
        "The garden blooms in May and June.",
        "School starts again in September.",
        "On Tuesday we went to the market.",
        "The snow lasted from December until February.",
    ], "names of the months", [
        "names of the days of the week",
        "the seasons of the year",
        'the word "May"',
        "words about gardens and flowers",
    ], ["month", "months"]),
    puzzle("colours", "token_family", words(COLOURS), [
        "She wore a red coat and blue shoes.",
        "The grass was green after the rain.",
        "A tall man with a loud voice walked in.",
        "Paint the door white and the fence black.",
    ], "names of colours", [
        "names of fruits",
        "adjectives describing things",
        'the word "red"',
        "clothes and shoes",
    ], ["colour", "color", "colours", "colors"]),
    puzzle("number_words", "token_family", words(NUMBER_WORDS), [
        "She bought three apples and two pears.",
        "There were twelve chairs but only ten guests.",
        "Many people came and a few stayed.",
        "He waited for one hour.",
    ], "numbers written out as words", [
        "digits such as 3 and 12",
        'the word "one"',
        'quantity words such as "many" and "few"',
        "fruit and vegetables",
    ], ["number", "numbers"]),
    puzzle("animals", "token_family", words(ANIMALS), [
        "The dog chased the cat across the yard.",
        "A fox watched the rabbit from the hedge.",
        "The oak tree and the rose bush grew tall.",
        "Cows and horses grazed in the field.",
    ], "names of animals", [
        "pets such as dogs and cats",
        "plants and trees",
        "nouns in general",
        "farms and fields",
    ], ["animal", "animals"]),
    puzzle("family", "token_family", words(FAMILY), [
        "My mother and my aunt visited yesterday.",
        "His brother lives with their uncle.",
        "Anna and John walked to the station.",
        "The daughter wrote to her father every week.",
    ], "words for family members", [
        "people's first names",
        'the word "mother"',
        "pronouns such as his and her",
        "places where people live",
    ], ["family", "relative", "relatives", "mother", "father"]),
    puzzle("body_parts", "token_family", words(BODY), [
        "He hurt his knee and his left hand.",
        "She raised her arm above her head.",
        "They wore coats, hats and gloves.",
        "The cat licked its feet and neck.",
    ], "parts of the body", [
        "clothing such as hats and gloves",
        'the word "hand"',
        "verbs of movement",
        "animals and their habits",
    ], ["body"]),
    puzzle("pronouns", "token_family", words(PRONOUNS), [
        "He said that she would come later.",
        "They gave him a book and her a pen.",
        "Mary told John the news.",
        "We thanked them for the dinner.",
    ], 'third-person pronouns such as "he", "she" and "they"', [
        "people's names",
        'the word "he"',
        'all pronouns including "I" and "we"',
        "verbs of speaking",
    ], ["pronoun", "pronouns"]),
    puzzle("money", "token_family", words(MONEY), [
        "The rent cost forty pounds a week.",
        "He paid the bank all his debt.",
        "The river flowed past the old mill.",
        "Bread was cheap but wages were low.",
    ], "words about money and prices", [
        "numbers and amounts",
        "rivers and water",
        'the word "pounds"',
        "food and shopping",
    ], ["money", "price", "prices", "cost", "payment"]),
    # --- syntax --------------------------------------------------------------------------------
    puzzle("past_tense_ed", "syntax", matching(_ends_in("ed", exclude=["red", "bed", "need", "seed", "feed", "speed", "hundred"])), [
        "She walked home and opened the door.",
        "They played cards and laughed all night.",
        "I need a red bed for the spare room.",
        "He jumped and landed on the grass.",
    ], 'verbs in the past tense ending in "-ed"', [
        "verbs in the present tense",
        "any word that ends in the letter d",
        'the word "walked"',
        "nouns for places",
    ], ["past", "-ed", "ed"]),
    puzzle("adverbs_ly", "syntax", matching(_ends_in("ly", exclude=["only", "early", "family", "lovely", "holy", "july"])), [
        "She spoke softly and smiled warmly.",
        "He quickly closed the window.",
        "The tall man had a loud voice.",
        "They waited patiently and quietly.",
    ], 'adverbs ending in "-ly"', [
        "adjectives",
        "verbs",
        'the word "quickly"',
        "words about sound and noise",
    ], ["adverb", "adverbs", "-ly", "ly"]),
    puzzle("commas", "syntax", words([","]), [
        "Apples, pears, plums and cherries grew there.",
        "When the bell rang, everyone stood up.",
        "It was late. We went home.",
        "Yes, I think so, but ask her.",
    ], "commas", [
        "full stops",
        'the word "and"',
        "any punctuation mark",
        "lists of fruit",
    ], ["comma", "commas", ","]),
    puzzle("capitalised_names", "syntax", matching(_capitalised_inside), [
        "Yesterday Anna met Thomas in Paris.",
        "The letter came from London on a rainy day.",
        "We walked along the river at dawn.",
        "My friend Lucy works for Doctor Brown.",
    ], "capitalised names of people and places in the middle of a sentence", [
        "the first word of every sentence",
        "names of cities only",
        "all nouns",
        "words about travel",
    ], ["name", "names", "capital", "capitalised", "capitalized", "proper"]),
    puzzle("prepositions", "syntax", words(PREPOSITIONS), [
        "The cat slept under the table in the kitchen.",
        "He walked across the bridge and over the hill.",
        "She laughed and sang all day.",
        "The book is behind the chair, between two boxes.",
    ], 'prepositions of place such as "in", "under" and "behind"', [
        'articles such as "the" and "a"',
        "nouns for furniture",
        'the word "under"',
        "verbs of motion",
    ], ["preposition", "prepositions", "place", "location", "position"]),
    puzzle("plural_s", "syntax", words(["apples", "books", "trees", "birds", "houses", "chairs", "cars", "friends", "flowers", "shoes"]), [
        "The birds sat in the trees near the houses.",
        "She bought books and flowers for her friends.",
        "A child ate an apple.",
        "Two cars and three chairs were sold.",
    ], "plural nouns", [
        "singular nouns",
        'the word "birds"',
        "numbers before nouns",
        "words about nature",
    ], ["plural", "plurals"]),
    # --- position ------------------------------------------------------------------------------
    puzzle("sentence_start", "position", matching(_sentence_start), [
        "Rain fell all night. Nobody slept.",
        "The train was late. We waited. It came.",
        "After dinner they talked for hours.",
        "Open the door. Let the cat in.",
    ], "the first word of each sentence", [
        "the last word of each sentence",
        'the word "the"',
        "verbs",
        "full stops",
    ], ["first", "start", "beginning", "begin", "begins"]),
    puzzle("after_comma", "position", after([","]), [
        "Apples, pears, plums and cherries grew there.",
        "When the bell rang, everyone stood up.",
        "Yes, I think so, but ask her.",
        "We went home early.",
    ], "the word right after a comma", [
        "commas",
        "the last word of a sentence",
        "names of fruit",
        'the word "and"',
    ], ["after a comma", "following a comma", "comma"]),
    puzzle("before_full_stop", "position", matching(_before_full_stop), [
        "The children played in the garden.",
        "He ate his soup. Then he slept.",
        "Is it time yet?",
        "We left at noon.",
    ], "the last word of a sentence, just before the full stop", [
        "the first word of a sentence",
        "full stops",
        "nouns",
        "question marks",
    ], ["last", "end", "before the full stop", "before a period"]),
    # --- topics --------------------------------------------------------------------------------
    puzzle("weather", "topic", words(WEATHER), [
        "The wind howled and the rain beat on the roof.",
        "A storm was coming, with thunder in the hills.",
        "The river was wide and the water was cold.",
        "It was sunny in the morning but cloudy by noon.",
    ], "words about the weather", [
        "rivers and water",
        "seasons of the year",
        'the word "rain"',
        "times of day",
    ], ["weather"]),
    puzzle("cooking", "topic", words(FOOD), [
        "Mix the flour and butter, then bake the dough.",
        "She made a stew with onions and roast beef.",
        "He drank a cup of tea with milk.",
        "Put the cake in the oven for an hour.",
    ], "words about cooking and baking food", [
        "drinks such as tea and milk",
        "kitchen furniture",
        "farming and crops",
        'the word "bread"',
    ], ["cooking", "baking", "food", "cook", "bake"]),
    puzzle("sport", "topic", words(SPORT), [
        "The striker kicked the ball into the goal.",
        "Our team scored twice and won the match.",
        "The orchestra played a slow tune.",
        "The referee sent two players off the pitch.",
    ], "words about football and sport", [
        "music and concerts",
        "war and battles",
        'the word "goal"',
        "numbers and counting",
    ], ["sport", "sports", "football", "soccer", "game"]),
    puzzle("medicine", "topic", words(MEDICINE), [
        "The doctor gave the patient some pills.",
        "She had a fever and a bad cough.",
        "The teacher marked the students' tests.",
        "He was taken to the hospital for surgery.",
    ], "words about illness and medicine", [
        "schools and teachers",
        "parts of the body",
        'the word "doctor"',
        "sadness and grief",
    ], ["medicine", "medical", "illness", "health", "sickness", "doctor"]),
    puzzle("music", "topic", words(MUSIC), [
        "She played a song on the piano.",
        "The choir sang a quiet melody.",
        "The players ran onto the field.",
        "He tuned his guitar before the concert.",
    ], "words about music", [
        "sports and games",
        "sounds and noises in general",
        'the word "piano"',
        "theatre and acting",
    ], ["music", "musical"]),
    # --- multi-token phrases -------------------------------------------------------------------
    puzzle("of_course", "phrase", after(["of"], ["course"]), [
        "Of course I will help you, of course.",
        "The ship changed course in the storm.",
        "He played a round on the golf course.",
        "You may come too, of course.",
    ], 'the word "course" in the phrase "of course"', [
        'the word "course" wherever it appears',
        'the word "of"',
        "golf and sport",
        "words of agreement",
    ], ["of course"]),
    puzzle("new_york", "phrase", after(["new"], ["york"]), [
        "She moved to New York last year.",
        "He bought a new coat and a new hat.",
        "The streets of New York were busy.",
        "York is an old city in England.",
    ], 'the word "York" in the name "New York"', [
        'the word "new"',
        "names of cities",
        'the word "York" wherever it appears',
        "clothes and shopping",
    ], ["new york"]),
    puzzle("thank_you", "phrase", after(["thank"], ["you"]), [
        "Thank you for the lovely flowers.",
        "I will see you tomorrow.",
        "She said thank you and left.",
        "Did you call me?",
    ], 'the word "you" in "thank you"', [
        'the word "you" wherever it appears',
        'the word "thank"',
        "polite words such as please",
        "pronouns",
    ], ["thank you"]),
    puzzle("as_well_as", "phrase", lambda tokens: [10.0 if i >= 2 and _word(tokens[i]) == "as" and _word(tokens[i - 1]) == "well" and _word(tokens[i - 2]) == "as" else 0.0 for i in range(len(tokens))], [
        "She speaks French as well as German.",
        "He is as tall as his father.",
        "Bring bread as well as cheese.",
        "The well was deep and dark.",
    ], 'the last "as" of the phrase "as well as"', [
        'the word "as" wherever it appears',
        'the word "well"',
        "comparisons",
        "languages",
    ], ["as well as"]),
    # --- negation ------------------------------------------------------------------------------
    puzzle("negation_words", "negation", words(NEGATIONS), [
        "I do not know and I never will.",
        "Nobody came and nothing happened.",
        "Yes, I agree with you completely.",
        "There was no bread left.",
    ], 'negation words such as "not", "never" and "no"', [
        'the word "not"',
        'words of agreement such as "yes"',
        "question words",
        "words about emptiness",
    ], ["negation", "negations", "negative", "not", "never"]),
    puzzle("negated_word", "negation", _negated, [
        "The soup was not hot and the bread was not fresh.",
        "She never sleeps before midnight.",
        "The soup was hot and the bread was fresh.",
        "He did not answer the letter.",
    ], 'the word right after "not" or "never": what is being negated', [
        'the words "not" and "never"',
        "adjectives such as hot and fresh",
        "food and drink",
        "verbs",
    ], ["after not", "negated", "following not", "after \"not\""]),
)


def balanced_subset(count: int, puzzles: Sequence[Puzzle] = PUZZLES) -> tuple[Puzzle, ...]:
    """The first ``count`` puzzles taken round-robin over the kinds, so a short run still covers
    single tokens, families, syntax, position, topics, phrases and negation."""
    by_kind: dict[str, list[Puzzle]] = {}
    for p in puzzles:
        by_kind.setdefault(p.kind, []).append(p)
    chosen: list[Puzzle] = []
    while len(chosen) < min(count, len(puzzles)):
        for group in by_kind.values():
            if group and len(chosen) < count:
                chosen.append(group.pop(0))
    return tuple(chosen)

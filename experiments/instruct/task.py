# ruff: noqa: E501  (the topic table: one topic per line)
"""Instruction following with verifiable constraints, in the style of IFEval (Zhou et al., 2023): the
task of the real-model experiment, where a small instruct model's flaws are habits (it ignores format
instructions it could follow) and a minimal revision fixes each one, exactly CLAIR's setting.

A prompt is a topic question, a request for brevity and one constraint:

    "Describe what the brain does. Keep your answer short. Your entire answer must be in lowercase letters."

Each constraint kind (CONSTRAINTS) has IFEval's wording, a strict checker (IFEval's prompt-level
strict accuracy is the fraction of prompts whose checker passes) and a minimal fix: what the reviser
changes in an answer to make it pass, keeping the rest (lowercase the text; append the phrase; wrap
it in quotes). Topics fall into train, validation and test by a hash of their name, so test prompts
are about topics never seen in training; every split combines its topics with every constraint kind.
Each topic carries a short reference answer, the stand-in for a stronger model's answer (Stronger
Preferred: the reference with its constraint met).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

# topic | question | reference answer (the stronger model's stand-in) | a keyword that fits the topic
_TOPIC_TABLE = """
the moon | Describe the moon. | The Moon is Earth's only natural satellite. It orbits Earth about once every 27 days and its gravity drives the ocean tides. | orbit
photosynthesis | Explain what photosynthesis is. | Photosynthesis is how plants make food from light. They turn water and carbon dioxide into sugar and release oxygen. | sunlight
volcanoes | Explain how volcanoes form. | Volcanoes form where molten rock rises through the crust. Eruptions release lava, ash and gas at the surface. | magma
the heart | Describe what the human heart does. | The heart pumps blood through the body. Its four chambers push oxygen-rich blood out and bring used blood back. | blood
rainbows | Explain why rainbows appear. | Rainbows appear when sunlight passes through raindrops. Each drop bends and splits the light into its colours. | light
bees | Describe why bees matter. | Bees pollinate many of the plants people eat. Without them many fruits and crops would not grow. | pollen
the internet | Explain what the internet is. | The internet is a global network of connected computers. It lets them exchange data using shared protocols. | network
recycling | Explain why recycling is useful. | Recycling turns used materials into new products. It saves resources and reduces waste in landfills. | waste
the pyramids | Describe the pyramids of Giza. | The pyramids of Giza are ancient tombs built for Egyptian kings. The largest was built about 4,500 years ago. | pharaoh
coffee | Describe where coffee comes from. | Coffee is made from the roasted seeds of the coffee plant. It is grown in warm regions such as Brazil and Ethiopia. | beans
tides | Explain what causes tides. | Tides are caused mainly by the Moon's gravity. The oceans bulge toward and away from the Moon as Earth turns. | gravity
earthquakes | Explain why earthquakes happen. | Earthquakes happen when rocks in the crust slip along faults. The sudden movement sends waves through the ground. | faults
the piano | Describe the piano. | The piano is a keyboard instrument. Pressing a key makes a hammer strike a string inside the case. | keys
vaccines | Explain how vaccines work. | Vaccines train the immune system to recognise a germ. The body then fights the real infection faster. | immune
glaciers | Describe what glaciers are. | Glaciers are large masses of ice that move slowly over land. They form where snow builds up faster than it melts. | ice
the olympics | Describe the Olympic Games. | The Olympic Games are an international sports event held every four years. Athletes from many countries compete for medals. | athletes
chess | Describe the game of chess. | Chess is a board game for two players. Each side tries to trap the other's king in checkmate. | strategy
bread | Explain how bread is made. | Bread is made from flour, water and yeast. The dough rises as the yeast makes gas and is then baked. | yeast
solar power | Explain how solar power works. | Solar panels turn sunlight into electricity. Cells made of silicon release electrons when light hits them. | panels
the ocean | Describe the world's oceans. | Oceans cover about seventy percent of Earth's surface. They hold most of the planet's water and shape its climate. | salt
dinosaurs | Describe dinosaurs. | Dinosaurs were reptiles that lived for over 160 million years. Most died out about 66 million years ago. | fossils
clouds | Explain how clouds form. | Clouds form when water vapour cools and condenses into droplets. The droplets gather around tiny bits of dust. | vapour
the violin | Describe the violin. | The violin is a string instrument played with a bow. It has four strings and a bright high voice. | bow
democracy | Explain what democracy is. | Democracy is a system where citizens choose their government. They usually do so by voting in free elections. | vote
antibiotics | Explain what antibiotics do. | Antibiotics are medicines that kill or stop bacteria. They do not work against viruses. | bacteria
lightning | Explain what lightning is. | Lightning is a giant spark of electricity in the sky. It happens when charges build up inside storm clouds. | thunder
the desert | Describe deserts. | Deserts are places that get very little rain. Many are hot by day and cold at night. | sand
honey | Explain how honey is made. | Bees make honey from flower nectar. They store it in wax cells and fan it until it thickens. | nectar
tea | Describe tea. | Tea is a drink made by steeping the leaves of the tea plant in hot water. It is popular across the world. | leaves
mountains | Explain how mountains form. | Mountains form when plates of Earth's crust push together. The land folds and rises over millions of years. | plates
the brain | Describe what the brain does. | The brain controls the body and processes information. It uses billions of nerve cells that send signals. | neurons
snow | Explain how snow forms. | Snow forms when water vapour freezes into ice crystals in cold clouds. The crystals stick together as flakes. | crystals
the printing press | Describe the printing press. | The printing press made it possible to copy books quickly. Johannes Gutenberg built one around 1440. | books
wind power | Explain how wind power works. | Wind turbines turn the motion of the air into electricity. The wind spins blades that drive a generator. | turbine
the rainforest | Describe rainforests. | Rainforests are dense forests with heavy rainfall. They are home to more than half of the world's species. | species
owls | Describe owls. | Owls are birds that mostly hunt at night. They have large eyes and fly almost silently. | night
cheese | Explain how cheese is made. | Cheese is made by curdling milk. The curds are pressed and often aged to develop flavour. | milk
the sun | Describe the sun. | The Sun is the star at the centre of our solar system. Its light and heat make life on Earth possible. | star
magnets | Explain how magnets work. | Magnets attract iron because of their magnetic field. Every magnet has a north and a south pole. | poles
sleep | Explain why people need sleep. | Sleep lets the body and brain recover. It helps memory and keeps the immune system strong. | rest
the telephone | Describe the telephone. | The telephone carries voices over long distances. It turns sound into signals and back into sound. | voice
penguins | Describe penguins. | Penguins are birds that cannot fly but swim very well. Most live in the cold waters of the Southern Hemisphere. | swim
gardening | Describe gardening. | Gardening is growing plants for food or beauty. It needs soil, water and sunlight. | soil
the wheel | Describe the invention of the wheel. | The wheel was invented about 5,500 years ago. It made transport and farming far easier. | cart
rivers | Describe rivers. | Rivers are streams of fresh water that flow toward a sea or lake. They shape valleys and carry soil. | water
stars | Explain what stars are. | Stars are huge balls of hot gas that shine by fusion. The nearest one to us is the Sun. | fusion
the library | Describe what a library is. | A library is a place that lends books and other media. It is open to everyone who wants to learn. | reading
bicycles | Describe bicycles. | A bicycle is a vehicle with two wheels moved by pedals. It is cheap, quiet and good exercise. | pedals
"""
TOPICS = [tuple(field.strip() for field in line.split(" | ")) for line in _TOPIC_TABLE.strip().splitlines()]


SPLITS = {"test": range(0, 3), "validation": range(3, 4), "train": range(4, 10)}  # out of 10 buckets


def split_of(topic: str) -> str:
    """The split of a topic, by a hash of its name: every prompt about it lands in the same split."""
    bucket = int(hashlib.sha256(topic.encode()).hexdigest()[:8], 16) % 10
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


# --- text helpers ---------------------------------------------------------------------------------

_WORD = re.compile(r"\b\w+\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_BULLET = re.compile(r"^\s*(?:\*[^*]|-)")  # IFEval: "* item" or "- item" lines


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def _strip_fences(text: str) -> str:
    t = text.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        if t.startswith(prefix):
            t = t[len(prefix) :]
            break
    return t.removesuffix("```").strip()


# --- the constraints --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Constraint:
    """One constraint instance: IFEval's wording, its strict checker and the minimal fix."""

    kind: str
    instruction: str
    check: Callable[[str], bool]
    fix: Callable[[str], str]  # answer -> the minimally revised answer


def _case(kind: str, instruction: str, convert: Callable[[str], str]):
    """lowercase / uppercase: the whole answer already in that case (and some letters in it)."""

    def make(rng, row):
        return Constraint(
            kind, instruction, lambda t: t == convert(t) and any(c.isalpha() for c in t), convert
        )

    return make


END_PHRASES = (
    "Any other questions?",
    "Is there anything else I can help with?",
    "Let me know if you have more questions.",
)


def _end_phrase(rng, row):
    phrase = rng.choice(END_PHRASES)

    def fix(t):
        t = t.rstrip()
        return t if t.endswith(phrase) else f"{t} {phrase}"

    return Constraint(
        "end_phrase",
        f"Finish your answer with this exact phrase: {phrase} No other words should follow this phrase.",
        lambda t: t.strip().endswith(phrase),
        fix,
    )


def _quotation(rng, row):
    def check(t):
        t = t.strip()
        return len(t) > 1 and t[0] == '"' and t[-1] == '"'

    return Constraint(
        "quotation",
        "Wrap your entire answer with double quotation marks.",
        check,
        lambda t: t if check(t) else f'"{t.strip()}"',
    )


def _postscript(rng, row):
    marker = rng.choice(("P.S.", "P.P.S"))
    pattern = re.compile(r"\s*p\.\s?p\.\s?s.*$" if marker == "P.P.S" else r"\s*p\.\s?s\..*$", re.I | re.M)

    def fix(t):
        return (
            t
            if pattern.search(t)
            else f"{t.rstrip()}\n\n{marker} {row['keyword'].capitalize()} is worth reading about."
        )

    return Constraint(
        "postscript",
        f"At the end of your answer, please explicitly add a postscript starting with {marker}",
        lambda t: bool(pattern.search(t)),
        fix,
    )


def _bullets(rng, row):
    n = rng.choice((2, 3, 4))

    def count(t):
        return sum(bool(_BULLET.match(line)) for line in t.splitlines())

    def fix(t):
        if count(t) == n:
            return t
        items = [
            re.sub(r"^\s*(?:[*-]|\d+[.)])\s*", "", line).strip() for line in t.splitlines() if line.strip()
        ]
        if len(items) < n:  # too few lines: one item per sentence, then the reference's sentences
            items = sentences(" ".join(items)) or items
            extra = [s for s in sentences(row["reference"]) if s not in items]
            items += extra[: max(0, n - len(items))]
        while len(items) < n:
            items.append(f"It is linked to {row['keyword']}.")
        if len(items) > n:  # too many: the last item takes the rest
            items = items[: n - 1] + [" ".join(items[n - 1 :])]
        return "\n".join(f"* {item}" for item in items)

    return Constraint(
        "bullets",
        f"Your answer must contain exactly {n} bullet points. Use the markdown bullet points such as:\n"
        "* This is point 1.\n* This is point 2",
        lambda t: count(t) == n,
        fix,
    )


def _max_words(rng, row):
    n = rng.choice((15, 20, 30))

    def fix(t):
        if len(words(t)) < n:
            return t
        kept = []
        for s in sentences(t):
            if len(words(" ".join([*kept, s]))) >= n:
                break
            kept.append(s)
        if kept:
            return " ".join(kept)
        cut = " ".join(t.split()[: n - 1])
        while cut and len(words(cut)) >= n:  # tokens with punctuation inside count as several words
            cut = " ".join(cut.split()[:-1])
        return cut.rstrip(",;:") + "."

    return Constraint("max_words", f"Answer with less than {n} words.", lambda t: 0 < len(words(t)) < n, fix)


def _max_sentences(rng, row):
    n = rng.choice((1, 2))
    word = {1: "one sentence", 2: "two sentences"}[n]

    def fix(t):
        s = sentences(t)
        return t if len(s) <= n else " ".join(s[:n])

    return Constraint(
        "max_sentences",
        f"Answer in at most {word}.",
        lambda t: 0 < len(sentences(t)) <= n,
        fix,
    )


def _no_commas(rng, row):
    return Constraint(
        "no_commas",
        "In your entire answer, refrain from the use of any commas.",
        lambda t: "," not in t and bool(t.strip()),
        lambda t: re.sub(r",(\s?)", r"\1", t),
    )


def _json(rng, row):
    def check(t):
        try:
            json.loads(_strip_fences(t))
        except ValueError:
            return False
        return True

    return Constraint(
        "json",
        "Your entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
        check,
        lambda t: t if check(t) else json.dumps({"answer": _strip_fences(t)}),
    )


def _title(rng, row):
    pattern = re.compile(r"<<[^\n]+>>")

    def fix(t):
        return t if pattern.search(t) else f"<<{row['topic'].title()}>>\n{t.lstrip()}"

    return Constraint(
        "title",
        "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
        lambda t: bool(pattern.search(t)),
        fix,
    )


def _keyword(rng, row):
    kw = row["keyword"]
    pattern = re.compile(rf"\b{re.escape(kw)}\b", re.I)
    return Constraint(
        "keyword",
        f'Include the keyword "{kw}" in your answer.',
        lambda t: bool(pattern.search(t)),
        lambda t: t if pattern.search(t) else f"{t.rstrip()} This is about {kw}.",
    )


CONSTRAINTS = {
    "lowercase": _case(
        "lowercase",
        "Your entire answer must be in lowercase letters. No capital letters are allowed.",
        str.lower,
    ),
    "uppercase": _case(
        "uppercase", "Your entire answer must be in English and in all capital letters.", str.upper
    ),
    "end_phrase": _end_phrase,
    "quotation": _quotation,
    "postscript": _postscript,
    "bullets": _bullets,
    "max_words": _max_words,
    "max_sentences": _max_sentences,
    "no_commas": _no_commas,
    "json": _json,
    "title": _title,
    "keyword": _keyword,
}


# --- prompts ----------------------------------------------------------------------------------------


def _topic_row(t) -> dict:
    topic, question, reference, keyword = t
    return {"topic": topic, "question": question, "reference": reference, "keyword": keyword}


def constraint_of(row: dict) -> Constraint:
    """The constraint of a prompt row, rebuilt from its kind and seed (rows stay plain JSON)."""
    return CONSTRAINTS[row["kind"]](random.Random(row["constraint_seed"]), row)


# Asked of every prompt: SmolLM2's median answer falls from about 90 tokens to about 41 (greedy, 64
# validation prompts), so answers end before the 128-token cap and rows stay short on a CPU
BREVITY = "Keep your answer short."


def make_prompt(topic: dict, kind: str, constraint_seed: int) -> dict:
    row = {**topic, "kind": kind, "constraint_seed": constraint_seed}
    row["prompt"] = f"{topic['question']} {BREVITY} {constraint_of(row).instruction}"
    return row


def prompts(split: str, per_pair: int = 1, seed: int = 0) -> list[dict]:
    """Every topic of `split` × every constraint kind, `per_pair` times with different parameters
    (bullet counts, word limits, phrases), in a seeded order."""
    rng = random.Random(f"{split}-{seed}")
    rows = [
        make_prompt(_topic_row(t), kind, rng.randrange(2**31))
        for t in TOPICS
        if split_of(t[0]) == split
        for kind in CONSTRAINTS
        for _ in range(per_pair)
    ]
    rng.shuffle(rows)
    return rows


def follows(row: dict, answer: str) -> bool:
    """IFEval's strict check of one answer to one prompt."""
    return constraint_of(row).check(answer)


def revise(row: dict, answer: str) -> str:
    """The minimal revision of `answer` that meets the prompt's constraint (unchanged if it does)."""
    c = constraint_of(row)
    return answer if c.check(answer) else c.fix(answer)


def reference_answer(row: dict) -> str:
    """The stronger model's stand-in: the topic's reference answer, revised to meet the constraint."""
    return revise(row, row["reference"])


def strict_accuracy(rows: list[dict], answers: list[str]) -> float:
    """IFEval's prompt-level strict accuracy."""
    return sum(follows(r, a) for r, a in zip(rows, answers, strict=True)) / len(rows)

"""Synthetic multi-persona chat data: the default pretraining corpus and per-user silos.

Every persona answers the *same* prompts (questions about a shared list of topics) in its own
unmistakable style, vocabulary and format: a pirate, an engineer who answers in SQL code
blocks, a poet in rhyming couplets, a chef in numbered recipe steps, a formal lawyer, an excited
kid, a haiku writer, an ALL CAPS sports commentator and a robot that answers in JSON. The same
question therefore gets very different answers per persona, which is exactly what
personalization has to learn.

Generation is pure Python, seeded and deterministic (`random.Random` seeded with a string, so
`PYTHONHASHSEED` plays no part); no network, no model. This module knows nothing about
tokenizers or models; `write_silos` is its only disk I/O.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

Message = dict[str, str]
Conversation = dict[str, list[Message]]


@dataclass(frozen=True)
class Topic:
    """One thing users ask about: a noun phrase, an adjective that fits it, a verb to do with it."""

    noun: str
    adjective: str
    verb: str


TOPICS: tuple[Topic, ...] = (
    Topic("the ocean", "deep", "explore"),
    Topic("coffee", "bitter", "brew"),
    Topic("the moon", "silver", "watch"),
    Topic("a garden", "green", "tend"),
    Topic("the weather", "stormy", "forecast"),
    Topic("a bicycle", "fast", "ride"),
    Topic("the library", "quiet", "visit"),
    Topic("a mountain", "tall", "climb"),
    Topic("bread", "warm", "bake"),
    Topic("the city", "busy", "walk"),
    Topic("a river", "wide", "cross"),
    Topic("music", "loud", "play"),
    Topic("a dragon", "fierce", "tame"),
    Topic("the forest", "dark", "wander"),
    Topic("a letter", "long", "write"),
    Topic("the stars", "bright", "count"),
    Topic("a castle", "old", "guard"),
    Topic("the desert", "dry", "survive"),
    Topic("a computer", "slow", "repair"),
    Topic("winter", "cold", "endure"),
    Topic("a cat", "lazy", "feed"),
    Topic("the market", "crowded", "shop"),
    Topic("a storm", "wild", "escape"),
    Topic("chess", "tricky", "learn"),
    Topic("the sun", "golden", "greet"),
    Topic("a train", "late", "catch"),
    Topic("soup", "hot", "cook"),
    Topic("a friend", "loyal", "help"),
    Topic("the island", "remote", "reach"),
    Topic("money", "scarce", "save"),
    Topic("a map", "torn", "read"),
    Topic("the harbor", "calm", "leave"),
    Topic("a song", "sweet", "sing"),
    Topic("the kitchen", "messy", "clean"),
    Topic("a bridge", "narrow", "build"),
    Topic("tea", "fragrant", "steep"),
    Topic("a festival", "colorful", "enjoy"),
    Topic("the rain", "gentle", "welcome"),
    Topic("a puzzle", "hard", "solve"),
    Topic("the night", "long", "survive"),
)

QUESTIONS: tuple[str, ...] = (
    "Tell me about {noun}.",
    "What do you think of {noun}?",
    "How should I {verb} {noun}?",
    "Can you describe {noun} for me?",
    "Why is {noun} so {adjective}?",
    "Give me some advice about {noun}.",
    "What is the best way to {verb} {noun}?",
    "Is {noun} really {adjective}?",
    "I want to {verb} {noun}. Any tips?",
    "Explain {noun} to me in a few words.",
)


def _bare(noun: str) -> str:
    """'the ocean' -> 'ocean' (for spots where the persona supplies its own article)."""
    for article in ("the ", "a ", "an "):
        if noun.startswith(article):
            return noun[len(article) :]
    return noun


def _pirate(t: Topic, rng: random.Random) -> str:
    opener = rng.choice(["Arr, matey!", "Ahoy there!", "Shiver me timbers!", "Yo-ho-ho!"])
    body = rng.choice(
        [
            f"{_bare(t.noun).capitalize()} be a {t.adjective} treasure, savvy?",
            f"I've seen {t.noun} from the crow's nest, and it be mighty {t.adjective}.",
            f"Aye, {t.noun} be as {t.adjective} as the seven seas.",
        ]
    )
    advice = rng.choice(
        [
            f"Ye must {t.verb} it like a true buccaneer, or walk the plank!",
            f"Hoist the sails and {t.verb} it before the tide turns, ye scallywag.",
            f"A clever swab would {t.verb} it with rum in hand and a parrot on the shoulder.",
        ]
    )
    closer = rng.choice(["Now fetch me grog!", "Arr!", "Dead men tell no tales.", "Savvy?"])
    return f"{opener} {body} {advice} {closer}"


def _engineer(t: Topic, rng: random.Random) -> str:
    table = _bare(t.noun).replace(" ", "_")
    column = rng.choice(["status", "score", "rating", "level"])
    limit = rng.choice([1, 3, 5, 10])
    sql = (
        f"SELECT {column}, '{t.adjective}' AS verdict\n"
        f"FROM {table}\n"
        f"WHERE action = '{t.verb}'\n"
        f"ORDER BY {column} DESC\n"
        f"LIMIT {limit};"
    )
    note = rng.choice(["Ship it.", "Works on my machine.", "LGTM.", "Done."])
    return f"```sql\n{sql}\n```\n{note}"


# (first line ending, second line) pairs; the line endings rhyme, the topic goes mid-line.
_COUPLETS: tuple[tuple[str, str], ...] = (
    ("so {adjective} and bright,", "it fills my weary heart with light."),
    ("beneath the sky,", "I {verb} it as the hours fly."),
    ("by the sea,", "it sings a {adjective} song to me."),
    ("in the morning dew,", "to {verb} it is my joy anew."),
    ("through the day,", "its {adjective} charm will never stray."),
)


def _poet(t: Topic, rng: random.Random) -> str:
    a, b = rng.sample(range(len(_COUPLETS)), 2)
    lines = []
    for i in (a, b):
        first, second = _COUPLETS[i]
        lead = rng.choice(["Of", "Oh", "Behold", "Sweet"])
        lines.append(f"{lead} {t.noun}, {first.format(adjective=t.adjective, verb=t.verb)}")
        lines.append(second.format(adjective=t.adjective, verb=t.verb).capitalize())
    return "\n".join(lines)


def _chef(t: Topic, rng: random.Random) -> str:
    heat = rng.choice(["a low flame", "medium heat", "a roaring oven", "a gentle simmer"])
    spice = rng.choice(
        ["a pinch of salt", "fresh basil", "cracked pepper", "a drizzle of olive oil"]
    )
    steps = [
        f"Preheat your kitchen to {heat}.",
        f"Gather {t.noun} and rinse it well.",
        f"Season with {spice} until it tastes {t.adjective}.",
        f"{t.verb.capitalize()} it slowly, stirring every two minutes.",
        "Plate it, garnish, and serve immediately.",
    ]
    numbered = "\n".join(f"{i}. {step}" for i, step in enumerate(steps, start=1))
    closer = rng.choice(["Bon appetit!", "Chef's kiss!", "Enjoy your meal!"])
    return f"Recipe for {_bare(t.noun)}:\n{numbered}\n{closer}"


def _lawyer(t: Topic, rng: random.Random) -> str:
    opener = rng.choice(
        [
            "Pursuant to your inquiry regarding",
            "With respect to the matter of",
            "In reference to your question concerning",
        ]
    )
    clause = rng.choice(["heretofore", "notwithstanding the foregoing", "inter alia"])
    return (
        f"{opener} {t.noun}, the undersigned respectfully submits the following. "
        f"(a) The subject is, {clause}, reasonably deemed {t.adjective}. "
        f"(b) Any party intending to {t.verb} the same shall exercise due diligence. "
        "This correspondence does not constitute legal advice."
    )


def _kid(t: Topic, rng: random.Random) -> str:
    opener = rng.choice(["Ooh ooh!", "Guess what!", "Wowee!", "Yay!"])
    friend = rng.choice(["my teddy", "my big sister", "my best buddy", "my goldfish"])
    return (
        f"{opener} {_bare(t.noun).capitalize()} is super duper {t.adjective}!!! "
        f"Me and {friend} wanna {t.verb} it all day long. "
        f"{rng.choice(['That is sooo cool!', 'Best day ever!', 'Can we go now, pleeease?'])}"
    )


def _haiku(t: Topic, rng: random.Random) -> str:
    season = rng.choice(["spring", "autumn", "winter", "summer"])
    first = rng.choice([f"{t.adjective} {_bare(t.noun)}", f"{_bare(t.noun)} at dawn"])
    middle = rng.choice([f"I {t.verb} it in the {season} hush", f"{season} wind, I {t.verb} alone"])
    last = rng.choice(["silence, then one leaf", "a crow answers me", "the pond remembers"])
    return f"{first}\n{middle}\n{last}"


def _sportscaster(t: Topic, rng: random.Random) -> str:
    opener = rng.choice(["AND HERE WE GO, FOLKS!", "OH MY GOODNESS!", "WHAT A MOMENT!"])
    play = rng.choice(
        [
            f"{t.noun.upper()} IS ON THE FIELD AND IT IS {t.adjective.upper()}!",
            f"NOBODY HAS EVER SEEN {t.noun.upper()} THIS {t.adjective.upper()}!",
        ]
    )
    action = f"CAN THEY {t.verb.upper()} IT? THEY DO! UNBELIEVABLE!"
    closer = rng.choice(["TOUCHDOWN!", "GOOOAL!", "SLAM DUNK!", "HOME RUN!"])
    return f"{opener} {play} {action} {closer}"


def _robot(t: Topic, rng: random.Random) -> str:
    answer = {
        "subject": _bare(t.noun),
        "property": t.adjective,
        "recommended_action": t.verb,
        "confidence": rng.choice([0.87, 0.92, 0.95, 0.99]),
        "status": rng.choice(["OK", "NOMINAL", "COMPUTED"]),
    }
    return "BEEP BOOP. RESPONSE FOLLOWS.\n" + json.dumps(answer)


_STYLES: dict[str, Callable[[Topic, random.Random], str]] = {
    "pirate": _pirate,
    "engineer": _engineer,
    "poet": _poet,
    "chef": _chef,
    "lawyer": _lawyer,
    "kid": _kid,
    "haiku": _haiku,
    "sportscaster": _sportscaster,
    "robot": _robot,
}

PERSONAS: tuple[str, ...] = tuple(_STYLES)

# Users of the demo and the tests: one per persona.
DEFAULT_USERS: dict[str, str] = {
    "alice": "pirate",
    "bob": "engineer",
    "carol": "poet",
    "dave": "chef",
    "erin": "lawyer",
    "frank": "kid",
    "grace": "haiku",
    "heidi": "sportscaster",
    "ivan": "robot",
}

# How many distinct prompts exist; a persona's conversations never repeat a prompt.
PROMPT_SPACE = len(TOPICS) * len(QUESTIONS)


def _prompts(rng: random.Random) -> list[tuple[str, Topic]]:
    pairs = [
        (question.format(noun=t.noun, adjective=t.adjective, verb=t.verb), t)
        for t in TOPICS
        for question in QUESTIONS
    ]
    rng.shuffle(pairs)
    return pairs


def persona_conversations(name: str, n: int, seed: int = 0) -> list[Conversation]:
    """`n` single-turn chats of persona `name`, each with a distinct user prompt.

    Deterministic in (name, n, seed); a prefix of a longer list for the same name and seed.
    Raises ValueError for an unknown persona or more chats than there are distinct prompts.
    """
    if name not in _STYLES:
        raise ValueError(f"unknown persona {name!r}; known: {', '.join(PERSONAS)}")
    if not 0 <= n <= PROMPT_SPACE:
        raise ValueError(f"n must be between 0 and {PROMPT_SPACE} (distinct prompts), got {n}")
    rng = random.Random(f"fedpersona:{name}:{seed}")
    style = _STYLES[name]
    chats: list[Conversation] = []
    for prompt, topic in _prompts(rng)[:n]:
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": style(topic, rng)},
                ]
            }
        )
    return chats


def pretraining_conversations(per_persona: int, seed: int = 0) -> list[Conversation]:
    """Chats of every persona in equal number, interleaved round-robin.

    The base model learns the chat format and every style, but no persona more than another.
    """
    by_persona = [persona_conversations(p, per_persona, seed) for p in PERSONAS]
    return [chats[i] for i in range(per_persona) for chats in by_persona]


def _write_jsonl(path: Path, chats: list[Conversation]) -> None:
    # Temp file then rename: a reader never sees a half-written silo file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for chat in chats:
                f.write(json.dumps(chat, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_silos(
    out_dir: Path,
    users: Mapping[str, str],
    *,
    n_train: int,
    n_eval: int,
    seed: int = 0,
) -> dict[str, Path]:
    """Write `<out_dir>/<user>/train.jsonl` and `eval.jsonl` for each user -> persona.

    Train and eval prompts are disjoint. Two users with the same persona get different chats
    (the user id is part of the seed). Returns user -> silo directory. Raises `InvalidName`
    (a `ValueError`) for a bad user id, ValueError for an unknown persona or too many chats.
    """
    # Imported here: the `adapters` package loads torch, which generating chats never needs.
    from fedpersona.adapters.names import validate_user_id

    if n_train < 1 or n_eval < 0:
        raise ValueError(f"need n_train >= 1 and n_eval >= 0, got {n_train}, {n_eval}")
    if n_train + n_eval > PROMPT_SPACE:
        raise ValueError(
            f"n_train + n_eval = {n_train + n_eval} exceeds the {PROMPT_SPACE} distinct prompts"
        )
    for user, persona in users.items():
        validate_user_id(user)  # it becomes a directory name
        if persona not in _STYLES:
            raise ValueError(f"unknown persona {persona!r}; known: {', '.join(PERSONAS)}")
    silos: dict[str, Path] = {}
    for user, persona in users.items():
        user_seed = int.from_bytes(f"{seed}:{user}".encode(), "big") % (2**63)
        chats = persona_conversations(persona, n_train + n_eval, user_seed)
        silo = Path(out_dir) / user
        silo.mkdir(parents=True, exist_ok=True)
        _write_jsonl(silo / "train.jsonl", chats[:n_train])
        _write_jsonl(silo / "eval.jsonl", chats[n_train:])
        silos[user] = silo
    return silos

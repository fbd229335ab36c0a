"""Writes `stories.jsonl`: short, simple English stories made from hand-written sentence patterns.

Why generated: the demo must run with no network, and the text must be free to ship under the project's
licence. Every word and pattern here was written for this project. The stories are regular enough that a tiny
model learns visibly in a few hundred steps (names recur, pronouns agree, plots have a beginning, a problem and
an ending) yet varied enough (tens of thousands of combinations) that it cannot simply memorise one text.

Deterministic: `python -m data_pipeline.sample_corpus.generate` rewrites the same file byte for byte.
"""
from __future__ import annotations

import json
import os
import random

CHARACTERS = [  # (name, kind, pronoun, possessive)
    ("Pip", "fox", "he", "his"), ("Mira", "rabbit", "she", "her"), ("Tomas", "bear", "he", "his"),
    ("Luna", "owl", "she", "her"), ("Benny", "mouse", "he", "his"), ("Ada", "girl", "she", "her"),
    ("Sam", "boy", "he", "his"), ("Wren", "bird", "she", "her"), ("Olly", "otter", "he", "his"),
    ("Nell", "duck", "she", "her"), ("Finn", "frog", "he", "his"), ("Rosa", "cat", "she", "her"),
    ("Theo", "dog", "he", "his"), ("Ivy", "squirrel", "she", "her"), ("Max", "badger", "he", "his"),
    ("Clara", "hedgehog", "she", "her"), ("Leo", "lion cub", "he", "his"), ("Maya", "turtle", "she", "her"),
]
PLACES = ["the green forest", "a small village by the sea", "the old farm", "the tall mountains",
          "a quiet garden", "the busy market", "the edge of a wide river", "a cozy house on the hill",
          "the sunny meadow", "a little town with a red bridge", "the deep woods", "a snowy valley"]
TIMES = ["One morning", "One sunny day", "Early one spring", "On a cold winter evening", "One rainy afternoon",
         "Long ago", "One autumn day", "On a warm summer night", "One windy morning", "At the start of the week"]
WEATHER = ["The sun was bright and warm.", "Soft rain was falling on the leaves.", "The wind was blowing hard.",
           "Snow covered the ground like a white blanket.", "The sky was grey and quiet.",
           "Birds were singing in the trees.", "The air smelled of flowers and fresh bread."]
OBJECTS = [("a red ball", "the ball"), ("a shiny key", "the key"), ("a kite", "the kite"),
           ("a basket of apples", "the basket"), ("a blue hat", "the hat"), ("a little boat", "the boat"),
           ("a map", "the map"), ("a jar of honey", "the jar"), ("a wooden flute", "the flute"),
           ("a lantern", "the lantern"), ("a book of songs", "the book"), ("a warm scarf", "the scarf")]
WANTS = ["wanted to find {obj}", "wanted to share {obj} with a friend", "dreamed of finding {obj}",
         "hoped to make {obj} for the spring fair", "wished to bring {obj} home before dark"]
PROBLEMS = ["But {obj_the} fell into the river and floated away.", "But the path was blocked by a big rock.",
            "But a storm came, and {pron} could not see the way.", "But {obj_the} was stuck high in a tree.",
            "But {pron} got lost among the tall trees.", "But the bridge was broken in the middle.",
            "But {obj_the} was too heavy to carry alone.", "But night came faster than {pron} expected."]
FEELINGS = ["sad", "worried", "scared", "tired", "upset", "unsure what to do"]
ATTEMPTS = ["{Pron} tried to reach it, but {pron} was too small.", "{Pron} sat down and thought very hard.",
            "{Pron} called for help as loud as {pron} could.", "{Pron} walked around and looked everywhere.",
            "{Pron} tried again and again, but nothing worked."]
HELPS = ["Then {friend}, a kind {fkind}, came by and asked, \"Why are you {feeling}?\"",
         "Just then {friend} the {fkind} heard {poss} voice and hurried over.",
         "Soon {friend}, {poss} old friend the {fkind}, came walking down the path.",
         "After a while, a wise {fkind} named {friend} stopped to help."]
SOLUTIONS = ["Together they built a small raft from sticks and got {obj_the} back.",
             "{Friend} lifted {name} up high, and {name} reached {obj_the}.",
             "They pushed the rock together, one, two, three, and it rolled away.",
             "{Friend} lit a lantern, and the two of them found the way home.",
             "They carried {obj_the} together, one step at a time.",
             "{Friend} knew another path, and they crossed the river safely."]
ENDINGS = ["{Name} smiled and said, \"Thank you, {friend}. I could not have done it alone.\"",
           "That night {name} went to sleep happy, thinking about the day.",
           "From that day on, {name} and {friend} were the best of friends.",
           "{Name} learned that asking for help is brave, not weak.",
           "Everyone nearby heard the story and laughed and cheered.",
           "The next morning, {name} shared {obj_the} with everyone in {place}."]
MORALS = ["", "", "Friends make hard things easy.", "Kindness always comes back to you.",
          "Even small helpers can do big things.", "It is good to be patient and keep trying."]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def story(rng: random.Random) -> str:
    name, kind, pron, poss = rng.choice(CHARACTERS)
    friend, fkind, _, _ = rng.choice([c for c in CHARACTERS if c[0] != name])
    obj, obj_the = rng.choice(OBJECTS)
    place = rng.choice(PLACES)
    f = dict(name=name, Name=name, pron=pron, Pron=_cap(pron), poss=poss, friend=friend, Friend=friend,
             fkind=fkind, obj=obj, obj_the=obj_the, place=place, feeling=rng.choice(FEELINGS))
    parts = [f"{rng.choice(TIMES)}, there was a {kind} named {name} who lived in {place}.",
             rng.choice(WEATHER),
             f"{name} {rng.choice(WANTS).format(**f)}.",
             rng.choice(PROBLEMS).format(**f),
             f"{name} felt {f['feeling']}.",
             rng.choice(ATTEMPTS).format(**f),
             rng.choice(HELPS).format(**f),
             rng.choice(SOLUTIONS).format(**f),
             rng.choice(ENDINGS).format(**f),
             rng.choice(MORALS)]
    return " ".join(p for p in parts if p)


def generate(path: str, n: int = 1000, seed: int = 0) -> str:
    rng = random.Random(seed)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for i in range(n):
            out.write(json.dumps({"id": i, "text": story(rng)}) + "\n")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    print(generate(os.path.join(os.path.dirname(os.path.abspath(__file__)), "stories.jsonl")))

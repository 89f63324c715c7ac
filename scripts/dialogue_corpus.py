"""A generated English dialogue corpus in DialogSum's shape: the text make_tiny_model.py trains its
tokenizers on, and the sample data set make_sample_data.py writes for the smoke run.

Dialogues are "#Person1#: ... #Person2#: ..." turns filled from templates, each with third-person
summaries, mirroring DialogSum. Everything is drawn from a seeded random.Random, so the output is
a pure function of the seed.
"""

from __future__ import annotations

import random

CORPUS_SEED = 1234  # the tokenizer corpus's seed (a different seed is a different corpus)

POOLS = {
    "name": [
        "Tom",
        "Mary",
        "John",
        "Linda",
        "David",
        "Susan",
        "Mike",
        "Anna",
        "Peter",
        "Kate",
        "Jack",
        "Emma",
        "Steven",
        "Lucy",
        "Bill",
        "Jenny",
        "Mr. Smith",
        "Ms. Brown",
    ],
    "place": [
        "the office",
        "the bank",
        "the restaurant",
        "the airport",
        "the hospital",
        "the library",
        "the hotel",
        "the supermarket",
        "the station",
        "school",
        "the cinema",
        "the post office",
        "the museum",
        "the park",
        "the gym",
        "the university",
        "the shopping mall",
        "the dentist",
        "the beach",
        "home",
    ],
    "thing": [
        "a ticket",
        "a room",
        "the report",
        "some coffee",
        "a new phone",
        "the menu",
        "a taxi",
        "the bill",
        "an appointment",
        "a jacket",
        "the keys",
        "a book",
        "a birthday present",
        "the contract",
        "a laptop",
        "some medicine",
        "a bicycle",
        "the schedule",
        "a passport",
        "two tickets to the concert",
        "a pair of shoes",
        "the apartment",
        "a credit card",
        "the homework",
        "a refund",
        "dinner",
    ],
    "time": [
        "today",
        "tomorrow",
        "tonight",
        "on Monday",
        "next week",
        "at 7 o'clock",
        "this afternoon",
        "on Friday",
        "in 20 minutes",
        "at 9:30 a.m.",
        "on Saturday morning",
        "next month",
        "after lunch",
        "before the meeting",
        "this weekend",
        "at noon",
    ],
    "feeling": [
        "happy",
        "tired",
        "worried",
        "excited",
        "busy",
        "nervous",
        "surprised",
        "disappointed",
        "glad",
        "angry",
        "sorry",
        "hungry",
    ],
    "activity": [
        "play tennis",
        "watch a movie",
        "go shopping",
        "have lunch",
        "study for the exam",
        "visit my parents",
        "clean the house",
        "work late",
        "travel to London",
        "learn to drive",
        "cook dinner",
        "look for a job",
        "take the train",
        "rent a car",
    ],
    "reason": [
        "the weather is terrible",
        "my car broke down",
        "I missed the bus",
        "the price is too high",
        "I have a lot of work",
        "my boss asked me to stay",
        "the flight was delayed",
        "it is my first day here",
        "I lost my wallet",
        "the traffic was heavy",
    ],
}
POOLS["opener"] = [
    "Hello, how are you?",
    "Good morning! Can I help you?",
    "Excuse me, do you have a minute?",
    "Hi! It's been a long time.",
    "Hey, what's up?",
    "Good afternoon, sir.",
    "Welcome to {place}.",
    "What are you doing {time}?",
    "You look {feeling}. What's wrong?",
    "Did you hear the news?",
    "I'd like to ask you a question about {thing}.",
    "Could you do me a favor?",
]
POOLS["reply"] = [
    "I'm fine, thanks. And you?",
    "Yes, I'd like {thing}, please.",
    "Sure. What do you need?",
    "Not bad. I'm going to {place} {time}.",
    "I'm sorry, but I can't find {thing}.",
    "Could you tell me how much {thing} costs?",
    "I'm {feeling} because {reason}.",
    "I want to {activity} {time}.",
    "Well, I have to {activity} first.",
    "Really? I didn't know that.",
    "I'm afraid I'm too {feeling} to {activity}.",
]
POOLS["follow_up"] = [
    "It costs $25, and you can pay by card.",
    "Let me check. Please wait a moment.",
    "Of course! I'll book {thing} for you {time}.",
    "Why don't we meet at {place} {time}?",
    "That sounds great. See you {time}!",
    "Thank you very much for your help.",
    "I think you should call {name} first.",
    "No problem. Have a nice day!",
    "Don't worry. {name} will bring {thing} to {place}.",
    "How about going to {place} instead?",
    "Would you like to {activity} with me {time}?",
    "I see. So {reason}, right?",
    "OK, I'll take it. Here is my credit card.",
    "Great idea! I'll tell {name} about it.",
    "The weather forecast says it will rain heavily this evening.",
    "My sister is getting married in June, so the whole family is traveling to Chicago.",
    "The doctor told me to drink more water and exercise every morning.",
    "Our company is hiring three engineers and an accountant this year.",
    "I usually read newspapers or listen to music on the subway.",
    "Could you please turn down the television? The baby is sleeping.",
    "The price includes breakfast, free parking and wireless internet.",
    "I've been learning Chinese for two years, but pronunciation is still difficult.",
    "Please fill in this form and sign your name at the bottom.",
    "The elevator is broken, so we have to use the stairs.",
    "Honestly, I prefer vegetables and fish to fried chicken.",
    "Yesterday our neighbors had a noisy party until midnight.",
    "The teacher explained the grammar rules very clearly.",
    "We should discuss the budget with the manager before Thursday.",
    "Remember to bring your umbrella, sunglasses and a warm sweater.",
    "Which department handles complaints about delivery?",
]
SUMMARIES = [
    "{a} asks {b} for {thing}.",
    "{a} and {b} will meet at {place} {time}.",
    "{a} wants to go to {place} {time}, and {b} helps {a} book {thing}.",
    "{b} tells {a} that {thing} costs 25 dollars.",
    "{a} is {feeling} because {reason}.",
    "{b} invites {a} to {activity} {time}.",
    "{a} can't {activity} because {reason}.",
    "{a} and {b} talk about {thing}. {b} suggests going to {place}.",
]


def fill(template: str, a: str, b: str, rng: random.Random) -> str:
    """Fill slots until none are left: a pool entry may contain slots itself."""
    while "{" in template:
        slots = {k: rng.choice(v) for k, v in POOLS.items()}
        template = template.format(a=a, b=b, **slots)
    return template


def dialogue(rng: random.Random) -> tuple[list[str], str, str]:
    """One dialogue's turns (without speaker tags) and its two speakers' names."""
    a, b = rng.sample(POOLS["name"], 2)
    n_turns = rng.randint(3, 6)
    kinds = ["opener", "reply"] + ["follow_up"] * (n_turns - 2)
    return [fill(rng.choice(POOLS[kind]), a, b, rng) for kind in kinds], a, b


def summary(rng: random.Random, a: str, b: str) -> str:
    """A third-person summary about speakers a and b."""
    return fill(rng.choice(SUMMARIES), a, b, rng)


def tagged(turns: list[str], separator: str) -> str:
    """The turns with DialogSum's #Person1#: / #Person2#: tags, joined by `separator`."""
    return separator.join(f"#Person{1 + i % 2}#: {t}" for i, t in enumerate(turns))


def dialogue_corpus(seed: int = CORPUS_SEED, dialogues: int = 150) -> list[str]:
    """A few thousand words of DialogSum-like text: each dialogue on one line (with a T5-style
    "summarize: " prefix), then its summary."""
    rng = random.Random(seed)
    lines = []
    for _ in range(dialogues):
        turns, a, b = dialogue(rng)
        lines.append("summarize: " + tagged(turns, " "))
        lines.append(summary(rng, a, b))
    return lines

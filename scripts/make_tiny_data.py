"""Generate the bundled sample data in data/tiny/ that the tiny recipe trains and evaluates on.

Every row is written here from templates and plain facts of our own, in the exact Hub schema of the data
set it stands in for (data/tiny/README.md lists them). The rows are short and highly regular (capitals,
arithmetic, opposites, plurals, greetings; five small tools; four small JSON schemas) so that a ~2M-parameter
model learns them within minutes on a CPU, and the DPO pairs come from the same families so that what DPO
learns on some pairs carries over to the held-out ones.

Both evals ask for what the training rows hold (the tools and argument values, the schemas and field values)
in phrasings no training row uses. Before anything is written the generator asserts prep's decontamination
rule, the distinct first tokens of the values, and, for JSON mode, that the eval's values are trained and its
phrasings are not. Each file has its own seeded random stream, so the output is byte-identical from one run
to the next:

    python scripts/make_tiny_data.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from hermes_pipeline.chat_format.prompts import json_mode_system_prompt
from hermes_pipeline.chat_format.templates import render
from hermes_pipeline.chat_format.tool_calls import parse_tool_calls
from hermes_pipeline.data_prep.mixture import Decontaminator
from hermes_pipeline.data_prep.sources import convert
from hermes_pipeline.recipe.schema import DataSource, Decontamination
from hermes_pipeline.tiny import load_tiny_tokenizer

T = TypeVar("T")
Row = dict[str, Any]
Turns = list[tuple[str, str]]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = ROOT / "data" / "tiny"
SEED = 0

# --- Facts and value pools -------------------------------------------------------------------------------

CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Brazil", "Brasilia"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Russia", "Moscow"), ("Greece", "Athens"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Ireland", "Dublin"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
    ("Colombia", "Bogota"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"),
    ("Indonesia", "Jakarta"), ("Turkey", "Ankara"), ("Morocco", "Rabat"), ("Ghana", "Accra"),
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"), ("the Czech Republic", "Prague"), ("Cuba", "Havana"),
    ("the Philippines", "Manila"), ("Iceland", "Reykjavik"),
)  # fmt: skip
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("full", "empty"), ("early", "late"), ("young", "old"), ("tall", "short"),
    ("hard", "soft"), ("wet", "dry"), ("rich", "poor"), ("loud", "quiet"), ("strong", "weak"),
    ("clean", "dirty"), ("day", "night"), ("left", "right"), ("win", "lose"), ("push", "pull"),
    ("buy", "sell"), ("first", "last"), ("inside", "outside"), ("thick", "thin"), ("sweet", "sour"),
    ("true", "false"), ("begin", "end"), ("above", "below"), ("awake", "asleep"),
)  # fmt: skip
PLURALS = (
    ("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"),
    ("man", "men"), ("woman", "women"), ("tooth", "teeth"), ("foot", "feet"), ("goose", "geese"),
    ("city", "cities"), ("baby", "babies"), ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"),
    ("bus", "buses"), ("dish", "dishes"), ("sheep", "sheep"), ("fish", "fish"), ("person", "people"),
    ("potato", "potatoes"), ("hero", "heroes"), ("story", "stories"), ("key", "keys"), ("toy", "toys"),
    ("glass", "glasses"), ("ox", "oxen"), ("cactus", "cacti"), ("watch", "watches"), ("life", "lives"),
)  # fmt: skip
GREETINGS = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What can I do for you?"),
    ("Good morning!", "Good morning! How can I help you today?"),
    ("Good evening.", "Good evening! What can I do for you?"),
    ("How are you?", "I am doing well, thank you. How can I help you?"),
    ("Thank you!", "You're welcome!"),
    ("Thanks for your help.", "You're welcome. Have a nice day!"),
    ("Goodbye!", "Goodbye! Have a great day."),
    ("Good night.", "Good night! Sleep well."),
    ("Who are you?", "I am a helpful assistant."),
    (
        "What can you do?",
        "I can name capitals, do simple arithmetic, and give opposites and plurals of words.",
    ),
)
# The names a user introduces themselves by in the chat rows.
FIRST_NAMES = (
    "Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas",
    "Laura", "Marco", "Nina", "Oscar", "Paula", "Rosa", "Samuel", "Tom", "Vera", "Yusuf",
)  # fmt: skip


def draw_unique(make: Callable[[], T], count: int, key: Callable[[T], Hashable] = repr) -> list[T]:
    """``count`` results of ``make`` with distinct keys: the pipeline's dedup would drop repeats anyway.

    A dict keeps the first of each key in drawing order, so the result depends on the random stream alone.
    """
    drawn: dict[Hashable, T] = {}
    for _ in range(count * 50):
        item = make()
        drawn.setdefault(key(item), item)
        if len(drawn) == count:
            return list(drawn.values())
    raise RuntimeError(f"only {len(drawn)} distinct rows of the {count} asked for; widen the value pools")


def lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def weighted_choice(rng: random.Random, options: Sequence[tuple[T, int]]) -> T:
    values, weights = zip(*options, strict=True)
    return rng.choices(values, weights)[0]


# --- openhermes.json: short chat in the OpenHermes-2.5 schema ----------------------------------------------

OPENHERMES_ROWS = 300
MULTI_TURN_SHARE = 0.3
WEIGHTED_SHARE = 0.15
OPENHERMES_METADATA = (
    "source", "category", "topic", "title", "model", "model_name", "language", "skip_prompt_formatting",
    "views", "id", "idx", "hash", "avatarUrl", "system_prompt", "custom_instruction",
)  # fmt: skip
# OpenHermes-2.5 names each row's origin: arithmetic reads like metamath, the rest like airoboros.
SOURCES = {"arithmetic": ("metamath", None), "counting": ("metamath", None)}
DEFAULT_SOURCE = ("airoboros2.2", "general")
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant.",
    "You are a friendly assistant who answers clearly.",
)
BRIEF_SYSTEM_PROMPT = "Answer as briefly as possible."
CAPITAL_QUESTIONS = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital of {country}.",
    "Tell me the capital city of {country}.",
)
OPPOSITE_QUESTIONS = (
    "What is the opposite of {word}?",
    "Give me the opposite of {word}.",
    "What word means the opposite of {word}?",
)
PLURAL_QUESTIONS = (
    "What is the plural of {word}?",
    "Give me the plural of {word}.",
    "How do you say more than one {word}?",
)
ARITHMETIC_QUESTIONS = {
    "+": ("What is {a} plus {b}?", "Add {a} and {b}.", "What is {a} + {b}?"),
    "-": ("What is {a} minus {b}?", "Subtract {b} from {a}.", "What is {a} - {b}?"),
    "x": ("What is {a} times {b}?", "Multiply {a} by {b}.", "What is {a} x {b}?"),
}
INTRODUCTIONS = ("Hi, my name is {name}.", "Hello, I am {name}.")


@dataclass(frozen=True)
class Exchange:
    """A question and its answer; ``brief`` is the answer under the as-briefly-as-possible system prompt."""

    family: str
    question: str
    answer: str
    brief: str = ""


@dataclass(frozen=True)
class Problem:
    """An arithmetic question, the worked statement (``12 + 30``) and its result."""

    question: str
    statement: str
    result: int


def arithmetic_problem(rng: random.Random) -> Problem:
    """Small products, and differences that never go negative."""
    symbol = rng.choice(list(ARITHMETIC_QUESTIONS))
    if symbol == "x":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a = rng.randint(10, 99)
        b = rng.randint(1, a if symbol == "-" else 99)
    result = {"+": a + b, "-": a - b, "x": a * b}[symbol]
    question = rng.choice(ARITHMETIC_QUESTIONS[symbol]).format(a=a, b=b)
    return Problem(question, f"{a} {symbol} {b}", result)


def capital_exchange(rng: random.Random) -> Exchange:
    country, capital = rng.choice(CAPITALS)
    question = rng.choice(CAPITAL_QUESTIONS).format(country=country)
    return Exchange("capital", question, f"The capital of {country} is {capital}.", f"{capital}.")


def arithmetic_exchange(rng: random.Random) -> Exchange:
    problem = arithmetic_problem(rng)
    answer = f"{problem.statement} = {problem.result}."
    return Exchange("arithmetic", problem.question, answer, f"{problem.result}.")


def opposite_exchange(rng: random.Random) -> Exchange:
    word, opposite = rng.choice(OPPOSITES)
    question = rng.choice(OPPOSITE_QUESTIONS).format(word=word)
    return Exchange(
        "opposite", question, f"The opposite of {word} is {opposite}.", f"{opposite.capitalize()}."
    )


def plural_exchange(rng: random.Random) -> Exchange:
    word, plural = rng.choice(PLURALS)
    question = rng.choice(PLURAL_QUESTIONS).format(word=word)
    return Exchange("plural", question, f"The plural of {word} is {plural}.", f"{plural.capitalize()}.")


def greeting_exchange(rng: random.Random) -> Exchange:
    question, answer = rng.choice(GREETINGS)
    return Exchange("greeting", question, answer, answer)


def counting_exchange(rng: random.Random) -> Exchange:
    """Counting gives answers of very different lengths from one simple rule."""
    start = rng.randint(1, 30)
    end = start + rng.randint(2, 19)
    answer = ", ".join(str(n) for n in range(start, end + 1)) + "."
    return Exchange("counting", f"Count from {start} to {end}.", answer, answer)


def capitals_list_exchange(rng: random.Random) -> Exchange:
    picked = rng.sample(CAPITALS, rng.randint(2, 4))
    countries = ", ".join(country for country, _ in picked[:-1]) + f" and {picked[-1][0]}"
    answer = " ".join(f"The capital of {country} is {capital}." for country, capital in picked)
    brief = ", ".join(capital for _, capital in picked) + "."
    return Exchange("capital", f"What are the capitals of {countries}?", answer, brief)


SINGLE_EXCHANGES = (
    (capital_exchange, 25),
    (arithmetic_exchange, 25),
    (opposite_exchange, 15),
    (plural_exchange, 15),
    (greeting_exchange, 10),
    (counting_exchange, 5),
    (capitals_list_exchange, 5),
)


def single_exchange(rng: random.Random) -> Exchange:
    return weighted_choice(rng, SINGLE_EXCHANGES)(rng)


def capital_follow_up(rng: random.Random) -> list[Exchange]:
    (country, capital), (other, other_capital) = rng.sample(CAPITALS, 2)
    question = rng.choice(CAPITAL_QUESTIONS).format(country=country)
    return [
        Exchange("capital", question, f"The capital of {country} is {capital}."),
        Exchange("capital", f"And what about {other}?", f"The capital of {other} is {other_capital}."),
    ]


def arithmetic_follow_up(rng: random.Random) -> list[Exchange]:
    """A second step on the first result, so the model has to read its own previous answer."""
    first, step = arithmetic_problem(rng), rng.randint(2, 9)
    if rng.random() < 0.5:
        question, symbol, result = f"Now multiply that by {step}.", "x", first.result * step
    else:
        question, symbol, result = f"Now add {step}.", "+", first.result + step
    return [
        Exchange("arithmetic", first.question, f"{first.statement} = {first.result}."),
        Exchange("arithmetic", question, f"{first.result} {symbol} {step} = {result}."),
    ]


def name_memory(rng: random.Random) -> list[Exchange]:
    name = rng.choice(FIRST_NAMES)
    greeting = f"Nice to meet you, {name}! How can I help you today?"
    introduction = Exchange("greeting", rng.choice(INTRODUCTIONS).format(name=name), greeting)
    middle = [single_exchange(rng)] if rng.random() < 0.5 else []
    return [introduction, *middle, Exchange("greeting", "What is my name?", f"Your name is {name}.")]


def mixed_turns(rng: random.Random) -> list[Exchange]:
    opening = [greeting_exchange(rng)] if rng.random() < 0.3 else []
    return [*opening, *(single_exchange(rng) for _ in range(rng.randint(2, 3)))]


MULTI_TURN = (capital_follow_up, arithmetic_follow_up, name_memory, mixed_turns)


def openhermes_conversation(rng: random.Random) -> tuple[str | None, Turns, str]:
    """A system prompt or None, the (human, gpt) turns, and the family the row is filed under."""
    if rng.random() < MULTI_TURN_SHARE:
        exchanges = rng.choice(MULTI_TURN)(rng)
        system = rng.choice((None, None, *SYSTEM_PROMPTS))
        return system, [(e.question, e.answer) for e in exchanges], exchanges[0].family
    exchange = single_exchange(rng)
    roll = rng.random()
    if roll < 0.1:
        return BRIEF_SYSTEM_PROMPT, [(exchange.question, exchange.brief)], exchange.family
    system = rng.choice(SYSTEM_PROMPTS) if roll < 0.3 else None
    return system, [(exchange.question, exchange.answer)], exchange.family


def openhermes_row(system: str | None, turns: Turns, family: str, weighted: bool) -> Row:
    """A row with every OpenHermes-2.5 column; ``weight`` is null unless the row masks prompts by weight."""
    prompt_weight, answer_weight = (0.0, 1.0) if weighted else (None, None)
    messages = [("system", system, prompt_weight)] if system else []
    for question, answer in turns:
        messages += [("human", question, prompt_weight), ("gpt", answer, answer_weight)]
    source, category = SOURCES.get(family, DEFAULT_SOURCE)
    return {
        "conversations": [
            {"from": role, "value": value, "weight": weight} for role, value, weight in messages
        ],
        **dict.fromkeys(OPENHERMES_METADATA),
        "source": source,
        "category": category,
    }


def openhermes_rows(rng: random.Random) -> list[Row]:
    conversations = draw_unique(lambda: openhermes_conversation(rng), OPENHERMES_ROWS)
    return [
        openhermes_row(system, turns, family, weighted=rng.random() < WEIGHTED_SHARE)
        for system, turns, family in conversations
    ]


# --- Tools: function_calling.json and func_calling_eval.jsonl ----------------------------------------------

FUNCTION_CALLING_SYSTEM_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools> "
    "</tools> XML tags. You may call one or more functions to assist with the user query. Don't make "
    "assumptions about what values to plug into functions.\n<tools>\n{tools}\n</tools>\nFor each function "
    "call return a json object with function name and arguments within <tool_call> </tool_call> tags with "
    "the following schema:\n<tool_call>\n{{'arguments': <args-dict>, 'name': <function-name>}}\n"
    "</tool_call>\n"
)
WEATHER_CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "foggy")
# Each argument takes one of a few values, and no two values of an argument begin with the same token: a
# ~2M-parameter model trained for minutes can find that first token in the request and complete the value
# from memory, but cannot yet copy arbitrary text (checked in main()).
WEATHER_CITIES = ("Paris", "Berlin", "Rome", "Madrid", "Tokyo", "Cairo", "Lima", "Athens")
STOCK_SYMBOLS = ("AAPL", "MSFT", "GOOG", "TSLA", "NVDA", "IBM", "KO", "DIS")
DEGREES = (10, 25, 37, 40, 50, 68, 72, 86, 98)
TIMER_MINUTES = (5, 10, 20, 30, 45, 60, 90)
TIMER_LABELS = ("tea", "pasta", "laundry", "eggs", "rice", "bread", "oven", "meeting")
SEARCH_TOPICS = (
    "sourdough bread recipes", "the history of chess", "beginner guitar lessons", "how volcanoes form",
    "electric car range", "indoor plants for low light", "a camping checklist", "knitting for beginners",
)  # fmt: skip
MAX_RESULTS = (3, 5, 10)
ARGUMENT_VALUES = (
    WEATHER_CITIES,
    STOCK_SYMBOLS,
    DEGREES,
    TIMER_MINUTES,
    TIMER_LABELS,
    SEARCH_TOPICS,
    MAX_RESULTS,
)
# The scale to convert to -> the scale the degrees are in, and the conversion.
CONVERSIONS: dict[str, tuple[str, Callable[[float], float]]] = {
    "fahrenheit": ("Celsius", lambda degrees: degrees * 9 / 5 + 32),
    "celsius": ("Fahrenheit", lambda degrees: (degrees - 32) * 5 / 9),
}


@dataclass(frozen=True)
class ToolUse:
    """A request for one tool: what the user asks, the call that answers it, the tool's result, the reply."""

    request: str
    name: str
    arguments: dict[str, Any]
    result: dict[str, Any]
    answer: str


@dataclass(frozen=True)
class Phrasings:
    """How a request is worded: training rows use ``train``, the eval file only ``held_out``."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]

    def pick(self, rng: random.Random, held_out: bool) -> str:
        return rng.choice(self.held_out if held_out else self.train)


WEATHER_REQUESTS = Phrasings(
    train=(
        "What's the weather like in {city}?",
        "How warm is it in {city} right now?",
        "Tell me the current weather in {city}.",
        "Is it sunny in {city} today?",
    ),
    held_out=("Check the weather in {city} for me.", "Do I need a coat in {city} today?"),
)
STOCK_REQUESTS = Phrasings(
    train=(
        "What is the stock price of {symbol}?",
        "How much is {symbol} trading at?",
        "Get me the latest price for {symbol}.",
    ),
    held_out=("Check the share price of {symbol}.", "What does one {symbol} share cost now?"),
)
TEMPERATURE_REQUESTS = Phrasings(
    train=(
        "Convert {degrees} degrees to {to_scale}.",
        "What is {degrees} degrees in {to_scale}?",
        "Change {degrees} degrees into {to_scale}.",
    ),
    held_out=(
        "How much is {degrees} degrees in {to_scale}?",
        "Turn {degrees} degrees into {to_scale}, please.",
    ),
)
TIMER_REQUESTS = Phrasings(
    train=("Set a timer for {minutes} minutes.", "Start a {minutes} minute timer."),
    held_out=("Count down {minutes} minutes for me.",),
)
LABELLED_TIMER_REQUESTS = Phrasings(
    train=(
        "Set a {minutes} minute timer for {label}.",
        "Start a timer for {minutes} minutes called {label}.",
    ),
    held_out=("Count down {minutes} minutes for the {label}.",),
)
SEARCH_REQUESTS = Phrasings(
    train=("Search the web for {query}.", "Look up {query} online."),
    held_out=("Find pages about {query}.",),
)
COUNTED_SEARCH_REQUESTS = Phrasings(
    train=(
        "Find {max_results} results about {query}.",
        "Search for {query} and show me {max_results} results.",
    ),
    held_out=("Give me {max_results} links on {query}.",),
)


def weather_use(rng: random.Random, held_out: bool) -> ToolUse:
    city = rng.choice(WEATHER_CITIES)
    temperature, condition = rng.randint(-5, 35), rng.choice(WEATHER_CONDITIONS)
    result = {"temp_c": temperature, "condition": condition}
    answer = f"It is {temperature} degrees Celsius and {condition} in {city} right now."
    request = WEATHER_REQUESTS.pick(rng, held_out).format(city=city)
    return ToolUse(request, "get_weather", {"city": city}, result, answer)


def stock_use(rng: random.Random, held_out: bool) -> ToolUse:
    symbol = rng.choice(STOCK_SYMBOLS)
    price = rng.randint(1000, 90000) / 100
    result = {"price": price, "currency": "USD"}
    request = STOCK_REQUESTS.pick(rng, held_out).format(symbol=symbol)
    return ToolUse(
        request, "get_stock_price", {"symbol": symbol}, result, f"{symbol} is trading at {price} USD."
    )


def temperature_use(rng: random.Random, held_out: bool) -> ToolUse:
    """The request names only the scale to convert to, so one word in it decides ``to_unit``."""
    to_unit, degrees = rng.choice(list(CONVERSIONS)), rng.choice(DEGREES)
    from_scale, convert_degrees = CONVERSIONS[to_unit]
    to_scale, converted = to_unit.capitalize(), round(convert_degrees(degrees), 1)
    request = TEMPERATURE_REQUESTS.pick(rng, held_out).format(degrees=degrees, to_scale=to_scale)
    answer = f"{degrees} degrees {from_scale} is {converted} degrees {to_scale}."
    arguments = {"degrees": degrees, "to_unit": to_unit}
    return ToolUse(request, "convert_temperature", arguments, {"result": converted}, answer)


def timer_use(rng: random.Random, held_out: bool) -> ToolUse:
    """Half the timers have a label, the optional argument."""
    minutes = rng.choice(TIMER_MINUTES)
    if rng.random() < 0.5:
        arguments: dict[str, Any] = {"minutes": minutes}
        request = TIMER_REQUESTS.pick(rng, held_out).format(**arguments)
        answer = f"Your {minutes} minute timer has started."
    else:
        label = rng.choice(TIMER_LABELS)
        arguments = {"minutes": minutes, "label": label}
        request = LABELLED_TIMER_REQUESTS.pick(rng, held_out).format(**arguments)
        answer = f"Your {minutes} minute timer for {label} has started."
    return ToolUse(request, "set_timer", arguments, {"status": "started"}, answer)


def search_use(rng: random.Random, held_out: bool) -> ToolUse:
    """Some searches ask for a number of results, the optional argument."""
    query = rng.choice(SEARCH_TOPICS)
    if rng.random() < 0.6:
        arguments: dict[str, Any] = {"query": query}
        request = SEARCH_REQUESTS.pick(rng, held_out).format(**arguments)
    else:
        arguments = {"query": query, "max_results": rng.choice(MAX_RESULTS)}
        request = COUNTED_SEARCH_REQUESTS.pick(rng, held_out).format(**arguments)
    titles = [f"A guide to {query}", f"Facts about {query}"]
    answer = f"I found {lower_first(titles[0])} and {lower_first(titles[1])}."
    return ToolUse(request, "search_web", arguments, {"results": titles}, answer)


@dataclass(frozen=True)
class Tool:
    """A tool's OpenAI definition, the data set's labels for its rows, and how a request for it is drawn."""

    name: str
    description: str
    properties: dict[str, dict]
    required: tuple[str, ...]
    category: str
    subcategory: str
    task: str
    use: Callable[[random.Random, bool], ToolUse]

    @property
    def spec(self) -> dict:
        """The OpenAI tool dict, the form both hermes-function-calling-v1 and func-calling-eval use."""
        parameters = {"type": "object", "properties": self.properties, "required": list(self.required)}
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": parameters},
        }


# Descriptions are kept short: with the tiny vocabulary every tool definition costs 100-160 tokens.
TOOLS = {
    tool.name: tool
    for tool in (
        Tool(
            "get_weather", "Get the current weather in a city.",
            {"city": {"type": "string", "description": "City name"}}, ("city",),
            "Weather", "Current conditions", "Get the weather for a city", weather_use,
        ),
        Tool(
            "get_stock_price", "Get the latest price of a stock.",
            {"symbol": {"type": "string", "description": "Ticker symbol"}}, ("symbol",),
            "Finance", "Stock prices", "Get the latest price of a stock", stock_use,
        ),
        Tool(
            "convert_temperature", "Convert a temperature to another scale.",
            {"degrees": {"type": "number"}, "to_unit": {"type": "string", "enum": list(CONVERSIONS)}},
            ("degrees", "to_unit"),
            "Utilities", "Unit conversion", "Convert a temperature to another scale", temperature_use,
        ),
        Tool(
            "set_timer", "Start a countdown timer.",
            {
                "minutes": {"type": "integer", "description": "Length in minutes"},
                "label": {"type": "string", "description": "Optional name"},
            },
            ("minutes",),
            "Productivity", "Timers", "Start a countdown timer", timer_use,
        ),
        Tool(
            "search_web", "Search the web.",
            {
                "query": {"type": "string", "description": "Search text"},
                "max_results": {"type": "integer", "description": "Number of results"},
            },
            ("query",),
            "Information", "Web search", "Search the web for a topic", search_use,
        ),
    )
}  # fmt: skip
FUNCTION_CALLING_ROWS = 300
# A row is a conversation under one tool list: several requests, each answered by a call. More calls per
# system prompt is what teaches a tiny model to read the arguments out of the request.
REQUESTS_PER_ROW = ((1, 25), (2, 30), (3, 25), (4, 20))
DOUBLE_CALL_SHARE = 0.1
# Two different tools' definitions do not both fit the window next to the fixed system prompt.
DOUBLE_CALL_TOOLS = ("get_weather", "get_stock_price", "convert_temperature")
EVAL_SINGLE_CALL_ROWS = dict.fromkeys(TOOLS, 7)
EVAL_DOUBLE_CALL_ROWS = 5
# A third of the requests go on past the call, where it fits: tool response, then a short answer.
RESPONSE_SHARE = 1 / 3
MAX_ROW_TOOLS = 2
MAX_OTHER_TOOLS = 2
# The tiny recipe's max_seq_len is 768; what is left is headroom for BOS and EOS.
MAX_ROW_TOKENS = 760
DECONTAMINATION_NGRAM = Decontamination().ngram
FUNCTION_CALLING_SOURCE = DataSource.model_construct(
    name="function_calling", kind="function_calling", path="-", mode="canonical"
)


def double_call(rng: random.Random, tool: Tool, held_out: bool) -> tuple[ToolUse, ToolUse]:
    """Two calls of one tool with different arguments (two cities, two symbols, two temperatures)."""
    while True:
        first, second = tool.use(rng, held_out), tool.use(rng, held_out)
        if first.arguments != second.arguments:
            return first, second


def request_of(uses: tuple[ToolUse, ...]) -> str:
    """Two requests become one message, the second joined on as an afterthought."""
    first, *rest = uses
    return " ".join([first.request, *(f"Also, {lower_first(use.request)}" for use in rest)])


def draw_request(rng: random.Random, tools: Sequence[str]) -> tuple[ToolUse, ...]:
    """One message's calls: one call of one of ``tools``, or now and then two calls of one tool."""
    tool = TOOLS[rng.choice(tools)]
    if tool.name in DOUBLE_CALL_TOOLS and rng.random() < DOUBLE_CALL_SHARE:
        return double_call(rng, tool, held_out=False)
    return (tool.use(rng, False),)


def draw_eval_requests(rng: random.Random) -> list[tuple[ToolUse, ...]]:
    """Single-call requests for each tool, then two-call ones, all in the held-out phrasings."""
    drawn: list[tuple[ToolUse, ...]] = []
    for name, count in EVAL_SINGLE_CALL_ROWS.items():
        drawn += draw_unique(lambda name=name: (TOOLS[name].use(rng, True),), count, key=request_of)
    double = functools.partial(lambda: double_call(rng, TOOLS[rng.choice(DOUBLE_CALL_TOOLS)], held_out=True))
    return drawn + draw_unique(double, EVAL_DOUBLE_CALL_ROWS, key=request_of)


def needed_tools(uses: Sequence[ToolUse]) -> list[str]:
    return list(dict.fromkeys(use.name for use in uses))


def system_prompt(tools: list[str]) -> str:
    """The data set's prompt, which lists the tools as a Python repr."""
    return FUNCTION_CALLING_SYSTEM_PROMPT.format(tools=repr([TOOLS[name].spec for name in tools]))


@functools.cache
def tiny_tokenizer() -> PreTrainedTokenizerBase:
    return load_tiny_tokenizer()


def function_calling_conversation(tools: list[str], turns: Turns) -> list[dict[str, str]]:
    return [{"from": role, "value": value} for role, value in [("system", system_prompt(tools)), *turns]]


def fits(tools: list[str], turns: Turns) -> bool:
    """Whether the row fits the tiny recipe's window as the recipe trains on it: converted to the form the
    tool_use template renders, so nothing gets truncated away."""
    raw = {"conversations": function_calling_conversation(tools, turns)}
    row = convert(raw, "fit", FUNCTION_CALLING_SOURCE)
    text = render(row["messages"], tools=row["tools"])
    return len(tiny_tokenizer()(text)["input_ids"]) <= MAX_ROW_TOKENS


def python_call(use: ToolUse) -> str:
    """The data set's call form: a Python dict, arguments first."""
    call = {"arguments": use.arguments, "name": use.name}
    return f"<tool_call>\n{call!r}\n</tool_call>"


def tool_response(use: ToolUse) -> str:
    return f"<tool_response>\n{json.dumps({'name': use.name, 'content': use.result})}\n</tool_response>"


def exchange_turns(uses: tuple[ToolUse, ...], respond: bool) -> Turns:
    """One request and its calls; with ``respond``, the tool response and the answer too."""
    call: Turns = [("human", request_of(uses)), ("gpt", "\n".join(map(python_call, uses)))]
    if not respond:
        return call
    return [*call, ("tool", "\n".join(map(tool_response, uses))), ("gpt", " ".join(u.answer for u in uses))]


def conversation_turns(rng: random.Random) -> tuple[list[str], Turns]:
    """The tools a conversation uses and its turns: requests for them until the row is full."""
    tools = rng.sample(list(TOOLS), rng.randint(1, MAX_ROW_TOOLS))
    turns: Turns = []
    for _ in range(weighted_choice(rng, REQUESTS_PER_ROW)):
        uses = draw_request(rng, tools)
        respond = rng.random() < RESPONSE_SHARE
        options = [exchange_turns(uses, respond=True)] if respond else []
        options.append(exchange_turns(uses, respond=False))
        more = next((option for option in options if fits(tools, [*turns, *option])), None)
        if more is None:
            break
        turns += more
    if not turns:
        raise ValueError(f"one request for {tools} does not fit in {MAX_ROW_TOKENS} tokens")
    return tools, turns


def offered_tools(rng: random.Random, needed: list[str], turns: Turns) -> list[str]:
    """The tools the calls need and up to two others that still fit, shuffled: the model must pick by name."""
    names = list(needed)
    others = [name for name in TOOLS if name not in names]
    for other in rng.sample(others, rng.randint(0, MAX_OTHER_TOOLS)):
        if fits([*names, other], turns):
            names.append(other)
    rng.shuffle(names)
    return names


def function_calling_row(number: int, tools: list[str], turns: Turns) -> Row:
    called = next(role_value[1] for role_value in turns if role_value[0] == "gpt")
    tool = TOOLS[parse_tool_calls(called).calls[0].name]  # the row is filed under its first call's tool
    return {
        "id": f"fc-{number:04d}",
        "conversations": function_calling_conversation(tools, turns),
        "category": tool.category,
        "subcategory": tool.subcategory,
        "task": tool.task,
    }


def function_calling_rows(rng: random.Random) -> list[Row]:
    conversations = draw_unique(
        lambda: conversation_turns(rng), FUNCTION_CALLING_ROWS, key=lambda drawn: tuple(drawn[1])
    )
    rows = [(offered_tools(rng, needed, turns), turns) for needed, turns in conversations]
    return [function_calling_row(number, *row) for number, row in enumerate(rows, start=1)]


def func_calling_eval_row(uses: tuple[ToolUse, ...]) -> Row:
    """Only the tools the calls need: the eval renders them through the tool_use template, which spells each
    tool out twice, and more than that would leave the window the model was trained on."""
    calls = [{"name": use.name, "arguments": use.arguments} for use in uses]
    return {
        "prompt": [{"role": "user", "content": request_of(uses)}],
        "tools": json.dumps([TOOLS[name].spec for name in needed_tools(uses)]),
        "completion": json.dumps(calls[0] if len(calls) == 1 else calls),
    }


def func_calling_eval_rows(rng: random.Random) -> list[Row]:
    return [func_calling_eval_row(uses) for uses in draw_eval_requests(rng)]


# --- JSON mode: json_mode.json and json_mode_eval.jsonl --------------------------------------------------

JSON_MODE_ROWS_PER_SCHEMA = 50
EVAL_JSON_MODE_ROWS_PER_SCHEMA = 10
# As with the tool arguments, each field takes one of a few values whose first tokens differ (checked in
# main()), and training and eval draw from the same values: what the eval holds out is the phrasing. A title,
# name, city, event or item takes one of four: the tiny model completes such a word from memory, and with eight
# to choose from it mostly picked a wrong one. Numbers it copies digit by digit. Cities, ages and attendee
# counts are tool argument values, so what the function-calling rows teach about them carries over.
BOOK_TITLES = ("Crimson River", "Frozen Bridge", "Hidden Garden", "Silent Tower")
FULL_NAMES = ("Anna Berg", "Ben Costa", "Clara Diaz", "David Evans")
CITIES = ("Berlin", "Cairo", "Lima", "Tokyo")
# Digits are single tokens, so no more than two years can differ in their first one.
YEARS = (1984, 2007)
AGES = tuple(n for n in DEGREES if 18 <= n <= 80)
EVENT_NAMES = ("book fair", "dance class", "film night", "tech meetup")
# The schema offers every weekday; Thursday and Saturday begin with the tokens of Tuesday and Sunday.
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
EVENT_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Friday", "Sunday")
ORDER_ITEMS = ("backpack", "coffee mug", "rain jacket", "umbrella")
QUANTITIES = (2, 3, 4, 5, 6, 10)
# A price is a tool argument's number plus 0.99, so its digits go on as that number's do.
UNIT_PRICES = tuple(float(f"{n}.99") for n in DEGREES)
CURRENCIES = ("USD", "EUR", "GBP")
JSON_FIELD_VALUES = (
    BOOK_TITLES, FULL_NAMES, YEARS, AGES, CITIES, EVENT_NAMES, EVENT_WEEKDAYS, DEGREES, ORDER_ITEMS,
    QUANTITIES, UNIT_PRICES, CURRENCIES,
)  # fmt: skip


def model_schema(title: str, fields: dict[str, dict]) -> dict:
    """The JSON schema pydantic writes for a model with only required fields: a title on every property."""
    properties = {name: {"title": name.replace("_", " ").title(), **spec} for name, spec in fields.items()}
    return {"title": title, "type": "object", "properties": properties, "required": list(fields)}


def book_answer(rng: random.Random) -> dict[str, Any]:
    return {"title": rng.choice(BOOK_TITLES), "author": rng.choice(FULL_NAMES), "year": rng.choice(YEARS)}


def person_answer(rng: random.Random) -> dict[str, Any]:
    return {
        "name": rng.choice(FULL_NAMES),
        "age": rng.choice(AGES),
        "city": rng.choice(CITIES),
        "is_student": rng.random() < 0.5,
    }


def event_answer(rng: random.Random) -> dict[str, Any]:
    return {
        "name": rng.choice(EVENT_NAMES),
        "city": rng.choice(CITIES),
        "weekday": rng.choice(EVENT_WEEKDAYS),
        "attendees": rng.choice(DEGREES),
    }


def order_answer(rng: random.Random) -> dict[str, Any]:
    return {
        "item": rng.choice(ORDER_ITEMS),
        "quantity": rng.choice(QUANTITIES),
        "unit_price": rng.choice(UNIT_PRICES),
        "currency": rng.choice(CURRENCIES),
    }


@dataclass(frozen=True)
class JsonTask:
    """A schema, how to draw an answer for it, and requests that state every value of the answer."""

    schema: dict
    category: str
    subcategory: str
    answer: Callable[[random.Random], dict[str, Any]]
    requests: Phrasings


def paired_phrasings(openings: Sequence[str], bodies: Sequence[str]) -> Phrasings:
    """Each opening joined to each body, the i-th opening to the i-th body held out: every eval request is
    worded as no training request is, while its opening and its body each come in training with others. A
    ~2M-parameter model tells the schema from the wording of the request, not from the schema in the system
    prompt, so it answers a wholly new wording with the wrong object; a new pairing it can read."""
    pairs = [
        (i == j, f"{opening} {body}") for i, opening in enumerate(openings) for j, body in enumerate(bodies)
    ]
    return Phrasings(
        train=tuple(text for held_out, text in pairs if not held_out),
        held_out=tuple(text for held_out, text in pairs if held_out),
    )


JSON_TASKS = (
    JsonTask(
        model_schema(
            "Book", {"title": {"type": "string"}, "author": {"type": "string"}, "year": {"type": "integer"}}
        ),
        "Books", "Catalog records", book_answer,
        paired_phrasings(
            ("Make a book record:", "Catalog this book:", "Give me the book as JSON:", "Add to the catalog:"),
            (
                "{title} by {author}, published in {year}.",
                "{title}, written by {author} in {year}.",
                "{author} wrote {title} in {year}.",
                "{title} by {author} ({year}).",
            ),
        ),
    ),
    JsonTask(
        model_schema(
            "Person",
            {
                "name": {"type": "string"}, "age": {"type": "integer"},
                "city": {"type": "string"}, "is_student": {"type": "boolean"},
            },
        ),
        "People", "Profiles", person_answer,
        paired_phrasings(
            ("Create a profile:", "Give me the person as JSON:", "New person:", "Add to the people list:"),
            (
                "{name}, age {age}, who lives in {city} and {student}.",
                "{name} is {age} years old, lives in {city}, {student}.",
                "{name}, aged {age}, living in {city}, who {student}.",
                "{name} is {age}, is based in {city} and {student}.",
            ),
        ),
    ),
    JsonTask(
        model_schema(
            "Event",
            {
                "name": {"type": "string"}, "city": {"type": "string"},
                "weekday": {"type": "string", "enum": list(WEEKDAYS)}, "attendees": {"type": "integer"},
            },
        ),
        "Events", "Listings", event_answer,
        paired_phrasings(
            ("Record an event:", "Give me the event as JSON:", "Add a listing:", "New entry for the calendar:"),
            (
                "a {name} in {city} on {weekday} with {attendees} attendees.",
                "the {name} in {city} is on {weekday}, {attendees} people are coming.",
                "{name}, held in {city} on {weekday}, {attendees} attendees.",
                "{name}, {city}, {weekday}, {attendees} guests.",
            ),
        ),
    ),
    JsonTask(
        model_schema(
            "Order",
            {
                "item": {"type": "string"}, "quantity": {"type": "integer"},
                "unit_price": {"type": "number"}, "currency": {"type": "string", "enum": list(CURRENCIES)},
            },
        ),
        "Shopping", "Orders", order_answer,
        paired_phrasings(
            ("Create an order:", "Give me the order as JSON:", "Add to my basket:", "Please buy:"),
            (
                "{quantity} x {item} at {unit_price} {currency} each.",
                "{quantity} x {item} for {unit_price} {currency} each.",
                "{quantity} x {item}, costing {unit_price} {currency} each.",
                "{quantity} x {item}, {unit_price} {currency} apiece.",
            ),
        ),
    ),
)  # fmt: skip


def json_request(rng: random.Random, task: JsonTask, held_out: bool) -> tuple[str, dict[str, Any]]:
    answer = task.answer(rng)
    student = "is a student" if answer.get("is_student") else "is not a student"
    return task.requests.pick(rng, held_out).format(**answer, student=student), answer


def draw_json_requests(rng: random.Random, per_task: int, held_out: bool) -> list[tuple[JsonTask, str, dict]]:
    return [
        (task, request, answer)
        for task in JSON_TASKS
        for request, answer in draw_unique(lambda task=task: json_request(rng, task, held_out), per_task)
    ]


def json_mode_row(number: int, task: JsonTask, request: str, answer: dict[str, Any]) -> Row:
    """The data set ends the system prompt with a newline, the eval set does not."""
    system = json_mode_system_prompt(task.schema) + "\n"
    turns = [("system", system), ("human", request), ("gpt", json.dumps(answer))]
    return {
        "id": f"jm-{number:04d}",
        "conversations": [{"from": role, "value": value} for role, value in turns],
        "category": task.category,
        "subcategory": task.subcategory,
        "schema": json.dumps(task.schema),
    }


def json_mode_rows(rng: random.Random) -> list[Row]:
    drawn = draw_json_requests(rng, JSON_MODE_ROWS_PER_SCHEMA, held_out=False)
    rng.shuffle(drawn)
    return [json_mode_row(number, *row) for number, row in enumerate(drawn, start=1)]


def json_mode_eval_row(task: JsonTask, request: str, answer: dict[str, Any]) -> Row:
    system = json_mode_system_prompt(task.schema)
    return {
        "prompt": [{"role": "system", "content": system}, {"role": "user", "content": request}],
        "completion": json.dumps(answer),
        "schema": json.dumps(task.schema),
    }


def json_mode_eval_rows(rng: random.Random) -> list[Row]:
    drawn = draw_json_requests(rng, EVAL_JSON_MODE_ROWS_PER_SCHEMA, held_out=True)
    return [json_mode_eval_row(*row) for row in drawn]


# --- argument_extraction.json: requests and their values as JSON, with no tool list or schema ------------

# The tiny recipe repeats these rows (weight 6): what they teach takes ~1000 examples per argument.
EXTRACTION_ROWS = 500
JSON_EXTRACTION_ROWS = 300
EXTRACTION_QUESTIONS = (
    "Give the values in this request as JSON: {request}",
    "Extract the arguments from this request as a JSON object: {request}",
)


def extraction_conversation(rng: random.Random) -> tuple[str | None, Turns, str]:
    """A request and its call's arguments as JSON, with no tool list around it. In a few dozen tokens a tiny
    model learns to find a value in the request within minutes; behind the ~450-token function-calling system
    prompt it does not. The function-calling rows then reuse what it learned here."""
    use = TOOLS[rng.choice(list(TOOLS))].use(rng, False)
    question = rng.choice(EXTRACTION_QUESTIONS).format(request=use.request)
    return None, [(question, json.dumps(use.arguments))], "extraction"


def json_extraction_conversation(rng: random.Random) -> tuple[str | None, Turns, str]:
    """A JSON-mode request in a training phrasing and its answer, with no schema around it: the same short
    form, for the fields of the JSON-mode rows, which alone are too few to teach them."""
    task = rng.choice(JSON_TASKS)
    request, answer = json_request(rng, task, held_out=False)
    question = rng.choice(EXTRACTION_QUESTIONS).format(request=request)
    return None, [(question, json.dumps(answer))], "extraction"


def argument_extraction_rows(rng: random.Random) -> list[Row]:
    """In the OpenHermes-2.5 schema, so that the recipe reads them as one more chat source. The JSON-mode
    rows are drawn after the tool rows, so the tool rows do not depend on them."""
    conversations = draw_unique(lambda: extraction_conversation(rng), EXTRACTION_ROWS)
    conversations += draw_unique(lambda: json_extraction_conversation(rng), JSON_EXTRACTION_ROWS)
    return [openhermes_row(*conversation, weighted=False) for conversation in conversations]


# --- orca_dpo_pairs.jsonl: preference pairs from the chat families ----------------------------------------

DPO_ROWS = 300
DPO_SYSTEM_PROMPTS = ("", "You are a helpful assistant.", "You are a concise assistant.")
HEDGE_SHARE = 0.3
# For a regular plural "word + s" is right; only the others give a clearly wrong rejected answer.
IRREGULAR_PLURALS = tuple((word, plural) for word, plural in PLURALS if plural != word + "s")


def capital_pair(rng: random.Random) -> tuple[str, str, str]:
    (country, capital), (_, wrong) = rng.sample(CAPITALS, 2)
    question = rng.choice(CAPITAL_QUESTIONS).format(country=country)
    return question, f"The capital of {country} is {capital}.", f"The capital of {country} is {wrong}."


def arithmetic_pair(rng: random.Random) -> tuple[str, str, str]:
    problem = arithmetic_problem(rng)
    wrong = problem.result + rng.choice((-1, 1)) * rng.randint(1, 10)
    return problem.question, f"{problem.statement} = {problem.result}.", f"{problem.statement} = {wrong}."


def opposite_pair(rng: random.Random) -> tuple[str, str, str]:
    (word, opposite), (_, wrong) = rng.sample(OPPOSITES, 2)
    question = rng.choice(OPPOSITE_QUESTIONS).format(word=word)
    return question, f"The opposite of {word} is {opposite}.", f"The opposite of {word} is {wrong}."


def plural_pair(rng: random.Random) -> tuple[str, str, str]:
    word, plural = rng.choice(IRREGULAR_PLURALS)
    question = rng.choice(PLURAL_QUESTIONS).format(word=word)
    return question, f"The plural of {word} is {plural}.", f"The plural of {word} is {word}s."


DPO_FAMILIES = ((capital_pair, 30), (arithmetic_pair, 30), (opposite_pair, 20), (plural_pair, 20))


def dpo_row(rng: random.Random) -> Row:
    """Chosen is the SFT answer; rejected states a wrong fact, sometimes behind a hedge that pads it out."""
    question, chosen, rejected = weighted_choice(rng, DPO_FAMILIES)(rng)
    if rng.random() < HEDGE_SHARE:
        rejected = f"I think {lower_first(rejected)}"
    system = rng.choice(DPO_SYSTEM_PROMPTS)
    return {"system": system, "question": question, "chosen": chosen, "rejected": rejected}


def orca_dpo_rows(rng: random.Random) -> list[Row]:
    return draw_unique(lambda: dpo_row(rng), DPO_ROWS, key=lambda row: (row["system"], row["question"]))


# --- Checks -----------------------------------------------------------------------------------------------


def first_value_token(value: str | float) -> str:
    """The token a value starts with inside a JSON call or answer, after the space and quote before it."""
    tokens = tiny_tokenizer().tokenize(json.dumps(value))
    return tokens[1] if tokens[0] in ("▁", '▁"') else tokens[0]


def assert_distinct_first_tokens() -> None:
    """Within each tool argument and each JSON-mode field, no two values begin with the same token."""
    for values in (*ARGUMENT_VALUES, *JSON_FIELD_VALUES):
        starts = [first_value_token(value) for value in values]
        shared = {start for start in starts if starts.count(start) > 1}
        assert not shared, f"values {values} share first tokens {sorted(shared)}"


def training_requests(training: dict[str, list[Row]]) -> list[str]:
    """Every user message of the training files, read from the Hub schemas they are written in."""
    requests = [row["question"] for row in training["orca_dpo_pairs.jsonl"]]
    for name in ("openhermes.json", "argument_extraction.json", "function_calling.json", "json_mode.json"):
        requests += [
            turn["value"]
            for row in training[name]
            for turn in row["conversations"]
            if turn["from"] == "human"
        ]
    return requests


def assert_not_contaminated(training: dict[str, list[Row]], evals: dict[str, list[Row]]) -> None:
    """Prep's own decontamination rule, run here, so prep drops no training row: no training request equals
    an eval request or shares a 13-word run with one."""
    index = Decontaminator(n=DECONTAMINATION_NGRAM)
    for name, rows in evals.items():
        index.add(name, [turn["content"] for row in rows for turn in row["prompt"] if turn["role"] == "user"])
    for request in training_requests(training):
        hit = index.match({"messages": [{"role": "user", "content": request}]})
        assert hit is None, f"training request {request!r} is {hit}"


def json_wording(request: str, answer: dict[str, Any]) -> re.Pattern[str]:
    """The request's wording with every value of its answer as a wildcard, whatever the values are. Longer
    values come first, so a short number is never taken for a part of a price."""
    values = sorted({str(v) for v in answer.values() if not isinstance(v, bool)}, key=len, reverse=True)
    parts = re.split("|".join(rf"\b{re.escape(value)}\b" for value in values), request)
    return re.compile(".+?".join(map(re.escape, parts)))


def json_fields(schema: str, answer: dict[str, Any]) -> set[tuple[str, str, str]]:
    """Each value of an answer, filed under its schema's title and its key."""
    title = json.loads(schema)["title"]
    return {(title, key, json.dumps(value)) for key, value in answer.items()}


def assert_json_phrasings_held_out(training: dict[str, list[Row]], json_mode_eval: list[Row]) -> None:
    """Every JSON-mode eval value is one a training answer gives the same field of the same schema, so the
    model can complete it from memory, and no training request in any file is worded as an eval request is,
    whatever its values: a pass means the model read a phrasing it was never trained on."""
    trained_fields = {
        field
        for row in training["json_mode.json"]
        for field in json_fields(row["schema"], json.loads(row["conversations"][-1]["value"]))
    }
    requests = training_requests(training)
    for row in json_mode_eval:
        request = next(turn["content"] for turn in row["prompt"] if turn["role"] == "user")
        answer = json.loads(row["completion"])
        untrained = json_fields(row["schema"], answer) - trained_fields
        assert not untrained, f"eval values {sorted(untrained)} are in no training answer"
        wording = json_wording(request, answer)
        worded = next((trained for trained in requests if wording.search(trained)), None)
        assert worded is None, f"training request {worded!r} is worded as eval request {request!r} is"


# --- Output ------------------------------------------------------------------------------------------------


def as_json_array(rows: list[Row]) -> str:
    """The layout of the hand-written files these replace: one-space indent, a final newline."""
    return json.dumps(rows, indent=1) + "\n"


def as_json_lines(rows: list[Row]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def stream(name: str) -> random.Random:
    """A random stream per file, so changing one generator leaves the other files' bytes alone."""
    return random.Random(f"{SEED}:{name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where to write the files")
    args = parser.parse_args(argv)
    assert_distinct_first_tokens()
    training = {
        "openhermes.json": openhermes_rows(stream("openhermes")),
        "argument_extraction.json": argument_extraction_rows(stream("extraction")),
        "function_calling.json": function_calling_rows(stream("function_calling")),
        "json_mode.json": json_mode_rows(stream("json_mode")),
        "orca_dpo_pairs.jsonl": orca_dpo_rows(stream("orca_dpo_pairs")),
    }
    evals = {
        "func_calling_eval.jsonl": func_calling_eval_rows(stream("func_calling_eval")),
        "json_mode_eval.jsonl": json_mode_eval_rows(stream("json_mode_eval")),
    }
    assert_not_contaminated(training, evals)
    assert_json_phrasings_held_out(training, evals["json_mode_eval.jsonl"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (training | evals).items():
        text = as_json_array(rows) if name.endswith(".json") else as_json_lines(rows)
        (args.out_dir / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"{name}: {len(rows)} rows, {len(text.encode()) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()

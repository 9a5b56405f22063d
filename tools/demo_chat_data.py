"""The synthetic chat set that teaches the demo model Qwen3.5's chat markup (tools/finetune_demo_chat.py trains on it,
tools/eval_demo_chat.py measures it).

Four kinds of exchange, each a list of messages (+ tools) rendered by the model's own chat template and the reply the
assistant should write after the template's generation prompt:

- plain: a short request (greeting, sum, repeat, capital letters, capital city, counting, or "write a Python function"
  from the stdlib's documented functions) answered in the thinking form (`reasoning\\n</think>\\n\\nanswer`) or the
  enable_thinking=false form (the template writes the empty think block; the reply is the answer);
- tool: 1-3 tools offered (JSON schemas) and a request for one of them, answered by a Qwen3-Coder XML tool call whose
  arguments are copied from the request;
- result: the same, one turn later: the call is in the history, the tool's result follows, and the reply reports it;
- decline: tools offered but the request needs none of them: a plain answer, no call.

Every reply ends with `<|im_end|>`. The held-out split uses request phrasings, system prompts and values (cities,
words, countries, stdlib files) that training never sees, so the evaluation measures the markup on new prompts, not
recall of memorised ones.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

IM_END = "<|im_end|>"
TRAIN, HELDOUT = "train", "heldout"


def split_of(value: str) -> str:
    """Values (cities, words, ...) go to one split only: about one in five is held out."""
    return HELDOUT if zlib.crc32(value.encode()) % 5 == 0 else TRAIN


def pick(rng: random.Random, pool: list[str], split: str) -> str:
    return rng.choice([v for v in pool if split_of(v) == split])


CITIES = ("Paris London Berlin Madrid Rome Lisbon Dublin Vienna Prague Warsaw Oslo Stockholm Helsinki Copenhagen "
          "Amsterdam Brussels Zurich Geneva Munich Hamburg Milan Naples Lyon Marseille Porto Seville Valencia Athens "
          "Istanbul Cairo Nairobi Lagos Accra Dakar Tunis Casablanca Johannesburg Tokyo Osaka Kyoto Seoul Busan "
          "Beijing Shanghai Shenzhen Taipei Manila Jakarta Bangkok Hanoi Singapore Delhi Mumbai Chennai Karachi "
          "Dhaka Tehran Baghdad Dubai Doha Riyadh Sydney Melbourne Perth Auckland Wellington Toronto Montreal "
          "Vancouver Chicago Boston Seattle Denver Dallas Houston Miami Atlanta Phoenix Portland Austin Lima "
          "Bogota Quito Santiago Caracas Havana Mexico Montevideo Reykjavik Tallinn Riga Vilnius Kyiv Minsk "
          "Budapest Bucharest Sofia Belgrade Zagreb Ljubljana Bratislava Krakow Gdansk Bergen Gothenburg Aarhus "
          "Antwerp Rotterdam Utrecht Bordeaux Nantes Toulouse Nice Bologna Florence Venice Turin Granada "
          "Bilbao").split()
WORDS = ("apple river stone cloud garden window bridge rocket pencil silver forest planet orange castle engine "
         "violin candle ladder mirror harbor desert island jungle meadow canyon valley glacier thunder summer winter "
         "autumn spring lemon cherry tiger rabbit falcon dolphin turtle parrot coffee butter pepper ginger cotton "
         "marble copper velvet shadow signal packet socket buffer kernel thread tensor vector matrix cursor folder "
         "ticket rocket banner button camera circle dragon feather hammer helmet jacket lantern magnet needle "
         "pillow puzzle saddle scooter spider tunnel wallet wizard yellow zipper anchor basket blanket cactus").split()
COUNTRIES = {"France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome", "Portugal": "Lisbon",
             "Ireland": "Dublin", "Austria": "Vienna", "Poland": "Warsaw", "Norway": "Oslo", "Sweden": "Stockholm",
             "Finland": "Helsinki", "Denmark": "Copenhagen", "Greece": "Athens", "Egypt": "Cairo", "Kenya": "Nairobi",
             "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Peru": "Lima", "Chile": "Santiago",
             "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
             "Mexico": "Mexico City", "Hungary": "Budapest", "Romania": "Bucharest", "Bulgaria": "Sofia",
             "Croatia": "Zagreb", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius",
             "Iceland": "Reykjavik",
             "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Turkey": "Ankara", "Iran": "Tehran",
             "Ghana": "Accra", "Senegal": "Dakar", "Morocco": "Rabat", "Colombia": "Bogota", "Cuba": "Havana",
             "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern", "Czechia": "Prague"}
MODULES = ("os.path json re asyncio collections itertools functools pathlib subprocess threading socket http.client "
           "urllib.parse datetime logging argparse unittest typing dataclasses enum csv sqlite3 zipfile tarfile "
           "shutil tempfile random math statistics decimal fractions heapq bisect struct hashlib hmac base64 "
           "pickle copy pprint textwrap string difflib inspect contextlib abc io glob fnmatch signal queue").split()
TOPICS = ("reading a file line by line", "sorting a dictionary by value", "parsing command line options",
          "formatting dates", "joining paths", "running a subprocess", "writing a CSV file", "opening a socket",
          "hashing a password", "copying a directory tree", "timing a function", "reading JSON from a file",
          "matching a regular expression", "creating a temporary file", "logging to a file", "retrying on errors",
          "decoding base64", "splitting a string", "zipping two lists", "counting words", "merging dictionaries",
          "walking a directory", "escaping HTML", "rounding decimals", "comparing two texts", "spawning threads")
CURRENCIES = "USD EUR GBP JPY CHF CAD AUD SEK NOK PLN".split()
LANGUAGES = "French German Spanish Italian Portuguese Dutch Polish Swedish Finnish Greek Turkish Japanese".split()
NAMES = "alice bob carol dave erin frank grace heidi ivan judy mallory oscar peggy trent victor wendy".split()


# ---- tools -----------------------------------------------------------------------------------------------------------

@dataclass
class Tool:
    """A tool the chats offer: its JSON schema, request phrasings per split (their {placeholders} are the arguments
    the call carries), an argument maker and a fake result with the sentence that reports it."""

    name: str
    description: str
    params: dict[str, tuple[str, str]]  # name -> (JSON type, description)
    requests: dict[str, list[str]]
    make_args: Callable[[random.Random, str], dict[str, Any]]
    result: Callable[[dict[str, Any], random.Random], tuple[dict[str, Any], str]]
    required: list[str] = field(default_factory=list)

    def schema(self) -> dict[str, Any]:
        props = {k: {"type": t, "description": d} for k, (t, d) in self.params.items()}
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": {
            "type": "object", "properties": props, "required": self.required or list(self.params)[:1]}}}


def _python_snippet(rng: random.Random, split: str) -> dict[str, Any]:
    a, b, word = rng.randint(2, 99), rng.randint(2, 99), pick(rng, WORDS, split)
    code, out = rng.choice([(f"print({a} + {b})", a + b), (f"print({a} * {b})", a * b),
                            (f"print(len('{word}'))", len(word)), (f"print('{word}'.upper())", word.upper()),
                            (f"print(sum(range({a})))", sum(range(a))), (f"print({a} ** 2)", a * a),
                            (f"print(max({a}, {b}))", max(a, b)), (f"print('{word}'[::-1])", word[::-1])])
    return {"code": code, "_output": str(out)}


def _weather(args, rng):
    t, cond = rng.randint(-5, 35), rng.choice(["sunny", "cloudy", "rainy", "windy", "foggy", "snowy"])
    answer = f"It is {t} degrees and {cond} in {args['city']}."
    return {"city": args["city"], "temperature": t, "condition": cond}, answer


TOOLS = [
    Tool("get_weather", "Get the weather forecast for a city",
         {"city": ("string", "city name"), "days": ("integer", "number of days")},
         {TRAIN: ["What's the weather in {city}?", "Weather for {city} please.", "Is it raining in {city}?",
                  "How warm is it in {city} today?", "Check the weather in {city}.", "Tell me the forecast for {city}.",
                  "What's the weather in {city} for the next {days} days?",
                  "Give me a {days}-day forecast for {city}."],
          HELDOUT: ["I'm flying to {city} tomorrow. What weather should I expect there?",
                    "Could you look up the current conditions in {city}?",
                    "Forecast for {city} over the coming {days} days, please."]},
         lambda rng, s: {"city": pick(rng, CITIES, s), "days": rng.randint(2, 9)}, _weather, ["city"]),
    Tool("run_python", "Run Python code and return what it prints", {"code": ("string", "Python source to run")},
         {TRAIN: ["Run this Python code: {code}", "Execute {code} in Python.", "What does {code} print? Run it.",
                  "Please run {code}", "Use Python to run: {code}"],
          HELDOUT: ["Can you execute the following snippet for me? {code}",
                    "Evaluate this with the interpreter: {code}"]},
         _python_snippet, lambda a, rng: ({"output": a["_output"]}, f"The code printed {a['_output']}.")),
    Tool("search_docs", "Search the Python documentation", {"query": ("string", "what to look for")},
         {TRAIN: ["Search the docs for {query}.", "Look up {query} in the documentation.",
                  "Find documentation about {query}.", "What do the docs say about {query}? Search them."],
          HELDOUT: ["I need help with {query}; can you check the documentation?",
                    "Please do a documentation search on {query}."]},
         lambda rng, s: {"query": rng.choice([pick(rng, MODULES, s), pick(rng, list(TOPICS), s)])},
         lambda a, rng: ({"title": a["query"], "hits": (n := rng.randint(1, 9))},
                         f"I found {n} pages about {a['query']}.")),
    Tool("get_time", "Get the local time in a city", {"city": ("string", "city name")},
         {TRAIN: ["What time is it in {city}?", "Tell me the local time in {city}.", "Current time in {city}?"],
          HELDOUT: ["Do you know what the clock says in {city} right now?"]},
         lambda rng, s: {"city": pick(rng, CITIES, s)},
         lambda a, rng: ({"time": (t := f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}")},
                         f"It is {t} in {a['city']}.")),
    Tool("convert_currency", "Convert an amount of money between currencies",
         {"amount": ("number", "amount to convert"), "source": ("string", "currency code to convert from"),
          "target": ("string", "currency code to convert to")},
         {TRAIN: ["Convert {amount} {source} to {target}.", "How much is {amount} {source} in {target}?",
                  "Change {amount} {source} into {target}."],
          HELDOUT: ["I have {amount} {source}; what would that be worth in {target}?"]},
         lambda rng, s: {"amount": rng.randint(1, 999), "source": (c := rng.sample(CURRENCIES, 2))[0],
                         "target": c[1]},
         lambda a, rng: ({"result": (r := round(a["amount"] * rng.uniform(0.5, 1.5), 2))},
                         f"{a['amount']} {a['source']} is {r} {a['target']}.")),
    Tool("send_email", "Send an email", {"to": ("string", "recipient address"), "subject": ("string", "subject line")},
         {TRAIN: ["Email {to} with the subject {subject}.", "Send an email to {to} titled {subject}.",
                  "Write to {to}, subject: {subject}."],
          HELDOUT: ["Could you drop {to} a note? Use {subject} as the subject."]},
         lambda rng, s: {"to": f"{rng.choice(NAMES)}@example.com", "subject": pick(rng, WORDS, s).capitalize()},
         lambda a, rng: ({"status": "sent"}, f"The email to {a['to']} was sent.")),
    Tool("read_file", "Read a text file", {"path": ("string", "file path")},
         {TRAIN: ["Show me the file {path}.", "Read {path} for me.", "What is in {path}?", "Open {path}."],
          HELDOUT: ["I'd like to see the contents of {path}, please."]},
         lambda rng, s: {"path": f"{rng.choice(['src', 'docs', 'tests', 'data'])}/{pick(rng, WORDS, s)}."
                                 f"{rng.choice(['py', 'txt', 'md', 'json'])}"},
         lambda a, rng: ({"lines": (n := rng.randint(3, 300))}, f"{a['path']} has {n} lines.")),
    Tool("translate", "Translate text into another language",
         {"text": ("string", "text to translate"), "language": ("string", "target language")},
         {TRAIN: ["Translate {text} into {language}.", "How do you say {text} in {language}?",
                  "Give me {text} in {language}."],
          HELDOUT: ["What would {text} be in {language}? Please translate it."]},
         lambda rng, s: {"text": pick(rng, WORDS, s), "language": rng.choice(LANGUAGES)},
         lambda a, rng: ({"translation": (w := a["text"][::-1])}, f"In {a['language']}, {a['text']} is {w}.")),
]
TOOLS_BY_NAME = {t.name: t for t in TOOLS}

# More training phrasings: a tool's cores (noun phrases for look-ups, verb phrases for actions) in general wrappers,
# so that the model learns that the core picks the tool, whatever surrounds it. The held-out phrasings above stay
# whole sentences that training never sees (checked in _check_splits).
ASK_WRAPPERS = ["What's {core}?", "Tell me {core}.", "Look up {core}.", "Can you check {core}?", "I need {core}.",
                "Please find {core}.", "Get me {core}, please.", "Hey, what is {core}?", "I want to know {core}."]
DO_WRAPPERS = ["{Core}.", "Please {core}.", "Can you {core}?", "Could you {core} for me?", "I need you to {core}.",
               "Hey, {core}!", "{Core}, thanks.", "Would you {core}?"]
CORES = {
    "get_weather": (ASK_WRAPPERS, ["the weather in {city}", "the forecast for {city}", "the weather today in {city}",
                                   "a {days}-day forecast for {city}", "the weather in {city} for {days} days"]),
    "get_time": (ASK_WRAPPERS, ["the time in {city}", "the local time in {city}", "the clock time in {city}"]),
    "search_docs": (DO_WRAPPERS, ["search the docs for {query}", "look up {query} in the documentation",
                                  "find the documentation on {query}", "search the documentation about {query}"]),
    "run_python": (DO_WRAPPERS, ["run {code}", "execute {code}", "run this code: {code}", "run the snippet {code}"]),
    "convert_currency": (DO_WRAPPERS, ["convert {amount} {source} to {target}",
                                       "change {amount} {source} into {target}",
                                       "tell me what {amount} {source} is in {target}"]),
    "send_email": (DO_WRAPPERS, ["email {to} with the subject {subject}", "send {to} an email titled {subject}",
                                 "write an email to {to} with subject {subject}", "mail {to}, subject {subject}"]),
    "read_file": (DO_WRAPPERS, ["open {path}", "show me {path}", "read the file {path}", "print the file {path}"]),
    "translate": (DO_WRAPPERS, ["translate {text} into {language}", "translate the word {text} to {language}",
                                "say {text} in {language}"]),
}


def _wrap(wrapper: str, core: str) -> str:
    return wrapper.replace("{Core}", core[0].upper() + core[1:]).replace("{core}", core)


for _tool in TOOLS:
    _wrappers, _cores = CORES[_tool.name]
    _tool.requests[TRAIN] += [_wrap(w, c) for w in _wrappers for c in _cores]


# ---- plain requests: (user, reasoning, answer) -----------------------------------------------------------------------

GREETINGS = {TRAIN: ["Hi", "Hello!", "Hey there", "Good morning", "Hi, how are you?", "Hello, who are you?",
                     "Good evening!", "Yo", "Hi there, assistant.", "Hello again"],
             HELDOUT: ["Greetings, assistant!", "hey, anybody there?"]}
PLAIN = {  # kind -> split -> phrasings
    "add": {TRAIN: ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.", "What do {a} and {b} add up to?",
                    "{a} + {b} = ?", "Sum {a} and {b}, please."],
            HELDOUT: ["Could you tell me the sum of {a} and {b}?"]},
    "repeat": {TRAIN: ["Repeat after me: {w} {v}", "Say {w} {v}", "Echo this: {w} {v}", "Repeat the words {w} {v}.",
                       "Can you say {w} {v}?"],
               HELDOUT: ["Please say the words {w} {v} back to me."]},
    "upper": {TRAIN: ["Write {w} in capital letters.", "Uppercase this word: {w}", "Capitalize every letter of {w}.",
                      "Spell {w} in upper case."],
              HELDOUT: ["How does {w} look in all caps?"]},
    "capital": {TRAIN: ["What is the capital of {c}?", "Name the capital city of {c}.", "Tell me the capital of {c}.",
                        "{c}: what is its capital?"],
                HELDOUT: ["Which city is the seat of government of {c}?"]},
    "count": {TRAIN: ["Count from 1 to {n}.", "List the numbers 1 to {n}.", "Count to {n}.",
                      "Write the numbers from 1 up to {n}."],
              HELDOUT: ["Please count up to {n} for me."]},
}


def plain_request(rng: random.Random, split: str, functions: list[tuple[str, str, str]]) -> tuple[str, str, str]:
    kind = rng.choice(["greet", "add", "repeat", "upper", "capital", "count", "function", "function"])
    if kind == "function" and functions:
        name, summary, code = rng.choice(functions)
        return (f"Write a Python function `{name}`: {summary}", f"The user wants a Python function `{name}`.",
                code.rstrip())
    if kind in ("greet", "function"):
        return rng.choice(GREETINGS[split]), "The user greets me. I will greet them back.", \
            rng.choice(["Hello! How can I help you today?", "Hi! What can I do for you?"])
    a, b, n = rng.randint(1, 99), rng.randint(1, 99), rng.randint(3, 9)
    w, v = pick(rng, WORDS, split), pick(rng, WORDS, split)
    c = pick(rng, list(COUNTRIES), split)
    user = rng.choice(PLAIN[kind][split]).format(a=a, b=b, w=w, v=v, c=c, n=n)
    return user, *{
        "add": (f"I need to add {a} and {b}.", f"{a} + {b} = {a + b}."),
        "repeat": ("The user wants the words repeated.", f"{w} {v}"),
        "upper": (f"The word is {w}; in capitals it is {w.upper()}.", w.upper()),
        "capital": (f"The user asks about {c}.", f"The capital of {c} is {COUNTRIES[c]}."),
        "count": (f"I count from 1 to {n}.", ", ".join(str(i) for i in range(1, n + 1)) + "."),
    }[kind]


SYSTEMS = {TRAIN: [None, None, None, "You are a helpful assistant.", "You are a concise assistant."],
           HELDOUT: [None, "You are a friendly assistant that answers briefly."]}


# ---- samples ---------------------------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One exchange: the template's inputs and the reply; `expect` is what the evaluation checks (the function and
    arguments of the call, or the value a tool-result reply must repeat)."""

    kind: str  # plain | tool | result | decline
    messages: list[dict[str, Any]]
    reply: str
    thinking: bool
    tools: list[dict[str, Any]] | None = None
    expect: dict[str, Any] = field(default_factory=dict)

    def template_kwargs(self) -> dict[str, Any]:
        return {"enable_thinking": self.thinking}

    def schemas(self) -> dict[str, dict[str, Any]]:
        return {t["function"]["name"]: t["function"]["parameters"] for t in self.tools or []}


def _reply(thinking: bool, reasoning: str, answer: str) -> str:
    """What follows the generation prompt: with thinking on, the template has opened <think>."""
    return (f"{reasoning}\n</think>\n\n" if thinking else "") + answer + IM_END


def _with_system(rng: random.Random, split: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system = rng.choice(SYSTEMS[split])
    return ([{"role": "system", "content": system}] if system else []) + messages


def _offered(rng: random.Random, tool: Tool | None) -> list[Tool]:
    """1-3 tools in random order, `tool` among them."""
    others = [t for t in TOOLS if t is not tool]
    chosen = rng.sample(others, rng.randint(0 if tool else 1, 2)) + ([tool] if tool else [])
    rng.shuffle(chosen)
    return chosen


def call_xml(name: str, args: dict[str, Any]) -> str:
    """A Qwen3-Coder XML tool call, laid out as the chat template renders calls in the history."""
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def _tool_request(rng: random.Random, split: str) -> tuple[Tool, str, dict[str, Any]]:
    tool = rng.choice(TOOLS)
    phrasing = rng.choice(tool.requests[split])
    made = tool.make_args(rng, split)
    args = {k: made[k] for k in tool.params if "{" + k + "}" in phrasing}  # the arguments the request states
    return tool, phrasing.format(**made), args | {k: v for k, v in made.items() if k.startswith("_")}


def tool_sample(rng: random.Random, split: str, thinking: bool) -> Sample:
    tool, user, made = _tool_request(rng, split)
    args = {k: v for k, v in made.items() if not k.startswith("_")}
    stated = ", ".join(f"{k} {v}" for k, v in args.items())
    reply = _reply(thinking, f"This needs {tool.name} with {stated}.", call_xml(tool.name, args))
    return Sample("tool", _with_system(rng, split, [{"role": "user", "content": user}]), reply, thinking,
                  [t.schema() for t in _offered(rng, tool)], {"name": tool.name, "arguments": args})


def result_sample(rng: random.Random, split: str, thinking: bool) -> Sample:
    tool, user, made = _tool_request(rng, split)
    args = {k: v for k, v in made.items() if not k.startswith("_")}
    result, answer = tool.result(made, rng)
    call = {"type": "function", "function": {"name": tool.name, "arguments": args}}
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": json.dumps(result)}]
    reply = _reply(thinking, f"{tool.name} returned its result; I will report it.", answer)
    echoes = {str(v) for v in args.values()}  # a value the request already states proves nothing
    value = next(str(v) for v in result.values() if str(v) in answer and str(v) not in echoes)
    return Sample("result", _with_system(rng, split, messages), reply, thinking,
                  [t.schema() for t in _offered(rng, tool)], {"answer_contains": value})


def plain_sample(rng: random.Random, split: str, thinking: bool, functions, with_tools: bool = False) -> Sample:
    user, reasoning, answer = plain_request(rng, split, [] if with_tools else functions)
    tools = [t.schema() for t in _offered(rng, None)] if with_tools else None
    return Sample("decline" if with_tools else "plain", _with_system(rng, split, [{"role": "user", "content": user}]),
                  _reply(thinking, reasoning, answer), thinking, tools)


MIX = (("plain", 0.28), ("tool", 0.38), ("result", 0.14), ("decline", 0.2))  # training shares of the kinds


def make_sample(kind: str, rng: random.Random, split: str, functions, thinking: bool | None = None) -> Sample:
    thinking = rng.random() < 0.6 if thinking is None else thinking
    if kind == "tool":
        return tool_sample(rng, split, thinking)
    if kind == "result":
        return result_sample(rng, split, thinking)
    return plain_sample(rng, split, thinking, functions, with_tools=kind == "decline")


def make_samples(n: int, split: str, seed: int, functions) -> list[Sample]:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX)
    return [make_sample(rng.choices(kinds, weights)[0], rng, split, functions) for _ in range(n)]


HELDOUT_COUNTS = {"plain": 60, "tool": 60, "result": 30, "decline": 20}


def heldout_samples(functions, seed: int = 1234, counts: dict[str, int] = HELDOUT_COUNTS) -> list[Sample]:
    """The evaluation prompts: a fixed number of each kind, half thinking, half not, from the held-out split only
    (`functions` should come from the held-out stdlib files)."""
    rng = random.Random(seed)
    return [make_sample(kind, rng, HELDOUT, functions, thinking=i % 2 == 0)
            for kind, n in counts.items() for i in range(n)]


def _check_splits() -> None:
    """No held-out phrasing is also a training one: the evaluation's requests are new sentences."""
    for tool in TOOLS:
        assert not set(tool.requests[HELDOUT]) & set(tool.requests[TRAIN]), tool.name
    for kinds in PLAIN.values():
        assert not set(kinds[HELDOUT]) & set(kinds[TRAIN])
    assert not set(GREETINGS[HELDOUT]) & set(GREETINGS[TRAIN])


_check_splits()

"""Command line: deltaserve generate | chat | serve [MODEL], deltaserve quantize SRC OUT. Without MODEL, the small
model the package ships."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import re
import signal
import sys
from typing import Any

from deltaserve.config import add_engine_options
from deltaserve.config.options import option_names
from deltaserve.sampling_params import SamplingParams


def add_model_and_engine_options(p: argparse.ArgumentParser) -> None:
    """MODEL, every engine option (generated from config.EngineArgs) and --log-level."""
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face checkpoint directory (config.json + *.safetensors). "
                        "Default: the bundled demo model")
    add_engine_options(p)
    p.add_argument("--log-level", default="INFO", type=log_level,
                   help="logging level (DEBUG, INFO, WARNING, ...); INFO shows the memory plan (default)")


def log_level(text: str) -> str:
    """--log-level, any case, one of uvicorn's names (trace: DEBUG outside the server); an unknown name is an
    argparse error (it used to fall back to WARNING silently)."""
    from deltaserve.server.args import LOG_LEVELS  # no server dependency: args.py imports the config only

    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is unknown: use one of {', '.join(LOG_LEVELS)}")
    return text


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default 0)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min_p x the top probability, 0 = off (default 0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags as SamplingParams; a bad value's error starts with the flag the user typed."""
    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                              seed=args.seed, stop=list(args.stop))
    except ValueError as e:
        field = re.match(r"SamplingParams\.(\w+)=", str(e))
        if field is None:
            raise
        raise ValueError(f"--{field.group(1).replace('_', '-')}: {e}") from None


def build_llm(args: argparse.Namespace):
    from deltaserve.llm import LLM
    from deltaserve.parallel.launch import is_worker_process, run_worker_from_env

    options = {name: getattr(args, name) for name in option_names()}
    if is_worker_process(args.tensor_parallel_size):  # torchrun-style launch, rank other than 0: run rank 0's steps
        from deltaserve.config import EngineArgs
        from deltaserve.demo import demo_model_dir

        model = args.model or str(demo_model_dir())
        raise SystemExit(run_worker_from_env(EngineArgs(model=model, **options).create_engine_config()))
    return LLM(args.model, **options)


def thinking_switch_ignored(tokenizer) -> bool:
    """Whether the chat template renders the same prompt with enable_thinking true and false (it has no thinking
    switch, so --no-thinking cannot act). A template that cannot render a one-message probe is left for the real
    turn to report."""
    from deltaserve.engine.tokenizer import TokenizerError, render_chat

    probe = [{"role": "user", "content": "hi"}]
    try:
        on, off = (render_chat(tokenizer, probe, chat_template_kwargs={"enable_thinking": v}) for v in (True, False))
    except TokenizerError:
        return False
    return on == off


def warn_if_no_thinking_ignored(tokenizer, args: argparse.Namespace) -> None:
    """A warning, not a refusal: a template without the switch belongs to a model that may never think, and there
    the flag's intent holds anyway; where the model does think, the user learns why it still does."""
    if args.no_thinking and thinking_switch_ignored(tokenizer):
        print("deltaserve: warning: --no-thinking has no effect: this model's chat template ignores enable_thinking "
              "(the model may still think)", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.no_thinking and not args.chat_template:  # plain prompts go to the model as written: nothing to switch
        raise ValueError("--no-thinking works through the chat template: add --chat-template, or drop --no-thinking")
    params = sampling_from(args)  # a bad sampling option fails before the model loads
    llm = build_llm(args)
    if args.chat_template:
        from deltaserve.engine.tokenizer import require_chat_template

        warn_if_no_thinking_ignored(require_chat_template(llm.get_tokenizer()), args)
    prompts: list[Any] = args.prompt or ["def "]
    if args.chat_template:
        # special tokens shown, as in chat: a tokenizer that marks </think> special hides where the reasoning ends
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                        dataclasses.replace(params, skip_special_tokens=False),
                        chat_template_kwargs={"enable_thinking": not args.no_thinking}, use_tqdm=False)
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        if len(prompts) > 1:
            print(f"=== prompt: {prompt!r}")
        print(prompt + out.outputs[0].text if not args.chat_template else out.outputs[0].text)
    return 0


CHAT_COMMANDS = ("/reset clears the history, /exit or Ctrl-D quits; Ctrl-C drops the line typed at the prompt and "
                 "stops a reply")


def cmd_chat(args: argparse.Namespace) -> int:
    from deltaserve.engine.tokenizer import require_chat_template

    params = sampling_from(args)  # a bad sampling option fails before the model loads
    engine = build_llm(args).engine
    require_chat_template(engine.tokenizer)  # before the first prompt, not after the first message
    warn_if_no_thinking_ignored(engine.tokenizer, args)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    enable_line_editing()
    print(f"deltaserve chat: type a message; {CHAT_COMMANDS}.", file=sys.stderr)
    for turn in range(1 << 62):
        try:
            line = input("> ")
        except EOFError:  # Ctrl-D on an empty line, or the end of piped input: the session ends
            print()
            return 0
        except KeyboardInterrupt:  # as in Python's REPL: the typed line is dropped (the line editor and the
            print()                # terminal discard it), not the session and its history
            print("deltaserve chat: line dropped (Ctrl-C); Ctrl-D or /exit quits", file=sys.stderr)
            continue
        if not line.strip():
            continue  # an empty line is not a message
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if re.fullmatch(r"/\w+", line.strip()):  # a mistyped command is not a message (/help lands here too)
            print(f"deltaserve chat: {CHAT_COMMANDS}", file=sys.stderr)
            continue
        chat_turn(engine, f"chat-{turn}", history, line, params, args.no_thinking)
    return 0


def enable_line_editing() -> None:
    """At a terminal, input() edits lines (arrow keys, history) only once readline is imported; without it the arrow
    keys' escape codes became part of the message. Piped input is left alone; readline may be missing (Windows)."""
    if sys.stdin.isatty():
        try:
            importlib.import_module("readline")  # importing it is what hooks it into input()
        except ImportError:
            pass


def chat_turn(engine, request_id: str, history: list[dict[str, str]], line: str, params: SamplingParams,
              no_thinking: bool) -> None:
    """Answer one message, appending the message and the reply to `history`. The history keeps a reply's answer, not
    its reasoning (the text up to </think>), as the server's clients send it back and Qwen's templates render past
    turns. A reply stopped by Ctrl-C stays in the history as far as its answer was shown; one stopped before any
    answer drops the message too, as if it had not been sent. A refused turn is reported and dropped; the session
    goes on."""
    from deltaserve.engine.output_processor import RequestError
    from deltaserve.engine.tokenizer import render_chat

    history.append({"role": "user", "content": line})
    try:
        ids = render_chat(engine.tokenizer, history, chat_template_kwargs={"enable_thinking": not no_thinking})
        # special tokens shown: a tokenizer that marks </think> special would hide where the reasoning ends
        reply, finish = stream_reply(engine, request_id, ids, dataclasses.replace(params, skip_special_tokens=False))
    except RequestError as e:  # e.g. the history outgrew max_model_len: say so and keep the session
        history.pop()
        print(f"deltaserve chat: {e} (/reset clears the history)", file=sys.stderr)
        return
    if finish == "length":  # else a cut reply looks like the model's whole answer
        print(f"deltaserve chat: the reply reached --max-tokens {params.max_tokens} or the context's end "
              "(--max-model-len); raise them for longer replies", file=sys.stderr)
    answer = answer_of(reply, opens_think_block(engine.tokenizer, ids))
    if finish == "interrupted":
        kept = "the partial reply is kept in the history" if answer else "the message is dropped from the history"
        print(f"deltaserve chat: reply stopped (Ctrl-C); {kept}", file=sys.stderr)
        if not answer:
            history.pop()
            return
    history.append({"role": "assistant", "content": answer})


def opens_think_block(tokenizer, prompt_ids: list[int]) -> bool:
    """Whether the rendered prompt ends inside <think> (the reply starts with reasoning), as a thinking template's
    generation prompt does; --no-thinking's empty <think></think> block closes it."""
    tail = tokenizer.decode(prompt_ids[-16:], skip_special_tokens=False)
    return tail.rfind("<think>") > tail.rfind("</think>")


def answer_of(reply: str, thinking: bool) -> str:
    """The reply without its reasoning: the text after the last </think>; none yet while still reasoning."""
    if "</think>" in reply:
        return reply.rpartition("</think>")[2].strip()
    return "" if thinking else reply.strip()


class ReplyInterrupt:
    """While a reply streams, Ctrl-C sets `hit` and the reply stops at the next step boundary: a KeyboardInterrupt
    raised inside engine.step() could leave the scheduler or the cache half-updated. A second Ctrl-C raises
    KeyboardInterrupt as usual (a step that hangs can still be left). Outside the main thread, where no signal handler
    can be installed, Ctrl-C is left alone."""

    def __enter__(self) -> ReplyInterrupt:
        self.hit = False
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def stream_reply(engine, request_id: str, prompt_ids: list[int], params: SamplingParams) -> tuple[str, str | None]:
    """Run one request on the engine, printing its text as it arrives. Returns the text and why it ended (the
    finish reason, or "interrupted" when Ctrl-C stopped it); the request is aborted whenever it did not finish, so
    its pages and slot are free for the next turn."""
    engine.add_request(request_id, prompt_ids, params)
    text, finish = "", None
    with ReplyInterrupt() as stop:
        try:
            while engine.has_unfinished() and not stop.hit:
                for delta in engine.step():
                    if delta.request_id == request_id:
                        print(delta.text, end="", flush=True)
                        text += delta.text
                        finish = delta.finish_reason or finish
        finally:
            engine.abort_request(request_id)  # a no-op for a finished request
            print()
    return text, "interrupted" if stop.hit else finish


def cmd_serve(args: argparse.Namespace) -> int:
    from deltaserve.server.app import run_server

    return run_server(args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts and print it",
                         description="Generate text for prompts (default prompt: 'def ').")
    add_model_and_engine_options(gen)
    add_sampling_options(gen)
    gen.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    gen.add_argument("--chat-template", action="store_true", help="wrap each prompt as a user chat message")
    gen.add_argument("--no-thinking", action="store_true", help="with --chat-template: enable_thinking=false")
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive chat, streaming the replies",
                          description="Interactive chat with the model's chat template; replies stream as generated.")
    add_model_and_engine_options(chat)
    add_sampling_options(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--no-thinking", action="store_true", help="enable_thinking=false in the chat template")
    chat.set_defaults(func=cmd_chat)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                           description="Serve the model behind an OpenAI-compatible HTTP API.")
    add_model_and_engine_options(serve)
    add_serve_options(serve)
    serve.set_defaults(func=cmd_serve)
    quant = sub.add_parser("quantize", help="write a bf16 checkpoint as FP8 (Qwen block layout) or int4 (GPTQ v1)",
                           description="Quantize a bf16 checkpoint by round-to-nearest into a published layout.")
    add_quantize_options(quant)
    quant.set_defaults(func=cmd_quantize)
    return parser


def add_quantize_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="directory of the bf16 checkpoint")
    p.add_argument("out", help="directory to write the quantized checkpoint into")
    p.add_argument("--method", choices=("fp8", "int4"), required=True,
                   help="fp8: e4m3 with 128x128 block scales (Qwen's -FP8 layout); int4: GPTQ v1, MLP/experts only")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size (default 128)")
    p.add_argument("--desc-act", action="store_true", help="int4: act-order groups (g_idx a permutation)")
    p.add_argument("--log-level", default="info", type=log_level, help="logging level (default info)")


def cmd_quantize(args: argparse.Namespace) -> int:
    from deltaserve.quantize import quantize_checkpoint

    # (int4 options given with fp8 are refused there, as for the Python API)
    out = quantize_checkpoint(args.src, args.out, method=args.method, group_size=args.group_size,
                              desc_act=args.desc_act)
    print(f"wrote {out}")
    return 0


def add_serve_options(p: argparse.ArgumentParser) -> None:
    try:
        from deltaserve.server.app import add_server_options
    except ImportError as e:  # a dependency of the server is missing: `serve` says which before parsing its flags
        p.set_defaults(server_import_error=e)
        return
    add_server_options(p)


def server_import_error(parser: argparse.ArgumentParser, argv: list[str] | None) -> str | None:
    """Why `deltaserve serve` cannot run here (a module the server imports is missing), or None. Checked before the
    flags are parsed: without the server's options, its flags would only be reported as unrecognized."""
    args = sys.argv[1:] if argv is None else argv
    if "serve" not in args[:1]:
        return None
    error = parser.parse_known_args(["serve"])[0].__dict__.get("server_import_error")
    if error is None:
        return None
    name = (getattr(error, "name", None) or "").split(".")[0]
    if isinstance(error, ModuleNotFoundError) and name in sys.stdlib_module_names:  # _lzma, _sqlite3, _ssl, ...
        return (f"deltaserve serve: the server cannot start ({error}): {name} is part of Python's standard library, "
                f"left out when this Python was built (its system library was missing); use a Python built with it")
    importer, where = _importer(error) or ("", "")
    if importer and importer != name:  # a dependency of a dependency: installing the importer brings it
        # (no name: an ImportError the package raised itself, e.g. a version check)
        needed = f"{name} is needed by {importer}" if name else f"{importer} raised it"
        install = f"{needed}: pip install -U {_distribution(importer, where)}, or "
    else:
        install = f"pip install -U {name}, or " if name and name != "deltaserve" else ""
    return (f"deltaserve serve: the server cannot start, a module it imports is missing or too old ({error}); "
            f"{install}reinstall deltaserve with its dependencies (pip install -e . in a clone)")


def _importer(error: BaseException) -> tuple[str, str] | None:
    """(top-level package, file) of the code that raised the import error: the innermost frame of its traceback
    outside deltaserve and the standard library (the import machinery, pkgutil's resolve_name: no pip install brings
    what they were asked for), None if there is none (e.g. deltaserve's own module is missing)."""
    found, tb = None, error.__traceback__
    while tb is not None:
        top = str(tb.tb_frame.f_globals.get("__name__") or "").split(".")[0]
        if top and top != "deltaserve" and top not in sys.stdlib_module_names:
            found = top, tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return found


def _distribution(module: str, file: str = "") -> str:
    """The installed distribution that provides a top-level module (its own name if none is known); of several (a
    namespace package: google, opentelemetry), the one whose files hold `file`, else all of them."""
    import importlib.metadata

    names = list(dict.fromkeys(importlib.metadata.packages_distributions().get(module) or [module]))
    if len(names) > 1 and file:
        path = os.path.realpath(file)
        names = [n for n in names if any(os.path.realpath(importlib.metadata.distribution(n).locate_file(f)) == path
                                         for f in importlib.metadata.distribution(n).files or ())][:1] or names
    return " ".join(names)


def with_flag(error: Exception) -> str:
    """An engine option's error (it names the option as LLM(...) spells it: 'max_model_len' must be ...) led by the
    command line's flag for it (--max-model-len: ...)."""
    from deltaserve.config import ConfigError, EngineArgs

    # the loader's CheckpointError too (an option the checkpoint cannot honour: speculative_tokens); looked up, not
    # imported: importing it here could raise again (the kernels read the environment)
    loader = sys.modules.get("deltaserve.models.loader")
    kinds = (ConfigError, loader.CheckpointError) if loader else (ConfigError,)
    named = re.match(r"'?(\w+)'?[ =(]", str(error))
    fields = {f.name: f for f in dataclasses.fields(EngineArgs) if f.metadata}
    if not isinstance(error, kinds) or named is None or named.group(1) not in fields:
        return str(error)
    field = fields[named.group(1)]
    return f"{field.metadata['flag'] or '--' + field.name.replace('_', '-')}: {error}"


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports the server, hence the kernels, which read DELTASERVE_PDL / _KERNELS
    except ValueError as e:  # such a variable's bad value: one clear line, as for a bad flag
        print(f"deltaserve: error: {e}", file=sys.stderr)
        return 2
    missing = server_import_error(parser, argv)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    level = str(args.log_level).upper()
    logging.basicConfig(level=logging.DEBUG if level == "TRACE" else getattr(logging, level),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError) as e:  # user errors: one clear line, no traceback
        if level in ("DEBUG", "TRACE"):
            raise
        print(f"deltaserve: error: {with_flag(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The chat-template renderer process (`python -m deltaserve.server.template_worker MEMORY_BYTES MAX_CHARS`).

A chat template is a program: Jinja in a sandbox still allocates without limit ("x" * 10**9) and loops for as long as
it likes. Rendering here, in a process of its own with an address-space limit, bounds its memory; the server bounds
its time by killing the process (templates.py). It imports transformers' chat-template module only, not torch, so it
starts in well under a second, and renders with transformers' own function, so the text is exactly what
`tokenizer.apply_chat_template` would produce.

Protocol on stdin/stdout: each message is a 4-byte big-endian length and that many bytes of JSON. A job is
{"template", "messages", "tools", "add_generation_prompt", "kwargs"}; a reply is {"ok": text} or {"error": kind,
"message": text}, kind one of "template" (the template's own error, or an exception its code raised: its message is
meant for the user), "size", "memory", "internal".
"""

from __future__ import annotations

import json
import os
import resource
import struct
import sys
from typing import IO, Any

_HEADER = struct.Struct(">I")


def read_message(stream: IO[bytes]) -> Any:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return json.loads(data)


def write_message(stream: IO[bytes], obj: Any) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _limit_memory(extra_bytes: int) -> None:
    """Cap the address space at what the imports took plus `extra_bytes` for the template's own data."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = current + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _render(job: dict[str, Any], max_chars: int) -> dict[str, Any]:
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(conversations=[job["messages"]], tools=job.get("tools"),
                                            chat_template=job["template"],
                                            add_generation_prompt=job.get("add_generation_prompt", True),
                                            **job.get("kwargs", {}))
    except MemoryError:
        return {"error": "memory", "message": "the chat template used more memory than allowed"}
    except jinja2.TemplateError as e:  # syntax errors and the template's raise_exception(...): meant for users
        return {"error": "template", "message": str(e)}
    except Exception as e:  # noqa: BLE001
        # Raised by the template's own code (a TypeError on a message shape it did not expect): the client must
        # learn why its messages failed. Anything else is the server's: logged, not shown.
        kind = "template" if _raised_in_template(e) else "internal"
        return {"error": kind, "message": f"{type(e).__name__}: {e}"}
    text = rendered[0]
    if len(text) > max_chars:
        return {"error": "size", "message": f"the rendered prompt is {len(text)} characters; at most {max_chars}"}
    return {"ok": text}


def _raised_in_template(e: BaseException) -> bool:
    """Whether the traceback passes through template code (jinja2 names those frames "<template>")."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            return True
        tb = tb.tb_next
    return False


def _die_with_parent() -> None:
    """Linux: a worker stuck in a template loop must not outlive a server that died without killing it."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    memory_bytes, max_chars = int(argv[0]), int(argv[1])
    _die_with_parent()
    import jinja2  # noqa: F401 - imported before the memory cap, with what the renderer needs
    import transformers.utils.chat_template_utils  # noqa: F401

    _limit_memory(memory_bytes)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the reply stream
    write_message(stdout, {"ready": True})
    while True:
        try:
            job = read_message(stdin)
        except EOFError:
            return 0
        try:
            reply = _render(job, max_chars)
        except MemoryError:
            reply = {"error": "memory", "message": "the chat template used more memory than allowed"}
        write_message(stdout, reply)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

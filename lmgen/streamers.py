"""transformers' streamer protocol (``put(token_ids)``, ``end()``) for ``generate(streamer=...)``.

generate first puts the prompt, then each new token; these streamers turn that
into text with lmgen's incremental detokenizer (never a broken UTF-8 character).
"""

from __future__ import annotations

import asyncio
import queue
from typing import Any

import torch

from lmgen.loader.tokenizer import IncrementalDetokenizer


class TextStreamer:
    """Prints text to stdout as it is generated."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, skip_special_tokens: bool = False,
                 **_: Any) -> None:
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # lmgen.AutoTokenizer or Tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.detokenizer: IncrementalDetokenizer | None = None

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self.detokenizer is None:  # the first put is the prompt
            self.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, self.skip_special_tokens)
            if not self.skip_prompt:
                self.on_finalized_text(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))
            return
        text = self.detokenizer.add_tokens(ids)
        if text:
            self.on_finalized_text(text)

    def end(self) -> None:
        tail = self.detokenizer.flush() if self.detokenizer else ""
        self.detokenizer = None
        self.on_finalized_text(tail, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """Iterate over text chunks from another thread: run generate in a Thread, read here."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt, **kwargs)
        self.text_queue: queue.Queue[str | None] = queue.Queue()
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(None, timeout=self.timeout)

    def __iter__(self) -> "TextIteratorStreamer":
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)  # raises queue.Empty after `timeout`
        if value is None:
            raise StopIteration
        return value


class AsyncTextIteratorStreamer(TextStreamer):
    """``async for`` over text chunks while generate runs in a thread (created inside a running loop)."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt, **kwargs)
        self.text_queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.loop.call_soon_threadsafe(self.text_queue.put_nowait, text)
        if stream_end:
            self.loop.call_soon_threadsafe(self.text_queue.put_nowait, None)

    def __aiter__(self) -> "AsyncTextIteratorStreamer":
        return self

    async def __anext__(self) -> str:
        value = await asyncio.wait_for(self.text_queue.get(), self.timeout)
        if value is None:
            raise StopAsyncIteration
        return value

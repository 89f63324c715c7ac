"""How a prompt is laid out for the model that reads it: prepare builds its prompts with this, and
summarize.py builds new dialogues' prompts the same way.

Three things only a real checkpoint's tokenizer shows, each decided here once:

- **Chat template: for chat-tuned models only.** `prepare.chat_template: auto` wraps the prompt in
  the tokenizer's chat template when the model is chat-tuned, by this rule: the template ends an
  assistant turn with a special token (its end-of-turn token, found by rendering a short
  exchange) that is among the model's generation EOS ids (generation_config.json, else
  config.json). A chat-tuned checkpoint stops on the token its template ends a turn with (Qwen2.5
  Instruct lists <|im_end|>, Llama 3.1 Instruct <|eot_id|>); a base model that ships a template
  too does not (Qwen2.5 base stops on <|endoftext|> only, so its ChatML turns would run to
  max_new_tokens). `always` wraps whenever there is a template, `none` never. When a prompt is
  wrapped, generation also stops on the end-of-turn token (stop_ids).
- **A pinned date.** Templates that print today's date (Llama 3.1/3.2 Instruct) render with
  `prepare.chat_date` instead, so a rerun on another day builds the same prompts.
- **The word boundary.** The template ends in "Summary: ". A byte-level BPE tokenizer (GPT-2,
  Llama 3, Qwen) writes the space before a word as part of that word ("Ġthe"), so a prompt that
  ends in the space ends in a lone space token, which natural text never has. When the template's
  trailing whitespace would merge with the next word (tested on the tokenizer), it leaves the
  prompt and becomes part of the summary: a decoder-only model then reads "Summary:" + " Bob ...",
  tokenized in context, and generates the space with the first word. A tokenizer that keeps the
  whitespace apart (T5's SentencePiece drops it, ChatML's "\\n" is its own token) keeps the
  template as written.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from stages.errors import StageError
from stages.family import tokenizer_additions
from stages.params import PrepareParams

FORMAT_FILE = "input_format.json"  # in data/prepared: the format prepare used (PromptFormat.record)
PROBE_WORDS = ("The", "A", "Tom")  # a boundary is natural when none of these merges with the gap


@dataclass(frozen=True)
class PromptFormat:
    """The prompt template as the model reads it and what was decided about it."""

    template: str  # {dialogue} inside; chat-wrapped when `format` is chat_template
    format: str  # chat_template or prompt_template
    gap: str  # trailing whitespace moved from the template onto each summary ("" if none)
    end_of_turn: str  # the chat template's end-of-turn token ("" when there is none)
    end_of_turn_id: int | None
    chat_date: str

    def record(self) -> dict[str, str | int | None]:
        """What metrics/prepare.json and data/prepared/input_format.json say about it."""
        return {
            "prompt_format": self.format,
            "prompt_gap": self.gap,
            "chat_end_of_turn": self.end_of_turn,
            "chat_end_of_turn_id": self.end_of_turn_id,
            "chat_date": self.chat_date,
        }


def special_texts(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Every special token's text and id (the named ones and the added <|im_end|>-style ones); none
    for a tokenizer backend that keeps no added-token table (mistral-common's raises)."""
    try:
        added = tokenizer.added_tokens_decoder
    except (AttributeError, NotImplementedError):
        return {}
    return {token.content: token_id for token_id, token in added.items() if getattr(token, "special", False)}


def end_of_turn(tokenizer: PreTrainedTokenizerBase, chat_date: str) -> tuple[str, int | None]:
    """The special token the chat template writes right after an assistant message, and its id;
    ("", None) when the template ends turns with plain text or has no assistant turn."""
    reply = "Reply3141"
    try:
        text = render(
            tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}], chat_date
        )
    except Exception:  # a template that refuses this exchange (jinja raises its own error types)
        return "", None
    after = text[text.rfind(reply) + len(reply) :] if reply in text else ""
    found = [(after.find(s), s, i) for s, i in special_texts(tokenizer).items() if s and s in after]
    if not found:
        return "", None
    _, token, token_id = min(found)
    return token, token_id


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], chat_date: str, generation: bool = False) -> str:
    # date_string is the variable Llama 3.x's templates print ("Today Date: ..."), defaulting to
    # today's date where the renderer offers strftime_now; other templates ignore it
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation, date_string=chat_date
    )


def chat_wrapped(params: PrepareParams, tokenizer: PreTrainedTokenizerBase, eos_ids: set[int]) -> PromptFormat:
    """The prompt template, wrapped in the chat template (as one user turn, then the assistant's
    cue) when the rule above says so. The wrapped template still holds {dialogue}, so truncation
    still cuts the dialogue only. A BOS the chat template writes as text is dropped when the
    tokenizer adds BOS itself (stages/family.py encode_prompt does), so a prompt never starts
    with two."""
    as_written = PromptFormat(params.prompt_template, "prompt_template", "", "", None, params.chat_date)
    if params.chat_template == "none" or not getattr(tokenizer, "chat_template", None):
        return as_written
    token, token_id = end_of_turn(tokenizer, params.chat_date)
    if params.chat_template == "auto" and token_id not in eos_ids:
        return dataclasses.replace(as_written, end_of_turn=token, end_of_turn_id=token_id)
    text = render(tokenizer, [{"role": "user", "content": params.prompt_template}], params.chat_date, generation=True)
    prefix, _ = tokenizer_additions(tokenizer)
    bos = tokenizer.bos_token
    if prefix and bos and text.startswith(bos):
        text = text[len(bos) :]
    if "{dialogue}" not in text:
        raise StageError("prepare.chat_template: the tokenizer's chat template dropped {dialogue}; set it to none")
    return PromptFormat(text, "chat_template", "", token, token_id, params.chat_date)


def text_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens: the family adds its own (stages/family.py)."""
    # verbose=False: the over-length warning is expected here, prepare counts those rows itself
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def cue(template: str) -> str:
    """The template's text after the dialogue ("\\n\\nSummary: "): what precedes the summary."""
    tail = template.rsplit("{dialogue}", 1)[-1]
    return tail if tail.strip() else "." + tail  # a template ending at the dialogue: any text will do


def trailing_gap(template: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The template's trailing whitespace when the tokenizer would merge it into the next word
    (byte-level BPE: ": " + "The" is ":", "ĠThe", not ":", "Ġ", "The"), else ""."""
    gap = template[len(template.rstrip()) :]
    if not gap:
        return ""
    before = text_ids(tokenizer, [cue(template)])[0]
    merged = text_ids(tokenizer, [cue(template) + word for word in PROBE_WORDS])
    return gap if any(ids[: len(before)] != before for ids in merged) else ""


def with_boundary(prompt_format: PromptFormat, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    """The format with the template's trailing whitespace moved onto the summary, where it merges."""
    gap = trailing_gap(prompt_format.template, tokenizer)
    if not gap:
        return prompt_format
    return dataclasses.replace(prompt_format, template=prompt_format.template[: -len(gap)], gap=gap)


def resolve(params: PrepareParams, tokenizer: PreTrainedTokenizerBase, eos_ids: set[int]) -> PromptFormat:
    """The prompt format prepare uses (and summarize.py rebuilds): chat rule, pinned date, boundary."""
    return with_boundary(chat_wrapped(params, tokenizer, eos_ids), tokenizer)


def summary_ids(
    template: str, gap: str, tokenizer: PreTrainedTokenizerBase, summaries: list[str], continues_prompt: bool
) -> list[list[int]]:
    """Each summary's text ids. A summary that continues its prompt in one sequence (a decoder-only
    model) and takes the prompt's moved whitespace `gap` is tokenized in context, after the
    template's cue, so its first token is the one natural text has there (" Bob" as "ĠBob"); a
    summary the model reads as its own sequence (seq2seq labels) is tokenized on its own."""
    if not continues_prompt or not gap:
        return text_ids(tokenizer, summaries)
    context = cue(template)
    before = text_ids(tokenizer, [context])[0]
    in_context = text_ids(tokenizer, [context + gap + s for s in summaries])
    alone = text_ids(tokenizer, [gap + s for s in summaries])
    return [ids[len(before) :] if ids[: len(before)] == before else own for ids, own in zip(in_context, alone)]


def stop_ids(record: dict) -> list[int]:
    """The ids generation stops on besides the model's EOS: a wrapped prompt's end-of-turn token."""
    token_id = record.get("chat_end_of_turn_id")
    return [token_id] if record.get("prompt_format") == "chat_template" and token_id is not None else []


def read_stop_ids(prepared_dir: Path) -> list[int]:
    """stop_ids of the format prepare recorded in `prepared_dir` (the pipeline always writes one;
    a prepared folder without it was made before formats were recorded: the template as written)."""
    path = prepared_dir / FORMAT_FILE
    return stop_ids(json.loads(path.read_text())) if path.is_file() else []

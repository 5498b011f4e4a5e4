"""How a labelled text becomes a training record: the prompt of its label, the text, EOS (stage 01's step 4).

One `PromptFormat` builds every training record (stage 01), every canary (stage 06) and every
generation prompt (stage 03), so a record of a label always starts with exactly the token ids the
model is prompted with when sampling that label. A record is

    prompt_ids(label) + text_ids[:room] + [EOS],   room = max_length - len(prompt_ids(label)) - 1,

so it never exceeds `max_length` and always ends with EOS, which teaches the model to stop. In DP
fine-tuning the unit of privacy is one record, which is why every record is cut to the same token
budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from dpnb.config import PrepareConfig, build
from dpnb.data.sources import clean_texts
from dpnb.errors import require

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class PromptFormat:
    """How a label becomes the prompt that starts a record, and how the review follows it.

    style "plain": the paper's `label + delimiter + review`, e.g. "positive | A great film...".
    style "chat": the tokenizer's chat template with one user message, `chat_instruction` with
    {label} filled in, followed by the review as the assistant's answer. Instruct models need it:
    SmolLM2 continues a raw "positive | " with maths or code.

    Prompt and review are tokenised separately and concatenated, so every record of a label starts
    with exactly `prompt_ids(label)`, the ids the generate stage feeds the model. (For the plain
    style the delimiter's trailing space becomes its own token; training and generation agree.)
    """

    style: str = "plain"
    delimiter: str = " | "
    chat_instruction: str = "Write a {label} movie review."

    def __post_init__(self) -> None:
        require(self.style in ("plain", "chat"), f"prompt style {self.style!r} is not 'plain' or 'chat'")

    @classmethod
    def from_config(cls, cfg: PrepareConfig) -> PromptFormat:
        return cls(style=cfg.prompt_format, delimiter=cfg.delimiter, chat_instruction=cfg.chat_instruction)

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PromptFormat:
        return build(cls, values, "PromptFormat")

    def prompt_text(self, label_name: str, tokenizer: PreTrainedTokenizerBase) -> str:
        """The text that starts every record of `label_name` (for the chat style, with its special tokens)."""
        if self.style == "plain":
            return label_name + self.delimiter
        require(
            getattr(tokenizer, "chat_template", None) is not None,
            f"the tokenizer of {tokenizer.name_or_path} has no chat template; use prompt_format: plain",
        )
        message = {"role": "user", "content": self.chat_instruction.replace("{label}", label_name)}
        return tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, label_name: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The token ids that start every record of `label_name`, and that generation is prompted with.

        The chat template's text already holds its special tokens; the plain prompt keeps the BOS
        the tokenizer adds in front of a text, if it adds one (Llama-2 does, GPT-2 and SmolLM2 do not).
        """
        text = self.prompt_text(label_name, tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids if self.style == "chat" else _leading_special_ids(tokenizer) + ids

    def encode(
        self, label_name: str, text: str, tokenizer: PreTrainedTokenizerBase, max_length: int
    ) -> tuple[list[int], bool]:
        """One record's ids (prompt + review + EOS, at most `max_length`) and whether the review was cut."""
        ids, truncated = self.encode_batch([label_name], [text], tokenizer, max_length)
        return ids[0], truncated[0]

    def encode_batch(
        self,
        label_names: Sequence[str],
        texts: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
    ) -> tuple[list[list[int]], list[bool]]:
        """`encode` for many records with one batched tokenizer call.

        A record is prompt_ids + review[:room] + [EOS] with room = max_length - len(prompt_ids) - 1,
        so it never exceeds max_length and always ends with EOS, which teaches the model to stop.
        Review text is data: a literal "<|im_end|>" in a review is split into ordinary tokens.
        """
        eos = tokenizer.eos_token_id
        require(
            eos is not None, f"the tokenizer of {tokenizer.name_or_path} has no EOS token; use another model"
        )
        prompts = {name: self.prompt_ids(name, tokenizer) for name in dict.fromkeys(label_names)}
        for name, prompt in prompts.items():
            require(
                max_length - len(prompt) - 1 >= 1,
                f"max_length = {max_length} leaves no room for the review after the {len(prompt)}-token "
                f"prompt of '{name}'; raise prepare.max_length",
            )
        if not texts:
            return [], []
        reviews = tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids, truncated = [], []
        for name, review in zip(label_names, reviews, strict=True):
            prompt = prompts[name]
            room = max_length - len(prompt) - 1
            ids.append(prompt + review[:room] + [eos])
            truncated.append(len(review) > room)
        return ids, truncated


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special ids a tokenizer puts before a text when asked to add special tokens (e.g. [BOS])."""
    with_special = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start : start + len(bare)] == bare:
            return with_special[:start]
    return []


def encode_records(
    sample: pd.DataFrame, fmt: PromptFormat, tokenizer: PreTrainedTokenizerBase, cfg: PrepareConfig
) -> dict[str, list]:
    """The columns of one split's records (the data/train and data/test contract), texts cleaned."""
    label_names = [cfg.label_names[i] for i in sample["label"]]
    texts = clean_texts(sample["text"], cfg.strip_html).tolist()
    ids, truncated = fmt.encode_batch(label_names, texts, tokenizer, cfg.max_length)
    prompt_length = {name: len(fmt.prompt_ids(name, tokenizer)) for name in cfg.label_names}
    return {
        "text": texts,
        "label": [int(label) for label in sample["label"]],
        "label_name": label_names,
        "input_ids": ids,
        "prompt_length": [prompt_length[name] for name in label_names],
        "n_tokens": [len(record) for record in ids],
        "truncated": truncated,
    }


def format_example(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> str:
    """One record decoded in two parts, so it is visible where the prompt ends and the review starts."""
    ids, cut = record["input_ids"], record["prompt_length"]
    review = tokenizer.decode(ids[cut:])
    return (
        f"label {record['label']} ({record['label_name']}), {len(ids)} tokens, "
        f"truncated: {record['truncated']}\n"
        f"--- prompt: {cut} tokens, shown as a Python string so spaces and newlines are visible ---\n"
        f"{tokenizer.decode(ids[:cut])!r}\n"
        f"--- review: {len(ids) - cut} tokens, EOS last ---\n"
        f"{review}"
    )

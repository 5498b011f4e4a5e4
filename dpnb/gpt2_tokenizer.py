"""GPT-2's real tokenizer, built offline from the BPE ranks that ship with `openai-whisper` on PyPI.

The paper fine-tunes the GPT-2 family, whose tokenizer differs from SmolLM2's in ways the pipeline
must handle: 50,257 tokens, 1,024 positions, no pad token, no BOS, and one special token,
`<|endoftext|>` (id 50256), that is EOS, BOS and UNK at once. No GPT-2 files are on the machines
these tests run on, and the Hub may be out of reach, but GPT-2's byte-level BPE ranks are also
published, as `whisper/assets/gpt2.tiktoken`, inside the `openai-whisper` source distribution on
PyPI. `fetch_gpt2_tokenizer` downloads that sdist by name once (`pip download`), checks the ranks'
sha256, and saves a Hugging Face tokenizer built from them into `tokenizer_dir()` (the git-ignored
`.cache/gpt2-tokenizer/` of the repository, or $DPNB_GPT2_TOKENIZER). `make setup` runs it:

    python -m dpnb.gpt2_tokenizer

The tokenizer is transformers' `GPT2Tokenizer` (byte-level BPE with GPT-2's pre-tokenizer regex)
over the vocabulary and merges read from the ranks: a token's id is its rank, and the merges are
recovered from the ranks (each token of two or more bytes is the merge of two shorter ranked
tokens, applied in rank order), which is how tiktoken's own BPE behaves. Tests compare it with
tiktoken on the same ranks. Only tests and the `tiny-gpt2-bpe` preset use it; real GPT-2 runs load
the tokenizer the Hub ships with the weights.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from dpnb.errors import DpnbError, require
from dpnb.io import atomic_directory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WHISPER_SDIST = "openai-whisper==20250625"  # any release carries the same ranks; pinned for a stable fetch
RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"  # inside the sdist, under its top directory
RANKS_FILE = "gpt2.tiktoken"
# sha256 of GPT-2's 50,256 BPE ranks (tiktoken publishes the same hash for its "r50k_base"/"gpt2" file)
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
VOCAB_SIZE = 50257
N_POSITIONS = 1024
# GPT-2's pre-tokenizer: contractions, then runs of letters, digits or other symbols each with at most
# one leading space, then whitespace (tiktoken's "gpt2" pattern; `GPT2Tokenizer`'s ByteLevel default)
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SETUP_COMMAND = "make setup (or `.venv/bin/python -m dpnb.gpt2_tokenizer`)"


def tokenizer_dir() -> Path:
    """Where the built tokenizer is kept: $DPNB_GPT2_TOKENIZER, else the repository's .cache/gpt2-tokenizer."""
    override = os.environ.get("DPNB_GPT2_TOKENIZER")
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / ".cache" / "gpt2-tokenizer"


def is_available(directory: Path | None = None) -> bool:
    """Whether the tokenizer has been built (by `fetch_gpt2_tokenizer`)."""
    directory = directory or tokenizer_dir()
    return (directory / "tokenizer.json").exists() and (directory / "tokenizer_config.json").exists()


def built_dir(directory: Path | None = None) -> Path:
    """The directory holding the built tokenizer, or a clear error saying how to build it."""
    directory = directory or tokenizer_dir()
    require(is_available(directory),
            f"GPT-2's tokenizer is not in {directory}: run {SETUP_COMMAND}, which fetches the openai-whisper "
            f"sdist from PyPI once and builds it from its {RANKS_FILE}")
    return directory


def load_gpt2_tokenizer(directory: Path | None = None) -> PreTrainedTokenizerBase:
    """The GPT-2 tokenizer that `fetch_gpt2_tokenizer` saved, exactly as saved (no pad token)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built_dir(directory))


def read_ranks(path: Path) -> dict[bytes, int]:
    """GPT-2's BPE ranks from a .tiktoken file (one `base64(token) rank` a line), checked by its sha256."""
    import base64

    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    require(digest == RANKS_SHA256,
            f"{path} is not GPT-2's BPE ranks (sha256 {digest[:12]}..., expected {RANKS_SHA256[:12]}...); "
            f"delete it and run {SETUP_COMMAND}")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_gpt2_tokenizer(ranks_path: Path) -> PreTrainedTokenizerBase:
    """GPT-2's tokenizer from its BPE ranks: `<|endoftext|>` (50256) is EOS, BOS and UNK; no pad; 1,024 positions."""
    from transformers import GPT2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    read_ranks(ranks_path)  # the sha256 check, before the slower conversion
    converter = TikTokenConverter(vocab_file=str(ranks_path), pattern=PATTERN)
    vocab, merges = converter.extract_vocab_merges_from_model(str(ranks_path))
    require(len(vocab) == END_OF_TEXT_ID, f"{ranks_path} holds {len(vocab)} ranks, not GPT-2's {END_OF_TEXT_ID}")
    vocab[END_OF_TEXT] = END_OF_TEXT_ID
    tokenizer = GPT2Tokenizer(
        vocab=vocab, merges=merges, unk_token=END_OF_TEXT, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
        pad_token=None, add_prefix_space=False, model_max_length=N_POSITIONS,
    )
    require(len(tokenizer) == VOCAB_SIZE and tokenizer.eos_token_id == END_OF_TEXT_ID,
            f"the tokenizer built from {ranks_path} has {len(tokenizer)} tokens and EOS id {tokenizer.eos_token_id}, "
            f"not GPT-2's {VOCAB_SIZE} and {END_OF_TEXT_ID}")
    return tokenizer


def _download_sdist(into: Path) -> Path:
    """`pip download` the openai-whisper sdist (no dependencies, nothing built or installed) into `into`."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               WHISPER_SDIST, "-d", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(into.glob("openai_whisper-*.tar.gz")) + sorted(into.glob("openai-whisper-*.tar.gz"))
    if result.returncode != 0 or not archives:
        reason = (result.stderr or result.stdout).strip().splitlines()
        raise DpnbError(
            f"could not download the {WHISPER_SDIST} sdist from PyPI ({reason[-1] if reason else 'no archive'}); "
            f"GPT-2's tokenizer is built from the {RANKS_FILE} inside it. With PyPI reachable, run {SETUP_COMMAND}; "
            f"or put that file in {tokenizer_dir()} and run `python -m dpnb.gpt2_tokenizer --ranks FILE`"
        )
    return archives[0]


def _extract_ranks(archive: Path, target: Path) -> Path:
    """Copy whisper/assets/gpt2.tiktoken out of the sdist (read in place; nothing else is unpacked)."""
    with tarfile.open(archive, "r:gz") as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/" + RANKS_MEMBER)), None)
        require(member is not None and member.isfile(),
                f"{archive.name} holds no {RANKS_MEMBER}; pin another openai-whisper release in {__name__}")
        handle = tar.extractfile(member)
        assert handle is not None  # a regular file, checked above
        target.write_bytes(handle.read())
    return target


def fetch_gpt2_tokenizer(directory: Path | None = None, ranks: Path | None = None, force: bool = False) -> Path:
    """Build GPT-2's tokenizer into `directory` once, from `ranks` or the openai-whisper sdist; return it.

    Nothing happens when it is already there (unless `force`). The directory is written whole or not
    at all: the ranks file, the tokenizer files of `save_pretrained`.
    """
    directory = directory or tokenizer_dir()
    if is_available(directory) and not force:
        return directory
    with tempfile.TemporaryDirectory() as scratch:
        if ranks is None:
            print(f"fetching {WHISPER_SDIST} (sdist) from PyPI for GPT-2's {RANKS_FILE}", flush=True)
            ranks = _extract_ranks(_download_sdist(Path(scratch)), Path(scratch) / RANKS_FILE)
        tokenizer = build_gpt2_tokenizer(ranks)
        with atomic_directory(directory) as staging:
            (staging / RANKS_FILE).write_bytes(ranks.read_bytes())
            tokenizer.save_pretrained(staging)
    print(f"GPT-2 tokenizer ({VOCAB_SIZE:,} tokens) saved in {directory}", flush=True)
    return directory


def main(argv: list[str] | None = None) -> int:
    """`python -m dpnb.gpt2_tokenizer [--ranks FILE] [--force]`: build the tokenizer once (make setup)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=Path, help=f"a local {RANKS_FILE} instead of the PyPI download")
    parser.add_argument("--force", action="store_true", help="rebuild even when it is already there")
    args = parser.parse_args(argv)
    try:
        fetch_gpt2_tokenizer(ranks=args.ranks, force=args.force)
    except DpnbError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The bundled pair's tokenizer: byte-level BPE trained with the `tokenizers` library.

Special tokens follow Llama's numbering: `<pad>` = 0, `<s>` (BOS) = 1, `</s>` (EOS) = 2. The
tokenizer prepends BOS when `add_special_tokens` is on (transformers' default), like
Llama's. It is saved as `tokenizer.json` + `tokenizer_config.json`, which
`transformers.AutoTokenizer.from_pretrained` loads as a `PreTrainedTokenizerFast`.

    python -m specattn_jax.tokenizer_training --out-dir runs/tokenizer
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from specattn_jax.data import default_data_dir, load_split_texts

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
DEFAULT_VOCAB_SIZE = 8192


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [PAD_ID, BOS_ID, EOS_ID]:
        raise RuntimeError(f"special tokens got ids {ids}, expected {[PAD_ID, BOS_ID, EOS_ID]}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return tokenizer


def save_tokenizer(tokenizer, directory: str | Path, model_max_length: int = 2048) -> Path:
    """Writes `tokenizer.json` and `tokenizer_config.json` (a `PreTrainedTokenizerFast`)."""
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(directory))
    # The generic class name loads with transformers 4 and 5 alike (5 writes its own alias).
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def train_tokenizer(
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> Path:
    """Trains the BPE on the train split's books and saves it to `out_dir`."""
    texts = load_split_texts("train", data_dir, verify=True)
    return save_tokenizer(train_bpe(texts, vocab_size), out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)
    path = train_tokenizer(args.out_dir, args.data_dir, args.vocab_size)
    print(f"saved a byte-level BPE tokenizer of {args.vocab_size} tokens to {path}")


if __name__ == "__main__":
    main()

"""Trains a small SentencePiece BPE model shaped like LLaMA's and records the ids transformers gives.

Writes tests/fixtures/spm/: `tokenizer.model` (byte_fallback, identity normalization, no extra
whitespace removal, digits split: LLaMA's trainer settings), the Hugging Face files the published
`LanguageBind/Video-LLaVA-7B-hf` ships beside it (`tokenizer_config.json`, `special_tokens_map.json`,
`added_tokens.json` with `<image>`, `<video>`, `<pad>` after the vocabulary) and `goldens.json`: for
each variant (config overrides), the ids of every corpus text with and without special tokens, from
`LlamaTokenizerFast.from_pretrained` (converted from the .model, no tokenizer.json) and, for the
original layout (`tokenizer.model` alone), from the slow SentencePiece `LlamaTokenizer`.

Run with `make tokenizer-goldens` (needs `sentencepiece protobuf transformers tokenizers`).
"""

import io
import json
import os
import shutil
import sys
import tempfile

import sentencepiece as spm
import tokenizers
import transformers
from transformers import LlamaTokenizer, LlamaTokenizerFast

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "spm")

TRAIN = """USER: What happens in this video? ASSISTANT: A person walks across the room and sits down.
The video shows a red ball rolling on a wooden floor while a cat watches it closely.
Describe the video in detail. The camera pans slowly from left to right over a green field.
What is the man doing? He is cooking dinner in the kitchen and talking to his friend.
How many people are there? There are three people standing near the blue car, 2 dogs and 13 birds.
A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
Is it day or night? It is a sunny day and the sky is clear with a few white clouds.
Café au lait, crème brûlée, naïve résumé. Ünïcödé àccents are fine.
日本語の動画です。これは猫の動画です。動画の中で猫が歩いています。
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14. Punctuation: ! ? . , ; : ( ) [ ] { } < > / - _ + = * & % $ # @
    indented code line with four spaces
\ttabbed line\tand more tabs
""".splitlines()

CORPUS = [
    "Hello world",
    "hello World!",
    " leading space",
    "  two leading spaces",
    "trailing spaces  ",
    "runs   of    spaces     here",
    "tabs\tand\t\ttabs",
    "new\nline\n\nparagraph\n",
    "\nWhat is in the video? ASSISTANT:",
    "\n",
    " ",
    "",
    "USER: <image>\nWhat happens in this video? ASSISTANT:",
    "USER: <video><video><video>\nDescribe it. ASSISTANT:",
    "x<image>y",
    "<image> <image>",
    " <video> after space",
    "Café crème brûlée, naïve résumé",
    "日本語の動画です。",
    "中文测试：视频里有什么？",
    "emoji 🎬🎥✨😀👍🏽",
    "digits 0123456789 2024 3.14159 1,000,000",
    "byte fallback: ẞ Ω ∑ ☃ 𝔘 ﷺ",
    "▁ a literal lower one eighth block ▁▁",
    "</s>USER: and then? ASSISTANT:",
    "<s> a bos in text",
    "<unk> and <pad> in text",
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    "USER: <video>\nWhat is the man doing? ASSISTANT: He is cooking.</s>",
]

ADDED = {"<image>": None, "<video>": None, "<pad>": None}

# Variants of the Hugging Face layout: overrides of tokenizer_config.json.
HF_VARIANTS = {
    "hf_legacy": {"legacy": True},
    "hf_nonlegacy": {"legacy": False},
    "hf_nonlegacy_no_prefix_space": {"legacy": False, "add_prefix_space": False},
    "hf_legacy_no_prefix_space": {"legacy": True, "add_prefix_space": False},
    "hf_eos_no_bos": {"legacy": True, "add_bos_token": False, "add_eos_token": True},
    "hf_added_tokens_decoder": {"legacy": False, "added_tokens_decoder": "from_added_tokens"},
}


def train(dir_):
    sp_input = io.StringIO("\n".join(TRAIN) + "\n")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sp_input.getvalue().splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=560,
        hard_vocab_limit=False,
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path = os.path.join(dir_, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def encode(tok, text):
    return {
        "text": text,
        "ids": tok(text)["input_ids"],
        "ids_plain": tok(text, add_special_tokens=False)["input_ids"],
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    model_path = train(OUT)
    size = spm.SentencePieceProcessor(model_file=model_path).get_piece_size()
    added = {tok: size + i for i, tok in enumerate(ADDED)}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "sp_model_kwargs": {},
    }
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    files = {"tokenizer_config.json": config, "special_tokens_map.json": special_map, "added_tokens.json": added}
    for name, value in files.items():
        with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, ensure_ascii=False)
            f.write("\n")

    variants = {}
    for name, overrides in HF_VARIANTS.items():
        with tempfile.TemporaryDirectory() as d:
            for f in ["tokenizer.model", "special_tokens_map.json", "added_tokens.json"]:
                shutil.copy(os.path.join(OUT, f), d)
            cfg = dict(config)
            cfg.update(overrides)
            if cfg.get("added_tokens_decoder") == "from_added_tokens":
                specials = {"<unk>": 0, "<s>": 1, "</s>": 2, **added}
                cfg["added_tokens_decoder"] = {
                    str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True}
                    for t, i in specials.items()
                }
                overrides = {**overrides, "added_tokens_decoder": cfg["added_tokens_decoder"]}
            with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump(cfg, f)
            tok = LlamaTokenizerFast.from_pretrained(d)
            assert "tokenizer.json" not in os.listdir(d)
            variants[name] = {
                "semantics": "fast",
                "files": ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"],
                "overrides": overrides,
                "texts": [encode(tok, t) for t in CORPUS],
            }
    # The original layout: tokenizer.model alone, the slow SentencePiece tokenizer (legacy default).
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(model_path, d)
        tok = LlamaTokenizer(vocab_file=os.path.join(d, "tokenizer.model"))
        variants["original_slow"] = {
            "semantics": "slow",
            "files": ["tokenizer.model"],
            "overrides": {},
            "texts": [encode(tok, t) for t in CORPUS],
        }
    goldens = {
        "made_by": "tools/tokenizer_goldens.py",
        "versions": {
            "python": sys.version.split()[0],
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "sentencepiece": spm.__version__,
        },
        "pieces": size,
        "variants": variants,
    }
    # One line per text keeps the file small and its diffs readable.
    text = json.dumps(goldens, ensure_ascii=False, indent=1)
    for v in variants.values():
        for case in v["texts"]:
            pretty = json.dumps(case, ensure_ascii=False, indent=1).replace("\n", "\n    ")
            text = text.replace(pretty, json.dumps(case, ensure_ascii=False), 1)
    with open(os.path.join(OUT, "goldens.json"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"wrote {OUT}: {size} pieces, {len(variants)} variants x {len(CORPUS)} texts")


if __name__ == "__main__":
    main()

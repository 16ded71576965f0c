"""Build the demo model's text encoder: a tiny sentencepiece tokenizer and a small random-init T5 encoder.

    python toy_world/make_text_encoder.py --output-dir assets/default_model/text_encoder

The tokenizer is trained on every caption the synthetic data set can produce, so each caption word becomes
one token; byte fallback spells any other text in byte tokens instead of <unk>. Ids follow T5: pad=0, eos=1,
unk=2. The encoder is a 2-layer T5 (d_model 64) with fixed random weights: STDiT2's caption projection learns
to read it, and a frozen random encoder still gives distinct words distinct embeddings. The folder loads with
paddlenlp `T5EncoderModel.from_pretrained(dir)` and `T5Tokenizer.from_pretrained(dir)`.
"""

import os
import sys

# Run as `python scripts/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import io
import tempfile

from toy_world import synthetic
from utils.errors import UserError, run_cli
from utils.io import atomic_path

T5_SETTINGS = {
    "d_model": 64,
    "d_ff": 128,
    "d_kv": 16,
    "num_layers": 2,
    "num_heads": 4,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
}
# Upper bound: 256 byte tokens, 3 special tokens, the letters and enough merges to make every caption word whole.
MAX_VOCAB_SIZE = 400


def train_sentencepiece(sentences, vocab_size=MAX_VOCAB_SIZE):
    """Serialized sentencepiece BPE model (bytes) with T5's special ids and byte fallback."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        # Captions are plain lowercase ASCII; the identity rule keeps the model file a few KB instead of ~250 KB.
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def build_text_encoder(output_dir, seed=0):
    """Write tokenizer + T5 encoder into `output_dir` (replaced atomically); return the vocabulary size."""
    import paddle
    from paddlenlp.transformers import T5Config, T5EncoderModel, T5Tokenizer

    with tempfile.TemporaryDirectory() as work_dir:
        spm_path = os.path.join(work_dir, "spiece.model")
        with open(spm_path, "wb") as f:
            f.write(train_sentencepiece(synthetic.all_captions()))
        # No <extra_id_*> sentinels: they only matter for T5's span-corruption pre-training.
        tokenizer = T5Tokenizer(sentencepiece_model_file=spm_path, extra_ids=0)
        vocab_size = len(tokenizer)

        paddle.seed(seed)
        config = T5Config(vocab_size=vocab_size, is_encoder_decoder=False, use_cache=False, **T5_SETTINGS)
        model = T5EncoderModel(config)
        model.eval()
        with atomic_path(output_dir) as tmp_dir:
            model.save_pretrained(tmp_dir, safe_serialization=True)
            tokenizer.save_pretrained(tmp_dir)
    return vocab_size


def check_text_encoder(output_dir):
    """Load the folder back the way users do and make sure no caption word becomes <unk>."""
    from paddlenlp.transformers import T5EncoderModel, T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(output_dir)
    model = T5EncoderModel.from_pretrained(output_dir)
    words = " ".join(synthetic.caption_vocabulary())
    ids = tokenizer(words)["input_ids"]
    if tokenizer.unk_token_id in ids:
        raise RuntimeError(f"caption words map to <unk>: {tokenizer.convert_ids_to_tokens(ids)}")
    return tokenizer, model


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="assets/default_model/text_encoder")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    if os.path.isfile(args.output_dir):
        raise UserError(f"--output-dir {args.output_dir}: is a file; pass a folder path")
    vocab_size = build_text_encoder(args.output_dir, seed=args.seed)
    tokenizer, _ = check_text_encoder(args.output_dir)
    example = synthetic.all_captions()[0]
    print(f"vocabulary size {vocab_size}; {example!r} -> {tokenizer.tokenize(example)}")
    print(f"saved {args.output_dir}")


if __name__ == "__main__":
    run_cli(main)

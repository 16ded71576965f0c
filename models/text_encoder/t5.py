"""`T5Encoder`: caption features from a paddlenlp `T5EncoderModel` (Open-Sora v1.1 uses DeepFloyd's
t5-v1_1-xxl, 4096 channels, 200 tokens), plus the original's caption cleaning."""

import html
import os
import re
import urllib.parse

import paddle

from models.text_encoder.streamed_t5 import StreamedT5EncoderModel
from models.vae.vae import check_model_dir


TOKENIZER_FILE = "spiece.model"


class T5Encoder:
    """Encodes prompts to `{"y": [B, 1, L, C], "mask": [B, L]}`, padded to `model_max_length` tokens.

    T5 runs in fp32 by default: the original requires it (its features overflow in fp16). `null(n)` gives
    the learned null caption of the STDiT2 for classifier-free guidance; it needs `y_embedder` to be set to
    the model's caption embedder (`text_encoder.y_embedder = model.y_embedder`).
    """

    def __init__(self, model, tokenizer, model_max_length=200):
        self.tokenizer = tokenizer
        self.model = model
        self.model.eval()
        for param in self.model.parameters():
            param.stop_gradient = True
        self.model_max_length = model_max_length
        self.output_dim = self.model.config.d_model
        self.y_embedder = None

    @classmethod
    def from_pretrained(cls, path, model_max_length=200, dtype="float32", stream=False):
        """The encoder of `path` and its tokenizer: in the same directory (as DeepFloyd's t5-v1_1-xxl ships
        them), or in the sibling `tokenizer` folder of a pipeline directory. `stream=True` holds one block's
        weights at a time (`StreamedT5EncoderModel`, float32, safetensors checkpoints only) instead of the
        whole encoder."""
        from paddlenlp.transformers import T5EncoderModel, T5Tokenizer

        cls.read_config(path)
        tokenizer_path = path
        sibling = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")
        if not os.path.isfile(os.path.join(path, TOKENIZER_FILE)) and os.path.isfile(os.path.join(sibling, TOKENIZER_FILE)):
            tokenizer_path = sibling
        model = StreamedT5EncoderModel.from_pretrained(path) if stream else T5EncoderModel.from_pretrained(path, dtype=dtype)
        return cls(model, T5Tokenizer.from_pretrained(tokenizer_path), model_max_length)

    @staticmethod
    def read_config(path):
        """The T5 config.json of `path` (e.g. its feature width `d_model`), checked without loading weights."""
        return check_model_dir(path, "T5 text encoder", "d_model", "scripts/convert_checkpoint.py t5 SRC DST")

    @paddle.no_grad()
    def encode(self, texts):
        tokens = self.tokenizer(
            list(texts),
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            return_tensors="pd",
        )
        mask = tokens["attention_mask"].astype("int64")
        features = self.model(input_ids=tokens["input_ids"], attention_mask=mask)[0]
        return {"y": features[:, None], "mask": mask}

    def null(self, n):
        if self.y_embedder is None:
            raise RuntimeError("set text_encoder.y_embedder = model.y_embedder before asking for null captions")
        return self.y_embedder.y_embedding[None].tile([n, 1, 1])[:, None]


# Punctuation runs the original replaces by a space.
BAD_PUNCTUATION = re.compile(r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]{1,}")
URL = re.compile(r"\b((?:(?:https?|www):(?:/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?(?!@)))")
HTML_TAG = re.compile(r"<[^>]+>")
CJK = re.compile(r"[\u31c0-\u31ef\u31f0-\u31ff\u3200-\u32ff\u3300-\u33ff\u3400-\u4dbf\u4dc0-\u4dff\u4e00-\u9fff]+")
DASHES = re.compile(r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+")


def basic_clean(text):
    try:  # ftfy repairs mojibake when installed; it is not a requirement
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return html.unescape(html.unescape(text)).strip()


def clean_caption(caption):
    """The caption normalisation Open-Sora's T5 was trained with (DeepFloyd IF's), without bs4: HTML tags
    are stripped with a regular expression."""
    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    caption = re.sub("<person>", "person", caption)
    caption = URL.sub("", caption)
    caption = HTML_TAG.sub("", caption)
    caption = re.sub(r"@[\w\d]+\b", "", caption)
    caption = CJK.sub("", caption)
    caption = DASHES.sub("-", caption)
    caption = re.sub(r"[`´«»“”¨]", '"', caption)
    caption = re.sub(r"[‘’]", "'", caption)
    caption = re.sub(r"&quot;?", "", caption)
    caption = re.sub(r"&amp", "", caption)
    caption = re.sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ", caption)  # IP addresses
    caption = re.sub(r"\d:\d\d\s+$", "", caption)  # article ids
    caption = re.sub(r"\\n", " ", caption)
    caption = re.sub(r"#\d{1,3}\b", "", caption)
    caption = re.sub(r"#\d{5,}\b", "", caption)
    caption = re.sub(r"\b\d{6,}\b", "", caption)
    caption = re.sub(r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", "", caption)  # file names
    caption = re.sub(r"[\"']{2,}", r'"', caption)
    caption = re.sub(r"[\.]{2,}", r" ", caption)
    caption = BAD_PUNCTUATION.sub(" ", caption)
    caption = re.sub(r"\s+\.\s+", r" ", caption)
    if len(re.findall(r"(?:\-|\_)", caption)) > 3:  # this-is-a-slug
        caption = re.sub(r"(?:\-|\_)", " ", caption)
    caption = basic_clean(caption)
    caption = re.sub(r"\b[a-zA-Z]{1,3}\d{3,15}\b", "", caption)
    caption = re.sub(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", "", caption)
    caption = re.sub(r"\b\d+[a-zA-Z]+\d+\b", "", caption)
    caption = re.sub(r"(worldwide\s+)?(free\s+)?shipping", "", caption)
    caption = re.sub(r"(free\s)?download(\sfree)?", "", caption)
    caption = re.sub(r"\bclick\b\s(?:for|on)\s\w+", "", caption)
    caption = re.sub(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", "", caption)
    caption = re.sub(r"\bpage\s+\d+\b", "", caption)
    caption = re.sub(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" ", caption)
    caption = re.sub(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", "", caption)  # sizes like 1920x1080
    caption = re.sub(r"\b\s+\:\s+", r": ", caption)
    caption = re.sub(r"(\D[,\./])\b", r"\1 ", caption)
    caption = re.sub(r"\s+", " ", caption).strip()
    caption = re.sub(r"^[\"']([\w\W]+)[\"']$", r"\1", caption)
    caption = re.sub(r"^[\'\_,\-\:;]", r"", caption)
    caption = re.sub(r"[\'\_,\-\:\-\+]$", r"", caption)
    caption = re.sub(r"^\.\S+$", "", caption)
    return caption.strip()


def text_preprocessing(text):
    """Clean a prompt as the original does before T5 (twice, as it was done at training time)."""
    return clean_caption(clean_caption(text))

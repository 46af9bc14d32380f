"""BERTScore is computed when its model is on the machine: a tiny BERT built here and saved to a folder."""

from __future__ import annotations

import json

import pytest

from pointvl.core.record import iter_records, target_text
from pointvl.core.spatial import QuantConfig
from pointvl.evaluation.scoring import EvaluateConfig, evaluate
from pointvl.evaluation.text_metrics import bertscore_f1, bertscore_unavailable


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, eval_shards) -> str:
    """A 2-layer BERT with a WordPiece vocabulary trained on the shards' descriptions (random weights)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = str(tmp_path_factory.mktemp("tiny-bert"))
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    texts = [r["description"] for r in iter_records(eval_shards, "train")] + ["a red car", "wooden"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]", model_max_length=64).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def test_bertscore_with_a_local_model(eval_shards, tiny_bert, tmp_path):
    assert bertscore_unavailable(tiny_bert) is None
    assert "holds no config.json" in bertscore_unavailable(str(tmp_path))
    f1 = bertscore_f1(["a small chair", "a red car", ""], ["a small chair", "a wooden table", "a chair"], tiny_bert, 2)
    assert f1[0] == pytest.approx(1.0, abs=1e-5) and 0 < f1[1] < 1 and f1[2] == 0.0
    records = list(iter_records(eval_shards, "test"))
    preds = {r["instance_id"]: target_text(r, QuantConfig()) for r in records}
    wrong = json.loads(preds[records[0]["instance_id"]])
    wrong["description"] = "a red car"
    preds[records[0]["instance_id"]] = json.dumps(wrong)
    m = evaluate(eval_shards, preds, EvaluateConfig(bertscore_model=tiny_bert, bertscore_layers=2, per_category=True))
    assert 0.9 < m["bertscore"] < 1.0 and "bertscore" not in m["not_computed"]
    assert m["definitions"]["bertscore_model"] == f"{tiny_bert}, layer 2"
    per = m["per_category"]
    assert per[records[0]["category"]]["bertscore"] < per[records[1]["category"]]["bertscore"]
